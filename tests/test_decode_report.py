"""labutils.decode_report: lab4's figures carry the device, the ladder's ticks and legend, the batch sweep's
ridge, the serving panels, and the serving sentences that follow the numbers given (no timing, no model)."""

import pytest

from labutils import decode_report as report
from labutils import hardware


def _rows(rates, ttft, itl, conc=(1, 4, 16, 64)):
    return [{"concurrency": c, "out tok/s": r, "ttft p50": t, "itl p50": i}
            for c, r, t, i in zip(conc, rates, ttft, itl)]


def test_titles_carry_the_device_label():
    label = hardware.device_label()
    assert label and label in report.ladder_figure([{"rung": "a: x", "tok/s": 1.0}], {}, "t").axes[0].get_title()
    rows = [{"batch": b, "tok_s": 10.0 * b, "roofline_tok_s": 12.0 * b} for b in (1, 4)]
    assert label in report.batch_figure(rows, 300.0, 1e4).axes[0].get_title()
    fig = report.serving_figure({"CB on": _rows([1, 2], [10, 20], [5, 6], (1, 4))})
    assert label in fig._suptitle.get_text() and len(fig.axes) == 2  # throughput and latency panels


def test_ladder_ticks_distinguish_rungs_and_the_legend_covers_no_line():
    rows = [{"rung": "a: HF generate, dynamic cache, eager", "tok/s": 20.0},
            {"rung": "b: HF generate, static cache, eager", "tok/s": 21.0},
            {"rung": "e: lean int8 (library), compiled [reduce, torchao Int8WeightOnlyConfig]", "tok/s": 300.0,
             "library": True}]
    fig = report.ladder_figure(rows, {"bf16 roofline": 310.0, "int8 roofline": 620.0}, "ladder",
                               report.peers_for("NVIDIA H200"))
    ax = fig.axes[0]
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert len(set(ticks)) == 3 and "[" not in "".join(ticks)
    fig.canvas.draw()
    legend, axes = ax.get_legend().get_window_extent(), ax.get_window_extent()
    assert legend.y1 <= axes.y0  # under the axes: it cannot hide the int8 roofline (or any other line)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("int8 roofline" in t for t in labels) and any("gpt-fast" in t and "H200" in t for t in labels)


def test_peers_apply_only_to_their_gpu():
    assert {p["tok_s"] for p in report.peers_for("NVIDIA H200")} == {202.5, 164.5}
    assert {p["tok_s"] for p in report.peers_for("NVIDIA A100-SXM4-80GB")} == {104.9, 155.58}
    assert report.peers_for("AMD EPYC") == []


def test_batch_figure_marks_the_ridge_and_compute_roof():
    rows = [{"batch": b, "tok_s": 10.0 * b, "roofline_tok_s": 12.0 * b} for b in (1, 4, 16)]
    ax = report.batch_figure(rows, 250.0, 5e4).axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("ridge" in t and "250" in t for t in labels) and any("compute roof" in t for t in labels)


@pytest.mark.parametrize("on64,expect", [(427.0, "exceeds"), (120.0, "stays below")])
def test_serving_text_follows_the_numbers(on64, expect):
    # the H200 reference: 427 tok/s at 64 users with CB on vs 264 for the batch-1 loop; TTFT and ITL rise a lot
    rows = {True: _rows([20.0, 70.0, 200.0, on64], [60.0, 1370.0, 2000.0, 3000.0], [46.0, 60.0, 90.0, 134.0]),
            False: _rows([25.0, 25.0, 25.0], [50.0, 3000.0, 9000.0], [40.0, 40.0, 40.0], (1, 4, 16))}
    text = " ".join(report.serving_text(rows, 264.0, "d'"))
    assert f"{expect} the batch-1 loop d'" in text
    assert "rises 2.9×" in text  # ITL 46 -> 134 ms, not "a little"
    assert "CB off still grew" not in text  # off stayed flat (25 tok/s) here
    assert "continuous batching is slower alone" in text  # 20 < 25 tok/s at one user, and why


def test_serving_text_says_when_cb_costs_nothing_at_one_user():
    rows = {True: _rows([25.0, 90.0], [50.0, 60.0], [40.0, 42.0], (1, 4)),
            False: _rows([25.0, 25.0], [50.0, 200.0], [40.0, 40.0], (1, 4))}
    text = " ".join(report.serving_text(rows, 20.0, "d"))
    assert "costs nothing measurable" in text and "stays about flat" in text
    falling = {False: _rows([16.0, 33.0], [117.0, 305.0], [54.6, 24.6], (1, 2))}  # a CPU run: ITL fell, rate grew
    text = " ".join(report.serving_text(falling, 40.0, "c"))
    assert "falls 2.2×" in text and "CB off still grew 2.1×" in text


def test_ladder_rows_show_mbu_against_the_datasheet_too():
    from labutils import decode, roofline

    cost = roofline.Cost("step", 1e9, 1e9)
    run = decode.DecodeRun("d", 1, 8, 4, 4, 0.01, 0.004, 0.004, 0.005, 0.03, 0.1, cost, 4.4e11, 1e14)
    chk = {"d": {"rel_err": 0.01, "first_use_s": 1.0}}
    row = report.ladder_rows({"d": run}, chk, set(), 4.4e11, 4.8e11)[0]
    assert abs(row["MBU %"] - 1e9 / 0.004 / 4.4e11 * 100) < 1e-9
    assert abs(row["MBU sheet %"] - row["MBU %"] * 4.4 / 4.8) < 1e-9 and row["library"] is False
    assert "ITL p50 ms" in row and "p50 ms" not in row  # the percentiles are inter-token latencies, said so
    assert "MBU sheet %" not in report.ladder_rows({"d": run}, chk, {"d"}, 4.4e11, None)[0]  # a CPU: no datasheet
