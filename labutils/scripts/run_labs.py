"""Execute lab notebooks headless, top to bottom, and keep the executed copies.

    python -m labutils.scripts.run_labs                     # every lab*.ipynb, small or full by hardware
    python -m labutils.scripts.run_labs lab1.ipynb --out .smml/executed
    SMML_PROFILE=full SMML_RESULTS_DIR=results python -m labutils.scripts.run_labs   # a reference run

Uses nbclient directly (no JupyterLab or nbconvert needed), so it runs on a bare GPU
image too. Exits non-zero on the first failing notebook, after saving its partial output, and (unless
--allow-warnings) when an executed notebook's outputs hold warning or traceback text (``output_problems``:
an attendee should meet none).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


#: text no executed lab may print: a Python warning line ("TqdmWarning: IProgress not found", "UserWarning: ..."),
#: a traceback, a "Warning:" or "WARNING" line of a library's logging
PROBLEM = re.compile(r"Traceback \(most recent call last\)|\b\w*Warning: |^WARNING\b|^Warning:", re.MULTILINE)


def _texts(output: dict):
    if output.get("output_type") == "error":
        yield "\n".join([f"{output.get('ename')}: {output.get('evalue')}", *output.get("traceback", [])])
    if "text" in output:
        yield output["text"] if isinstance(output["text"], str) else "".join(output["text"])
    for mime in ("text/plain", "text/html"):
        v = output.get("data", {}).get(mime)
        if v:
            yield v if isinstance(v, str) else "".join(v)


def output_problems(nb) -> list[str]:
    """``"cell N: <line>"`` for every output line of ``nb`` (a dict or nbformat node) that matches ``PROBLEM``."""
    out = []
    for i, cell in enumerate(nb["cells"]):
        for o in cell.get("outputs", []) if cell.get("cell_type") == "code" else []:
            for text in _texts(o):
                out += [f"cell {i}: {line.strip()[:200]}" for line in text.splitlines() if PROBLEM.search(line)]
    return out


def run_one(path: Path, out_dir: Path, timeout: int) -> float:
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    from labutils.results import atomic_write_bytes

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO)}})
    t0 = time.perf_counter()
    try:
        client.execute()
    except CellExecutionError:
        atomic_write_bytes(out_dir / path.name, nbformat.writes(nb).encode())
        raise
    atomic_write_bytes(out_dir / path.name, nbformat.writes(nb).encode())
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("notebooks", nargs="*", help="notebooks to run (default: every lab*.ipynb)")
    ap.add_argument("--out", default=str(REPO / ".smml" / "executed"), help="folder for executed copies")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds one cell may take")
    ap.add_argument("--allow-warnings", action="store_true",
                    help="report warning/traceback text in the outputs but do not fail on it")
    args = ap.parse_args(argv)
    nbs = [Path(p) for p in args.notebooks] or sorted(REPO.glob("lab*.ipynb"))
    if not nbs:
        print("no lab notebooks found", file=sys.stderr)
        return 1
    for nb in nbs:
        if not nb.exists():
            print(f"{nb}: no such notebook", file=sys.stderr)
            return 2
        print(f"running {nb.name} ...", flush=True)
        try:
            secs = run_one(nb, Path(args.out), args.timeout)
        except Exception as e:  # noqa: BLE001 - report and stop, the partial copy is saved
            print(f"FAILED {nb.name}: {type(e).__name__}: {str(e)[-3000:]}", file=sys.stderr)
            return 1
        print(f"ok {nb.name} in {secs:.0f} s -> {Path(args.out) / nb.name}", flush=True)
        import nbformat

        problems = output_problems(nbformat.read(Path(args.out) / nb.name, as_version=4))
        for line in problems:
            print(f"{nb.name}: warning text in the output, {line}", file=sys.stderr)
        if problems and not args.allow_warnings:
            print(f"FAILED {nb.name}: {len(problems)} output line(s) with warning or traceback text (above); "
                  f"fix their cause, or pass --allow-warnings to only report them", file=sys.stderr)
            return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
