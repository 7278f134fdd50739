"""Save every result with its fingerprint, atomically; load them back for comparison.

Where results go: ``$SMML_RESULTS_DIR`` if set, else a scratch folder ``.smml/results``
(git-ignored), so tests, CI and laptop runs never dirty the work tree. A deliberate
reference run (``make reference``) sets ``SMML_RESULTS_DIR=results``; then
``results/<gpu-slug>/<lab>.json`` holds one section per experiment and
``results/<gpu-slug>/<lab>_<name>.png`` the plots.

Used in every lab, first in lab0 §Environment.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from pathlib import Path

from . import hardware

REPO = Path(__file__).resolve().parent.parent


def root() -> Path:
    env = os.environ.get("SMML_RESULTS_DIR")
    return Path(env).expanduser().resolve() if env else REPO / ".smml" / "results"


def lab_dir(slug: str | None = None) -> Path:
    return root() / (slug or hardware.gpu_slug())


def _jsonable(x):
    if is_dataclass(x) and not isinstance(x, type):
        return _jsonable(x.as_dict() if hasattr(x, "as_dict") else asdict(x))
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None  # JSON has no NaN/inf
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if hasattr(x, "tolist"):  # numpy / torch arrays and scalars: nested lists of numbers (or a number)
        return _jsonable(x.tolist())
    if hasattr(x, "item"):  # other scalars
        return _jsonable(x.item())
    return str(x)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextmanager
def _locked(folder: Path):
    """An exclusive lock (``fcntl.flock``) on ``folder`` itself for a whole read-merge-write: writers in
    other processes (ranks, scripts, notebooks) wait their turn instead of losing sections, and no lock
    file is left in the results tree."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock (one writer at a time is then the caller's job)
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _read_or_set_aside(path: Path) -> dict:
    """The document at ``path``; a corrupt one is renamed aside (with a warning naming both files)."""
    if not path.exists():
        return {}
    try:
        doc = json.loads(path.read_text())
        if isinstance(doc, dict):
            return doc
        why = f"holds a {type(doc).__name__}, not an object"
    except (ValueError, UnicodeDecodeError) as e:
        why = f"is not valid JSON ({e})"
    aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    os.replace(path, aside)
    warnings.warn(f"{path} {why}: moved it aside to {aside} and started a new one", stacklevel=3)
    return {}


def save(lab: str, name: str, record, slug: str | None = None) -> Path:
    """Merge ``record`` into ``<lab>.json`` under key ``name`` with a fresh fingerprint (under a file
    lock, so concurrent writers all keep their sections)."""
    if not lab or not name:
        raise ValueError("save(lab, name, record) needs a lab (e.g. 'lab0') and a section name")
    path = lab_dir(slug) / f"{lab}.json"
    section, fingerprint = _jsonable(record), hardware.fingerprint()  # the slow parts, outside the lock
    with _locked(path.parent):
        doc = _read_or_set_aside(path)
        doc.setdefault("sections", {})[name] = section
        doc["fingerprint"] = fingerprint
        doc["lab"] = lab
        atomic_write_bytes(path, json.dumps(doc, indent=1, sort_keys=False).encode())
    return path


def save_figure(lab: str, name: str, fig, slug: str | None = None) -> Path:
    """Save a matplotlib figure as ``<lab>_<name>.png`` beside the JSON."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    path = lab_dir(slug) / f"{lab}_{name}.png"
    atomic_write_bytes(path, buf.getvalue())
    return path


def load(lab: str, slug: str | None = None) -> dict:
    """The saved document for ``lab`` (``{}`` if none yet)."""
    path = lab_dir(slug) / f"{lab}.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}): delete it, or save() into it once (it moves a "
                         f"corrupt file aside and starts a new one)") from None


def load_reference(lab: str, slug: str) -> dict:
    """A committed reference result from ``results/<slug>/`` (for comparison plots)."""
    path = REPO / "results" / slug / f"{lab}.json"
    return json.loads(path.read_text()) if path.exists() else {}
