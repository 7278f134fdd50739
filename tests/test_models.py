import pytest
import torch

from labutils import models


def test_unknown_model_lists_presets():
    with pytest.raises(ValueError, match="mistral-tiny.*mistral-7b"):
        models.preset("mistral-70b")


def test_real_tokenizer_has_32000_entries_and_bos():
    tok = models.load_tokenizer()
    assert len(tok) == 32000
    ids = tok("Hello world").input_ids
    assert ids[0] == tok.bos_token_id == 1
    assert tok.decode(ids, skip_special_tokens=True) == "Hello world"
    assert "[INST]" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


def test_a_wrongly_built_tokenizer_is_refused():
    class Broken:
        def __len__(self):
            return 3

    with pytest.raises(ValueError, match="expected 32000.*from_pretrained"):
        models.check_tokenizer(Broken())


@pytest.mark.parametrize("name", list(models.PRESETS))
def test_estimate_matches_the_meta_model(name):
    est = models.estimate(name)
    assert models.count_by_component(models.meta_model(name)) == est.params


def test_mistral_7b_numbers():
    est = models.estimate("mistral-7b")
    assert est.total_params == pytest.approx(7.24e9, rel=0.01)
    assert est.kv_bytes_per_token("bfloat16") == 2 * 32 * 8 * 128 * 2  # 128 KiB per token
    assert est.flops_per_token(0) == 2 * (est.total_params - est.params["embeddings"] - est.params["norms"])
    assert est.flops_per_token(100) - est.flops_per_token(0) == 4 * 32 * 100 * 4096


def test_load_small_model_offline_falls_back_to_random_and_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("SMML_CACHE", str(tmp_path))
    a = models.load("mistral-tiny-small", dtype="float32", device="cpu")
    assert a.source == "random" and not a.real_weights and "RANDOM" in a.note
    b = models.load("mistral-tiny-small", dtype="float32", device="cpu")
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(p, q), n  # seeded: the same weights every time
    ids = a.tokenizer("The sky is", return_tensors="pt").input_ids
    logits = a.model(ids).logits
    assert logits.shape == (1, ids.shape[1], 32000) and torch.isfinite(logits).all()


def test_explicit_local_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("SMML_CACHE", str(tmp_path))
    d = models.random_weights_dir("mistral-tiny-small", dtype=torch.float32)
    got = models.load("mistral-tiny-small", local_dir=d, dtype="float32", device="cpu")
    assert got.source == "local" and got.real_weights
    with pytest.raises(FileNotFoundError, match="config.json"):
        models.load("mistral-tiny-small", local_dir=tmp_path / "nothing", device="cpu")
    monkeypatch.setenv("SMML_MISTRAL_TINY_SMALL_DIR", str(d))
    assert models.find_weights("mistral-tiny-small") == ("local", str(d))


# ---------------------------------------------------------------- hardening (issue 10)
@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One random small model (float32), built once in a cache of this module's own."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SMML_CACHE", str(cache))
        d = models.random_weights_dir("mistral-tiny-small", dtype=torch.float32)
    return cache, d


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_weights_come_from_safetensors_only(built, tmp_path):
    from safetensors.torch import save_file

    _, src = built
    zeros = {n: torch.zeros_like(p) for n, p in
             models.load("mistral-tiny-small", local_dir=src, dtype="float32", device="cpu").model.state_dict().items()}
    only_bin = _copy(src, tmp_path / "bin")
    (only_bin / "model.safetensors").unlink()
    torch.save(zeros, only_bin / "pytorch_model.bin")
    save_file({"x": torch.zeros(2)}, only_bin / "adapter.safetensors")  # some other safetensors file
    with pytest.raises(FileNotFoundError, match=r"model.safetensors.*never pytorch_model.bin"):
        models.load("mistral-tiny-small", local_dir=only_bin, dtype="float32", device="cpu")
    both = _copy(src, tmp_path / "both")
    torch.save(zeros, both / "pytorch_model.bin")
    got = models.load("mistral-tiny-small", local_dir=both, dtype="float32", device="cpu").model
    assert all(p.abs().sum() > 0 for n, p in got.named_parameters() if "norm" not in n)  # not the .bin's zeros


def test_a_broken_cache_entry_is_rebuilt(built, monkeypatch, tmp_path):
    cache = _copy(built[0], tmp_path / "cache")  # a cache of its own: the other tests keep an intact one
    d = cache / built[1].relative_to(built[0])
    monkeypatch.setenv("SMML_CACHE", str(cache))
    first = _params(models.load("mistral-tiny-small", dtype="float32", device="cpu").model)
    weights, size = d / "model.safetensors", (d / "model.safetensors").stat().st_size
    for damage in ("delete", "truncate"):
        if damage == "delete":
            weights.unlink()
        else:
            data = weights.read_bytes()
            weights.write_bytes(data[: len(data) // 2])
        got = models.load("mistral-tiny-small", dtype="float32", device="cpu")
        assert got.source == "random" and got.path == str(d) and weights.stat().st_size == size, damage
        for n, p in got.model.named_parameters():
            assert torch.equal(p, first[n]), (damage, n)
    assert not [p for p in d.parent.iterdir() if p.name.startswith(".")]  # no temp or set-aside folder left


def test_a_truncated_weights_file_error_names_it(built, tmp_path):
    _, src = built
    local = _copy(src, tmp_path / "local")
    data = (local / "model.safetensors").read_bytes()
    (local / "model.safetensors").write_bytes(data[:-1000])
    with pytest.raises(ValueError, match=rf"{local / 'model.safetensors'} is missing, truncated or corrupt"):
        models.load("mistral-tiny-small", local_dir=local, dtype="float32", device="cpu")
