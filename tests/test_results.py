import json
import os
import subprocess
import sys
import time

import pytest

from labutils import plots, results


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    monkeypatch.setenv("SMML_RESULTS_DIR", str(tmp_path))
    return tmp_path


def test_save_merges_sections_with_fingerprint(scratch):
    p1 = results.save("labX", "a", {"x": 1.5})
    p2 = results.save("labX", "b", {"y": [1, 2]})
    assert p1 == p2 and p1.parent.parent == scratch
    doc = json.loads(p1.read_text())
    assert doc["sections"] == {"a": {"x": 1.5}, "b": {"y": [1, 2]}}
    assert doc["fingerprint"]["torch"]
    assert results.load("labX")["sections"]["a"]["x"] == 1.5


def test_save_makes_json_of_odd_values(scratch):
    import numpy as np

    from labutils.timing import stats

    path = results.save("labX", "odd", {"nan": float("nan"), "np": np.float32(2.0), "st": stats([1, 2, 3])})
    sec = json.loads(path.read_text())["sections"]["odd"]
    assert sec["nan"] is None and sec["np"] == 2.0 and sec["st"]["p50"] == 2.0


def test_atomic_write_leaves_no_temp_files(scratch):
    results.save("labX", "a", {"x": 1})
    fig = plots.bars(["a", "b"], [1.0, 2.0], title="t", ylabel="y")
    png = results.save_figure("labX", "bars", fig)
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in png.parent.iterdir() if p.name.startswith(".")]


def test_default_is_scratch_not_the_work_tree(monkeypatch):
    monkeypatch.delenv("SMML_RESULTS_DIR", raising=False)
    assert results.root() == results.REPO / ".smml" / "results"


def test_bad_arguments(scratch):
    with pytest.raises(ValueError, match="needs a lab"):
        results.save("", "x", {})


def test_table_renders_markdown():
    md = plots.table([{"a": 1, "b": 0.123456}, {"a": 2, "b": 3.0}])
    assert md.splitlines()[0] == "| a | b |" and "0.123" in md


# ---------------------------------------------------------------- hardening (issue 10)
_WRITER = """
import os, sys, time
from pathlib import Path
from labutils import results
who, folder = sys.argv[1], Path(sys.argv[2])
(folder / f"ready-{who}").touch()
while not (folder / "go").exists():  # both writers start together
    time.sleep(0.01)
for k in range(40):
    results.save("labC", f"{who}-{k}", {"k": k})
"""


def test_concurrent_writers_keep_every_section(scratch, tmp_path):
    """Two processes saving 40 sections each into one lab's JSON: all 80 are kept."""
    sync = tmp_path / "sync"
    sync.mkdir()
    env = dict(os.environ, SMML_RESULTS_DIR=str(scratch), PYTHONPATH=str(results.REPO))
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, who, str(sync)], env=env, cwd=results.REPO)
             for who in ("a", "b")]
    deadline = time.monotonic() + 300  # a generous ceiling for two Python start-ups on a loaded machine
    while not all((sync / f"ready-{w}").exists() for w in "ab") and time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs)
        time.sleep(0.05)
    (sync / "go").touch()
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    sections = results.load("labC")["sections"]
    assert sorted(sections) == sorted(f"{w}-{k}" for w in "ab" for k in range(40))


def test_a_corrupt_lab_json_is_moved_aside_and_does_not_block_saving(scratch):
    path = results.lab_dir() / "labX.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"sections": {"a": 1')  # cut short, as a crash in a non-atomic writer leaves it
    with pytest.raises(ValueError, match=r"labX.json is not valid JSON.*delete it"):
        results.load("labX")
    with pytest.warns(UserWarning, match=r"labX.json is not valid JSON.*moved it aside to .*labX.json.corrupt-"):
        results.save("labX", "b", {"y": 2})
    assert results.load("labX")["sections"] == {"b": {"y": 2}}
    aside = list(path.parent.glob("labX.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_text() == '{"sections": {"a": 1'
    results.save("labX", "c", {"z": 3})  # and saving goes on normally
    assert set(results.load("labX")["sections"]) == {"b", "c"}


def test_multi_element_tensors_and_arrays_become_lists(scratch):
    import numpy as np
    import torch

    rec = {"t": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a": np.array([1.5, float("nan")]),
           "bf": torch.ones(2, dtype=torch.bfloat16), "s": torch.tensor(2.5), "i": np.int64(7)}
    sec = json.loads(results.save("labX", "arr", rec).read_text())["sections"]["arr"]
    assert sec == {"t": [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]], "a": [1.5, None], "bf": [1.0, 1.0], "s": 2.5, "i": 7}
