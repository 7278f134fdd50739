"""Execute lab notebooks headless, top to bottom, and keep the executed copies.

    python -m labutils.scripts.run_labs                     # every lab*.ipynb, small or full by hardware
    python -m labutils.scripts.run_labs lab1.ipynb --out .smml/executed
    SMML_PROFILE=full SMML_RESULTS_DIR=results python -m labutils.scripts.run_labs   # a reference run

Uses nbclient directly (no JupyterLab or nbconvert needed), so it runs on a bare GPU
image too. Exits non-zero on the first failing notebook, after saving its partial output.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


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
    return 0


if __name__ == "__main__":
    sys.exit(main())
