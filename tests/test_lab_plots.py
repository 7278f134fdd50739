"""lab0's and lab1's plots name the device that made them (issue 13: the H100 and H200 PNGs could not be told
apart): every figure-making call in their code cells has ``DEV`` (``hardware.device_label()``) in its title.
Read from the notebooks' source with ``ast``; nothing is executed."""

import ast
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIGURES = {"figure": 0, "lines": None, "bars": None, "roofline_figure": None, "throughput_latency_figure": None}


def figure_calls(cell_source: str):
    """(function name, title expression or None) for each figure-making call in one code cell."""
    tree = ast.parse("\n".join(line for line in cell_source.splitlines() if not line.lstrip().startswith(("%", "!"))))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in FIGURES:
            title = next((k.value for k in node.keywords if k.arg == "title"), None)
            pos = FIGURES[node.func.attr]
            if title is None and node.args:
                title = node.args[pos] if pos is not None else node.args[-1]
            yield node.func.attr, title


def cells(lab):
    nb = json.loads((ROOT / lab).read_text())
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


@pytest.mark.parametrize("lab", ["lab0.ipynb", "lab1.ipynb"])
def test_every_plot_title_names_the_device(lab):
    calls = [(name, title) for src in cells(lab) for name, title in figure_calls(src)]
    assert len(calls) >= 2
    bad = [(name, title and ast.unparse(title)) for name, title in calls
           if title is None or "DEV" not in {n.id for n in ast.walk(title) if isinstance(n, ast.Name)}]
    assert not bad, f"plot titles without DEV (hardware.device_label()): {bad}"
    assert any(re.search(r"DEV\b.*= .*hardware\.device_label\(\)", src) for src in cells(lab))


def test_the_check_catches_a_title_without_the_device():
    assert [ast.unparse(t) for _, t in figure_calls('fig = plots.lines(s, title="Waves", xlabel="N")')] == ["'Waves'"]


def test_lab1_prints_measured_throughputs_through_fmt_flops():
    # "0.0 TFLOP/s" came from f"{x / 1e12:.1f} TFLOP/s" on a CPU; gemm_bench.fmt_flops picks the unit instead
    fixed_unit = [src for src in cells("lab1.ipynb") if re.search(r"/ 1e12:\.\d+f\}\s*TFLOP/s", src)]
    assert not fixed_unit, fixed_unit
