"""labutils.checkpoint: atomic files and folders, the newest complete checkpoint, weights_only loads.

The atomicity tests kill a writer halfway (SIGKILL, after it says it is writing) and check that the
previous checkpoint is still the one found and that it loads.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from labutils import checkpoint

REPO = Path(__file__).resolve().parent.parent

# A writer that saves a first checkpoint, then stalls halfway through the second one's bytes.
CHILD = r"""
import io, sys, time, torch
from labutils import checkpoint
mode, target = sys.argv[1], sys.argv[2]
if mode == "file":
    checkpoint.atomic_save({"v": torch.ones(4)}, target)
else:
    checkpoint.save(target, 2, shared={"v": torch.ones(4)}, local={"r": torch.arange(3)})
real = torch.save
def half_then_stall(obj, f):
    buf = io.BytesIO(); real(obj, buf); data = buf.getvalue()
    f.write(data[: len(data) // 2]); f.flush()
    print("writing", len(data), flush=True)
    time.sleep(600)
torch.save = half_then_stall
big = {"v": torch.zeros(1 << 20)}
if mode == "file":
    checkpoint.atomic_save(big, target)
else:
    checkpoint.save(target, 4, shared=big, local={"r": torch.arange(3)})
"""


def _kill_while_writing(mode: str, target: Path) -> None:
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-c", CHILD, mode, str(target)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = p.stdout.readline()  # waits for the signal line, however slow the machine
        assert line.startswith("writing"), f"the writer died first (rc {p.wait()})"
        p.send_signal(signal.SIGKILL)
        assert p.wait(timeout=60) == -signal.SIGKILL
    finally:
        if p.poll() is None:
            p.kill()
        p.stdout.close()


def test_atomic_save_killed_halfway_keeps_the_old_file(tmp_path):
    target = tmp_path / "model.pt"
    _kill_while_writing("file", target)
    assert torch.equal(checkpoint.load_file(target)["v"], torch.ones(4))  # the old one, whole
    assert list(tmp_path.glob(".model.pt.*.tmp")), "the half-written temp file should be the only trace"


def test_checkpoint_killed_halfway_leaves_the_previous_one_latest(tmp_path):
    _kill_while_writing("folder", tmp_path)
    ck = checkpoint.latest(tmp_path)
    assert ck is not None and ck.step == 2 and ck.kind == "plain"
    assert torch.equal(checkpoint.load_shared(ck)["v"], torch.ones(4))
    assert torch.equal(checkpoint.load_local(ck, 0)["r"], torch.arange(3))
    assert (tmp_path / ".step-00000004.partial").is_dir()  # ignored, and cleared by the next save of step 4
    checkpoint.save(tmp_path, 4, shared={"v": torch.full((2,), 4.0)})
    assert checkpoint.latest(tmp_path).step == 4 and not (tmp_path / ".step-00000004.partial").exists()


def test_incomplete_folders_are_not_checkpoints(tmp_path):
    checkpoint.save(tmp_path, 1, shared={"w": torch.ones(2)})
    bad = tmp_path / "step-00000009"  # a folder with the right name but a file missing from its meta
    bad.mkdir()
    (bad / "meta.json").write_text(json.dumps({"step": 9, "world": 1, "kind": "plain", "files": ["shared.pt"]}))
    (tmp_path / "step-00000010").mkdir()  # no meta at all
    assert checkpoint.latest(tmp_path).step == 1


def test_prune_keeps_the_newest(tmp_path):
    for step in (1, 2, 3, 4):
        checkpoint.save(tmp_path, step, shared={"s": torch.tensor(step)}, keep=2)
    assert [c.step for c in checkpoint.complete(tmp_path)] == [3, 4]
    assert int(checkpoint.load_shared(checkpoint.latest(tmp_path))["s"]) == 4
    with pytest.raises(ValueError, match="keep must be >= 1"):
        checkpoint.prune(tmp_path, 0)


def test_load_is_weights_only(tmp_path):
    """A checkpoint holding an arbitrary object (code to run on unpickling) is refused."""
    path = tmp_path / "evil.pt"
    torch.save({"x": Path("/")}, path)  # any non-tensor class: weights_only refuses to rebuild it
    with pytest.raises(Exception, match="[Ww]eights only load failed|WeightsUnpickler"):
        checkpoint.load_file(path)


def test_plain_and_sharded_kinds_are_not_mixed(tmp_path):
    ck = checkpoint.read(checkpoint.save(tmp_path, 1, shared={"w": torch.ones(1)}))
    with pytest.raises(ValueError, match="load_shared"):
        checkpoint.load_sharded(ck, None, None)


def test_latest_of_a_missing_folder_is_none(tmp_path):
    assert checkpoint.latest(tmp_path / "nothing-here") is None
