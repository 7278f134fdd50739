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
