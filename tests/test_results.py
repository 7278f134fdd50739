import json

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
