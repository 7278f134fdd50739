"""The labs as committed: what an attendee opens, what CI executes.

Each lab is committed without outputs and with the ``python3`` kernel, keeps its code cells short (heavy code
belongs in labutils), states its goals and its measured run time in the first cell, and ends with a summary and
exercises. Reads the JSON only: nothing is executed here (nbval does that).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LABS = sorted(ROOT.glob("lab*.ipynb"))
MAX_LINES = 15  # DESIGN.md: short cells


def problems(nb: dict) -> list[str]:
    """What is wrong with a lab notebook's committed form; empty when nothing is."""
    out = []
    spec = nb.get("metadata", {}).get("kernelspec", {}).get("name")
    if spec != "python3":
        out.append(f"kernelspec is {spec!r}: set it to 'python3' (Kernel > Change kernel > Python 3)")
    cells = nb.get("cells", [])
    for i, c in enumerate(cells):
        if c["cell_type"] != "code":
            continue
        if c.get("outputs") or c.get("execution_count") is not None:
            out.append(f"cell {i} has outputs: strip them (Edit > Clear Outputs of All Cells, then save)")
        n = len("".join(c["source"]).splitlines())
        if n > MAX_LINES:
            out.append(f"cell {i} has {n} code lines (at most {MAX_LINES}): split it or move code to labutils")
    first = "".join(cells[0]["source"]) if cells else ""
    if not re.search(r"you will learn|goals", first, re.I):
        out.append("the first cell states no goals ('You will learn' / 'Goals')")
    if not re.search(r"\b\d+(\.\d+)?\s*(s|min|minutes)\b", first):
        out.append("the first cell states no measured run time (e.g. '164 s on a 2-core CPU')")
    heads = [ln.lower() for c in cells if c["cell_type"] == "markdown"
             for ln in "".join(c["source"]).splitlines() if ln.startswith("#")]
    for want in ("summary", "exercises"):
        if not any(want in h for h in heads):
            out.append(f"no '## {want.capitalize()}' section")
    return out


@pytest.mark.parametrize("path", LABS, ids=[p.stem for p in LABS])
def test_lab_is_committed_clean_and_short(path):
    found = problems(json.loads(path.read_text()))
    assert not found, f"{path.name}: " + "; ".join(found)


def test_the_check_sees_each_problem():
    good = {"metadata": {"kernelspec": {"name": "python3"}},
            "cells": [{"cell_type": "markdown", "source": ["You will learn x. Runs in 40 s on a CPU."]},
                      {"cell_type": "code", "source": ["x = 1\n"], "outputs": [], "execution_count": None},
                      {"cell_type": "markdown", "source": ["## Summary\n"]},
                      {"cell_type": "markdown", "source": ["## Exercises\n"]}]}
    assert problems(good) == []
    bad = json.loads(json.dumps(good))
    bad["metadata"]["kernelspec"]["name"] = "venv"
    bad["cells"][1] |= {"source": ["x = 1\n"] * 16, "outputs": [{"text": "1"}], "execution_count": 3}
    bad["cells"][0]["source"] = ["An introduction."]
    bad["cells"] = bad["cells"][:3]
    found = " | ".join(problems(bad))
    for part in ("kernelspec", "outputs", "16 code lines", "goals", "run time", "Exercises"):
        assert part in found, (part, found)
