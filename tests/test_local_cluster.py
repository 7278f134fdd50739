"""launch/slurm/local_cluster.py without Slurm: one local cluster per host at a time (tests and notebooks may run
side by side under pytest-xdist); the cluster itself is tested in test_slurm.py where Slurm is installed."""

import fcntl

import pytest

from launch.slurm import local_cluster


def test_a_second_cluster_waits_for_the_host_lock_and_then_says_what_to_do(capsys, tmp_path, monkeypatch):
    # a lock of its own: the host's may be held right now by lab3 or test_slurm on another pytest-xdist worker
    monkeypatch.setattr(local_cluster, "HOST_LOCK", tmp_path / "smml-local-slurm.lock")
    with open(local_cluster.HOST_LOCK, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running cluster holds it
        other = local_cluster.LocalSlurm()
        with pytest.raises(RuntimeError, match=r"another local Slurm cluster held .* stop it"):
            other._take_host_lock(wait_s=1.0)
        assert "waiting for another local Slurm cluster" in capsys.readouterr().out
        assert other._lock is None
    other._take_host_lock(wait_s=1.0)  # free again once the holder lets go
    assert other._lock is not None
    other.stop()  # no cluster was started: stop() only drops the lock
    with open(local_cluster.HOST_LOCK, "a+") as again:
        fcntl.flock(again, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises BlockingIOError if the lock were still held
