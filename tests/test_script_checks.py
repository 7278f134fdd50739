"""Each distributed script's own check of its result (``verify``), run on real records.

lab2's and lab3's notebooks launch these scripts on 4 gloo ranks (make test executes them under nbval), and every
script exits non-zero when its ``verify`` finds a problem, so a wrong sharded product, a missing layout or a
mis-sized FSDP shard fails the notebook's cell with the script's message. Here each ``verify`` is fed the record
of a committed reference run (results/h200, written by the same scripts) -- which must pass -- and copies of it
broken in one place each, which must be caught with a message that says what is wrong. No ranks are started.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from labutils.parallel import gemm
from labutils.parallel import pipeline as pl
from labutils.scripts import (
    collectives_bench,
    ddp_overhead,
    lab2_data,
    lab2_decode,
    lab2_pipeline,
    lab2_shard,
    lab3_mistral,
)

REF = Path(__file__).resolve().parents[1] / "results" / "h200"


@pytest.fixture(scope="module")
def lab2():
    return json.loads((REF / "lab2.json").read_text())["sections"]


@pytest.fixture(scope="module")
def lab3():
    return json.loads((REF / "lab3.json").read_text())["sections"]


def broken(doc, change):
    d = copy.deepcopy(doc)
    change(d)
    return d


def one_problem(found: list[str], *words: str) -> None:
    assert len(found) == 1 and all(w in found[0] for w in words), found


def test_lab2_shard(lab2):
    rec, pls = lab2["shard"], list(gemm.PLACEMENTS)
    assert lab2_shard.verify(rec, pls) == []
    one_problem(lab2_shard.verify(broken(rec, lambda d: d["gemm"][3].update(rel_err_hand=0.3)), pls),
                "k:", "rel_err_hand", "wrong")
    one_problem(lab2_shard.verify(broken(rec, lambda d: d["gemm"].pop()), pls), "placements run")
    one_problem(lab2_shard.verify(broken(rec, lambda d: d["gemm"][3].update(dtensor_c=["R"])), pls),
                "DTensor's C", "P(sum)")
    one_problem(lab2_shard.verify(broken(rec, lambda d: d["mlp"]["by hand"].update(rel_err_grads=1.0)), pls),
                "MLP by hand")
    one_problem(lab2_shard.verify(broken(rec, lambda d: d["gemm"][1].update(comm_s=0.0)), pls), "not timed")


def test_lab2_decode(lab2):
    rec = lab2["decode"]
    lay, tol = [("tp", 1), ("tp", 2), ("tp", 4), ("pp", 4)], 1e-4

    def v(d):
        return lab2_decode.verify(d, tol, [2, 4], lay)

    assert v(rec) == []
    one_problem(v(broken(rec, lambda d: d["hf_tp"].update(different_input_caught=False))), "same-input check")
    one_problem(v(broken(rec, lambda d: d["hf_tp"]["tp"][1].update(rel_err=0.5))), "transformers TP=4")
    one_problem(v(broken(rec, lambda d: d["hf_tp"]["tp"][-1].update(different_inputs_rel_err=0.0))),
                "did not change the logits")
    one_problem(v(broken(rec, lambda d: d["decode"].pop())), "layouts run")
    one_problem(v(broken(rec, lambda d: d["decode"][2]["runs"][0].update(tok_s=0.0))), "TP=4: batches")
    one_problem(v(broken(rec, lambda d: d["decode"][3].update(max_bytes_per_device=1e12))), "PP < TP")


def test_lab2_pipeline(lab2):
    doc = lab2["pipeline"]
    runs, world, ms = doc["runs"], doc["context"]["world"], sorted({r["m"] for r in doc["runs"]})

    def v(rs):
        return lab2_pipeline.verify(rs, list(pl.SCHEDULES), ms, world)

    assert v(runs) == []
    one_problem(v(runs[1:]), "timed", "asked")
    one_problem(v(broken(runs, lambda rs: rs[0].update(predicted=0.5))), "predicted bubble")
    one_problem(v(broken(runs, lambda rs: rs[0]["measured"].update(p50=1.5))), "not a fraction")
    one_problem(v(broken(runs, lambda rs: rs[0]["events"][2].pop())), "rank 2 did not run every forward")


def test_lab2_data(lab2):
    mem = lab2["dp_memory"]

    def v(m):
        return lab2_data.verify({"memory": m}, [], 0, 4)

    assert v(mem) == []
    one_problem(v(broken(mem, lambda m: m["fsdp"]["measured"].update(grads=m["ddp"]["measured"]["grads"]))),
                "FSDP2 grads per rank")
    found = v(broken(mem, lambda m: m["ddp"]["measured"].update(optimizer=m["ddp"]["measured"]["params"])))
    assert any("AdamW state" in x for x in found), found
    checks = {"checks": [{"kind": "ddp", "losses": [1.0, 0.9]}]}
    assert lab2_data.verify(checks, ["ddp"], 2, 4) == []
    one_problem(lab2_data.verify(checks, ["ddp", "fsdp"], 2, 4), "checked", "asked")
    one_problem(lab2_data.verify(checks, ["ddp"], 3, 4), "2 losses for 3 steps")


def test_ddp_overhead(lab3):
    doc = lab3["ddp_overhead"]
    rows, ranks, grad = doc["rows"], {"node": 2, "world": 4}, doc["params"] * 4

    def v(rs):
        return ddp_overhead.verify(rs, ["node", "world"], ranks, grad)

    assert v(rows) == []
    one_problem(v(rows[1:]), "ran", "asked")
    one_problem(v(broken(rows, lambda rs: rs[0]["buckets"].pop())), "node: buckets sum")
    one_problem(v(broken(rows, lambda rs: rs[1].update(comm_s=0.0))), "world: compute")


def test_lab3_mistral(lab3):
    rows = lab3["mistral_layouts"]["rows"]
    names = [r["name"] for r in rows]
    assert lab3_mistral.verify(rows, names, 2) == []
    one_problem(lab3_mistral.verify(rows, names + ["tp1xdp4"], 2), "asked")
    one_problem(lab3_mistral.verify(broken(rows, lambda rs: rs[0]["predicted"].update(inter_decode_bytes=1.0)),
                                    names, 2), "tp2xdp2", "between nodes")
    one_problem(lab3_mistral.verify(broken(rows, lambda rs: rs[1].update(train_tok_s=0.0)), names, 2), "tp4")


def test_collectives_bench(lab3):
    ranks, groups = lab3["two_nodes"]["ranks"], lab3["two_nodes"]["groups"]
    sweep, fits = lab3["collectives"]["sweep"], lab3["collectives"]["fits"]
    every = ["intra", "inter", "world"]
    assert collectives_bench.verify(ranks, groups, sweep, fits, True, every) == []
    one_problem(collectives_bench.verify(ranks, {"world": groups["world"]}, sweep, fits, False, ["world", "inter"]),
                "no 'inter' group")
    same_host = broken(ranks, lambda rs: [r.update(nccl_hostid="h") for r in rs])
    one_problem(collectives_bench.verify(same_host, groups, sweep, fits, True, every), "NCCL host ids")
    one_problem(collectives_bench.verify(ranks, groups, sweep, dict(list(fits.items())[1:]), True, every),
                "alpha-beta fits")
