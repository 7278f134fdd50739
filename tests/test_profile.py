import pytest
import torch

from labutils import profile


def test_default_follows_hardware(monkeypatch):
    monkeypatch.delenv("SMML_PROFILE", raising=False)
    expected = "full" if torch.cuda.is_available() else "small"
    assert profile.get().name == expected


def test_env_overrides(monkeypatch):
    monkeypatch.setenv("SMML_PROFILE", "full")
    assert profile.get().name == "full"
    monkeypatch.setenv("SMML_PROFILE", " Small ")
    assert profile.get().name == "small"


def test_unknown_profile_says_what_to_set(monkeypatch):
    monkeypatch.setenv("SMML_PROFILE", "huge")
    with pytest.raises(ValueError, match="SMML_PROFILE.*small, full"):
        profile.get()


def test_small_profile_fits_a_laptop():
    small, full = profile.get("small"), profile.get("full")
    assert max(small.gemm_square) <= 1024
    assert small.tiny_model.endswith("-small") and small.big_model.endswith("-small")
    assert small.world_size == small.nodes * small.procs_per_node
    assert full.nodes * full.procs_per_node == 8
    assert set(small.as_dict()) == set(full.as_dict())
