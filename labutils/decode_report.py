"""lab4's figures and the sentences that follow the run's own numbers: the ladder with the library rungs and a
peer's published figures, the batch sweep with its ridge, serving throughput and latency, and the text that
explains serving from what was measured (not from what a reference run once showed).

Every title carries the device (``hardware.device_label``).

Used in lab4 §Ladder, §Batch sweep, §Serving and §Cost.
"""

from __future__ import annotations

import textwrap

from . import hardware, plots

#: a peer's figures for batch-1 decode of a 7B model, tok/s: where each was measured and from what source
PEERS = [
    {"peer": "gpt-fast", "dtype": "bf16", "tok_s": 104.9, "gpu": "A100",
     "source": "gpt-fast README: Llama-2-7B, A100-80GB at 330 W, compiled"},
    {"peer": "gpt-fast", "dtype": "int8", "tok_s": 155.58, "gpu": "A100",
     "source": "gpt-fast README: Llama-2-7B 8-bit, A100-80GB at 330 W"},
    {"peer": "gpt-fast", "dtype": "bf16", "tok_s": 202.5, "gpu": "H200",
     "source": "gpt-fast's model + generate, CUDA graphs, random Mistral-7B, measured on an H200 (issue 14)"},
    {"peer": "gpt-fast", "dtype": "int8", "tok_s": 164.5, "gpu": "H200",
     "source": "the same, int8 (slower than its bf16 on torch 2.11), measured on an H200 (issue 14)"},
]


def peers_for(device_name: str) -> list[dict]:
    """The PEERS rows measured on this kind of GPU (matched by name, e.g. "H200"); none on a CPU."""
    return [p for p in PEERS if p["gpu"].lower() in device_name.lower()]


def tick(name: str, width: int = 24) -> str:
    """A rung's tick label: its name without the bracketed detail, wrapped (so 'a: ...' and 'b: ...' differ)."""
    return "\n".join(textwrap.wrap(name.split(" [")[0], width)[:3])


def ladder_figure(rows: list[dict], roofs: dict[str, float], title: str, peers: list[dict] = ()):
    """Bars of tokens/s per rung (rows: {"rung", "tok/s", "library": bool}), hand-written rungs blue and library
    rungs orange; ``roofs``: {label: tok/s} dashed lines; ``peers``: dotted reference lines. The legend sits
    outside the axes, under them, so it covers no line."""
    fig, ax = plots.figure(f"{title}\n{hardware.device_label()}", "", "tokens/s", size=(9, 5.2))
    colors = ["tab:orange" if r.get("library") else "tab:blue" for r in rows]
    ax.bar(range(len(rows)), [r["tok/s"] for r in rows], color=colors)
    ax.set_xticks(range(len(rows)), [tick(r["rung"]) for r in rows], rotation=30, ha="right", fontsize=7)
    for i, r in enumerate(rows):
        ax.annotate(f"{r['tok/s']:.3g}", (i, r["tok/s"]), ha="center", va="bottom", fontsize=7)
    for (label, v), c in zip(roofs.items(), ("tab:red", "tab:green", "tab:purple")):
        ax.axhline(v, color=c, ls="--", label=f"{label}: {v:,.0f} tok/s")
    for p in peers:
        ax.axhline(p["tok_s"], color="gray", ls=":", label=f"{p['peer']} {p['dtype']} ({p['gpu']}): {p['tok_s']:g}")
    ax.bar([0], [0], color="tab:orange", label="library rung (PyTorch, torchao)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.32), ncol=2, fontsize=7, frameon=False)
    fig.subplots_adjust(bottom=0.36)
    return fig


def batch_figure(rows: list[dict], ridge_batch: float, peak_tok_s: float | None = None):
    """Measured and roofline tokens/s vs batch on log axes, the predicted ridge as a vertical marker and the
    compute roof (peak FLOP/s / FLOPs per token) as a horizontal one."""
    bs = [r["batch"] for r in rows]
    fig = plots.lines({"measured": (bs, [r["tok_s"] for r in rows]),
                       "roofline (measured ceilings)": (bs, [r["roofline_tok_s"] for r in rows])},
                      title=f"decode tokens/s vs batch\n{hardware.device_label()}", xlabel="batch", ylabel="tokens/s",
                      logx=True, logy=True)
    ax = fig.axes[0]
    ax.axvline(ridge_batch, color="tab:red", ls=":", label=f"ridge: batch ≈ {ridge_batch:,.0f}")
    if peak_tok_s:
        ax.axhline(peak_tok_s, color="tab:purple", ls="--", label=f"compute roof {peak_tok_s:,.0f} tok/s")
    ax.legend(fontsize=8)
    return fig


def serving_figure(rows: dict[str, list[dict]], note: str = ""):
    """Two panels per server setting (rows: {"CB on": Sweep.rows(), ...}): output tokens/s, and TTFT p50 and
    inter-token latency p50 (ms) against concurrency; ``note`` (e.g. a level that was not run) under them."""
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    plt.close(fig)
    for (name, rs), color in zip(rows.items(), ("tab:blue", "tab:orange", "tab:green")):  # one color per setting
        c = [r["concurrency"] for r in rs]
        a1.plot(c, [r["out tok/s"] for r in rs], marker="o", color=color, label=name)
        a2.plot(c, [r["ttft p50"] for r in rs], marker="o", color=color, label=f"{name}: TTFT p50")
        a2.plot(c, [r["itl p50"] for r in rs], marker="s", ls="--", color=color, label=f"{name}: ITL p50")
    for ax, yl in ((a1, "output tokens/s (all requests)"), (a2, "latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel(yl)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    a2.set_yscale("log")
    fig.suptitle(f"transformers serve: throughput and latency vs concurrency — {hardware.device_label()}")
    if note:
        fig.text(0.5, -0.02, note, ha="center", fontsize=8)
    return fig


def _ratio_words(r: float) -> str:
    return f"falls {1 / r:.1f}×" if r < 0.8 else "stays about flat" if r < 1.25 else f"rises {r:.1f}×"


def serving_text(rows: dict[bool, list[dict]], batch1_tok_s: float, batch1_name: str) -> list[str]:
    """Sentences that read the serving sweep (rows: {cb_on: Sweep.rows()}) and compare it with the notebook's
    fastest batch-1 loop; every claim is computed from these numbers, so it holds on whatever machine ran."""
    out = []
    for cb, rs in rows.items():
        if not rs:
            continue
        lo, hi, tag = rs[0], rs[-1], "on" if cb else "off"
        ttft_r, itl_r = hi["ttft p50"] / lo["ttft p50"], hi["itl p50"] / lo["itl p50"]
        out.append(f"CB {tag}: {lo['out tok/s']:,.1f} → {hi['out tok/s']:,.1f} output tok/s from {lo['concurrency']} "
                   f"to {hi['concurrency']} users ({hi['out tok/s'] / lo['out tok/s']:.1f}×); TTFT p50 "
                   f"{lo['ttft p50']:,.0f} → {hi['ttft p50']:,.0f} ms ({_ratio_words(ttft_r)}), inter-token "
                   f"latency p50 {lo['itl p50']:,.1f} → {hi['itl p50']:,.1f} ms ({_ratio_words(itl_r)}).")
        if not cb and hi["out tok/s"] > 1.5 * lo["out tok/s"]:
            out.append(f"CB off still grew {hi['out tok/s'] / lo['out tok/s']:.1f}× with users: not the flat rate "
                       "predicted — requests that are in flight together were served side by side here.")
        top = max(rs, key=lambda r: r["out tok/s"])
        verb = "exceeds" if top["out tok/s"] > batch1_tok_s else "stays below"
        users = f"{top['concurrency']} user{'s' if top['concurrency'] != 1 else ''}"
        out.append(f"CB {tag} at best ({users}, {top['out tok/s']:,.1f} tok/s in all) {verb} the "
                   f"batch-1 loop {batch1_name} ({batch1_tok_s:,.1f} tok/s)"
                   + (": many users share each weight read." if verb == "exceeds" else
                      ": the server runs the HF model uncompiled, with its own scheduler and HTTP streaming per "
                      "token, and that costs more than batching gains here."))
    if True in rows and False in rows and rows[True] and rows[False]:
        on1, off1 = rows[True][0], rows[False][0]
        if on1["concurrency"] == off1["concurrency"] == 1:
            slower = on1["out tok/s"] < off1["out tok/s"]
            out.append(f"At 1 user CB on ran {on1['out tok/s']:,.1f} tok/s, off {off1['out tok/s']:,.1f}: "
                       + ("continuous batching is slower alone — its scheduler (a request queue polled every step, a "
                          "paged KV cache, a batch rebuilt each step) is work with no other request to share it."
                          if slower else "continuous batching costs nothing measurable with one request."))
    return out


def ladder_rows(runs: dict, checks: dict, library: set, read_Bps: float, sheet_Bps: float | None) -> list[dict]:
    """One table row per rung (``decode.DecodeRun.row()`` + bytes per token, logit error, first use, whether it is
    a library rung, and — where a datasheet figure exists — the MBU against it as well as the measured one)."""
    rows = []
    for k, r in runs.items():
        row = r.row() | {"GB/token": r.cost.bytes / 1e9, "rel err": checks[k]["rel_err"],
                         "first use s": checks[k]["first_use_s"], "library": k in library}
        if sheet_Bps:
            row["MBU sheet %"] = 100 * r.mbu * read_Bps / sheet_Bps  # the same bytes / time, datasheet bandwidth
        rows.append(row)
    return rows
