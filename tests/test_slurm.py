"""A real two-node Slurm on this host (launch/slurm/local_cluster.py) runs the lab's own sbatch file.

The successful job is lab3's own (§Orchestrators, under nbval in make test): it trains on both nodes and must
repeat torchrun's losses bit for bit (fault.require_same_run), so it is not run a second time here.

Skipped, with the reason, where Slurm is not installed or we are not root (.ci/run installs it).
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

from labutils import launch

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("local_cluster", REPO / "launch/slurm/local_cluster.py")
local_cluster = sys.modules.setdefault("local_cluster", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(local_cluster)

WHY = local_cluster.unavailable()
pytestmark = pytest.mark.skipif(WHY is not None, reason=f"NOT RUN (real-Slurm test): {WHY}")
ENV = {"NPROC_PER_NODE": "2", "SMML_DIST_BACKEND": "gloo", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def cluster():
    c = local_cluster.LocalSlurm()
    c.start()
    scratch, marker = c.scratch, f"{local_cluster.MARKER}={c.scratch}"
    yield c
    c.stop()
    assert not scratch.exists(), "the scratch folder was left behind"
    left = [p.parent.name for p in Path("/proc").glob("[0-9]*/environ")
            if _has(p, marker.encode())]
    assert left == [], f"processes of the local cluster still alive after stop(): {left}"


def _has(environ: Path, needle: bytes) -> bool:
    try:
        return needle in environ.read_bytes().split(b"\0")
    except OSError:
        return False


def test_both_nodes_idle(cluster):
    info = cluster.sinfo()
    assert "node1 idle" in info and "node2 idle" in info, info


def test_a_lost_rank_fails_the_job(cluster):
    """Rank 1 (node 2; one rank per node here, the cheapest job that loses a node's rank) SIGKILLs itself: the
    job ends FAILED with that rank named, not a hang."""
    job = cluster.submit(REPO / "launch/slurm/train.sbatch", "--steps", "3", "--crash-at-step", "2",
                         "--crash-rank", "1", env=ENV | {"NPROC_PER_NODE": "1", "RDZV_PORT": str(launch.free_port())})
    r = cluster.wait(job, timeout=900)
    assert r.state == "FAILED", f"job {job} {r.state} ({r.exit_code}):\n{r.output[-3000:]}"
    assert "CRASH rank=1 step=2" in r.output
    assert re.search(r"rank\s*: 1 ", r.output) and re.search(r"exitcode\s*: -9", r.output), r.output[-3000:]
    assert "DONE" not in r.output
