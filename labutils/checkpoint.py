"""Checkpoints that survive a crash at any instant: per-rank, atomic, resumable.

A checkpoint is a folder ``ROOT/step-00000012/``. It is written as ``ROOT/.step-00000012.partial/``
and renamed once every rank's files are in it and ``meta.json`` lists them, so a folder named
``step-*`` is always complete; a crash mid-write leaves only a ``.partial`` folder (or a temp file)
that ``latest`` ignores and the next save clears.

- ``atomic_save(obj, path)``: ``torch.save`` to a temp file in the same folder, flush, fsync,
  rename; a reader sees the old file or the new one, never half of one. ``load_file`` reads it
  back with ``torch.load(..., weights_only=True)`` (tensors and plain containers only: loading a
  checkpoint cannot run code).
- ``save(root, step, ctx, shared=..., local=...)``: the plain (DDP) checkpoint: ``shared`` is
  the state every rank holds alike (model, optimizer), written once by rank 0; ``local`` is each
  rank's own (its RNG state), written by every rank as ``rank-00003.pt``.
- ``save_sharded(root, step, model, optimizer, ctx)``: FSDP2's sharded state through
  ``torch.distributed.checkpoint`` (DCP): ``get_state_dict`` gives each rank its shards, DCP writes
  them with one metadata file, ``load_sharded`` reads them back into the sharded model with
  ``set_state_dict`` (a different world size reshards on load).
- ``latest(root)``: the newest complete checkpoint, or None.

The folder must be one every rank can reach (a shared file system on a cluster; here one disk).

Used in lab3 §Fault tolerance.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

META = "meta.json"
SHARED = "shared.pt"


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: Path
    world: int
    kind: str  # "plain" (save) or "dcp" (save_sharded)
    files: tuple[str, ...]

    def as_dict(self) -> dict:
        return {"step": self.step, "path": str(self.path), "world": self.world, "kind": self.kind}


# ---------------------------------------------------------------- one file
def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself is durable only once the folder is synced
    finally:
        os.close(fd)


def atomic_save(obj, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically: temp file beside it, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def load_file(path: str | os.PathLike):
    """What ``atomic_save`` wrote: tensors and plain containers only (``weights_only=True``)."""
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------- a checkpoint folder
def _name(step: int) -> str:
    return f"step-{step:08d}"


def _rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _rank_world(ctx) -> tuple[int, int]:
    return (ctx.rank, ctx.world) if ctx is not None else (0, 1)


def _begin(root: Path, step: int, rank: int) -> Path:
    """Rank 0 makes a fresh ``.partial`` folder (clearing one a crash left); the others wait for it."""
    tmp = root / f".{_name(step)}.partial"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    return tmp


def _commit(root: Path, tmp: Path, step: int, world: int, kind: str, rank: int, keep: int | None) -> Path:
    """After every rank wrote: rank 0 lists the files in meta.json and renames the folder into place."""
    _barrier()
    final = root / _name(step)
    if rank == 0:
        files = sorted(p.name for p in tmp.iterdir() if not p.name.endswith(".tmp"))
        meta = {"step": step, "world": world, "kind": kind, "files": files, "saved_at": time.time()}
        (tmp / META).write_text(json.dumps(meta, indent=1))
        _fsync_dir(tmp)
        if final.exists():  # the same step saved again after a restart: the new one replaces it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        if keep:
            prune(root, keep)
    _barrier()
    return final


def save(root, step: int, ctx=None, *, shared: dict | None = None, local: dict | None = None,
         keep: int | None = 2) -> Path:
    """A plain checkpoint: ``shared`` written by rank 0 only, ``local`` by every rank (all ranks call).

    ``ctx`` is ``labutils.dist.init()``'s context (None: a world of one). Keeps the newest ``keep``.
    """
    root = Path(root)
    rank, world = _rank_world(ctx)
    tmp = _begin(root, step, rank)
    if rank == 0 and shared is not None:
        atomic_save(shared, tmp / SHARED)
    if local is not None:
        atomic_save(local, tmp / _rank_file(rank))
    return _commit(root, tmp, step, world, "plain", rank, keep)


def save_sharded(root, step: int, model, optimizer, ctx=None, *, local: dict | None = None,
                 keep: int | None = 2) -> Path:
    """FSDP2 (or any) model + optimizer through torch.distributed.checkpoint; every rank calls."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root = Path(root)
    rank, world = _rank_world(ctx)
    tmp = _begin(root, step, rank)
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp))
    if local is not None:
        atomic_save(local, tmp / _rank_file(rank))
    return _commit(root, tmp, step, world, "dcp", rank, keep)


def load_sharded(ckpt: Checkpoint, model, optimizer) -> None:
    """Read a ``save_sharded`` checkpoint into ``model`` and ``optimizer`` (already sharded)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    _check_kind(ckpt, "dcp")
    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(ckpt.path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def load_shared(ckpt: Checkpoint) -> dict:
    _check_kind(ckpt, "plain")
    return load_file(ckpt.path / SHARED)


def load_local(ckpt: Checkpoint, rank: int) -> dict | None:
    """This rank's own file, or None when the checkpoint was saved by fewer ranks."""
    p = ckpt.path / _rank_file(rank)
    return load_file(p) if p.exists() else None


def _check_kind(ckpt: Checkpoint, kind: str) -> None:
    if ckpt.kind != kind:
        fix = "load_sharded" if ckpt.kind == "dcp" else "load_shared / load_local"
        raise ValueError(f"{ckpt.path} is a {ckpt.kind!r} checkpoint, not {kind!r}: read it with {fix}")


# ---------------------------------------------------------------- finding them
def read(path) -> Checkpoint | None:
    """The checkpoint in folder ``path`` if it is complete (meta.json and every file it lists)."""
    path = Path(path)
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, ValueError):
        return None
    files = tuple(meta.get("files", ()))
    if not all((path / f).exists() for f in files):
        return None
    return Checkpoint(int(meta["step"]), path, int(meta["world"]), str(meta["kind"]), files)


def complete(root) -> list[Checkpoint]:
    """Every complete checkpoint under ``root``, oldest first (``.partial`` folders never count)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = (read(p) for p in sorted(root.glob("step-*")) if p.is_dir())
    return sorted((c for c in found if c is not None), key=lambda c: c.step)


def latest(root) -> Checkpoint | None:
    """The newest complete checkpoint under ``root``, or None: where a restarted job resumes."""
    done = complete(root)
    return done[-1] if done else None


def prune(root, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1 (the checkpoint a restart resumes from), got {keep}")
    for c in complete(root)[:-keep]:
        shutil.rmtree(c.path, ignore_errors=True)
