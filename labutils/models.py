"""Model presets, loading with an offline fallback, the real Mistral tokenizer, and size math.

Loading order (``load``): an explicit local directory (argument or ``$SMML_<PRESET>_DIR``,
e.g. ``SMML_MISTRAL_7B_DIR``) -> the Hugging Face cache -> the hub when online (with a
progress bar; ``HF_TOKEN`` from the environment) -> the same architecture with seeded
random weights, written with ``save_pretrained`` and read back with ``from_pretrained``
so the real loading path always runs. Speed and memory are real with random weights;
text is not, and ``Loaded.note`` says so. Weights are read from safetensors only (never a
``.bin``: unpickling can run code); a truncated file is an error that names it, and a broken
cached random build is rebuilt in a fresh folder and renamed into place.

Used in lab0 §What a model is, lab1 §Baseline, lab2 §Memory, lab4 §Ladder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import hardware
from . import profile as _profile

MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


@dataclass(frozen=True)
class Preset:
    name: str
    hf_id: str | None  # None: a shrunk shape that exists only with random weights
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int = 32000
    max_position_embeddings: int = 32768
    rope_theta: float = 10000.0
    note: str = ""

    def config(self):
        from transformers import MistralConfig

        return MistralConfig(
            hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, vocab_size=self.vocab_size,
            max_position_embeddings=self.max_position_embeddings, rope_theta=self.rope_theta,
            sliding_window=None, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


PRESETS: dict[str, Preset] = {p.name: p for p in [
    # Real TinyMistral-248M has vocab 32005 and a 32-token sliding window; the random build
    # uses the 32000-entry Mistral tokenizer and full attention (same cost per token).
    Preset("mistral-tiny", "Locutusque/TinyMistral-248M", 1024, 4096, 12, 32, 8,
           note="TinyMistral-248M: Mistral architecture at 248M parameters"),
    Preset("mistral-7b", "mistralai/Mistral-7B-v0.1", 4096, 14336, 32, 32, 8,
           note="Mistral-7B v0.1: 7.24B parameters, GQA with 8 KV heads"),
    # small profile: same family, narrow and shallow, with grouped-query attention like the real ones
    # (8 heads share 4 KV heads); 8 and 4 divide every TP size the labs use on it (1, 2, 4)
    Preset("mistral-tiny-small", None, 256, 1024, 4, 8, 4, max_position_embeddings=4096,
           note="mistral-tiny shrunk for a laptop CPU (GQA: 8 heads, 4 KV heads)"),
    Preset("mistral-7b-small", None, 512, 1792, 4, 8, 4, max_position_embeddings=4096,
           note="mistral-7b shape ratios (intermediate = 3.5 x hidden) shrunk for a laptop CPU"),
]}


def preset(name: str) -> Preset:
    """The preset called ``name``; an unknown name lists the ones that exist."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(PRESETS)}") from None


def cache_dir() -> Path:
    return Path(os.environ.get("SMML_CACHE", Path.home() / ".cache" / "smml")).expanduser()


# ---------------------------------------------------------------- tokenizer
def tokenizer_file() -> Path:
    """The Mistral-7B v1 SentencePiece model shipped inside the mistral-common package."""
    import importlib.util

    # found without importing the package: on a GPU image it may sit there without its dependencies
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("mistral-common is not installed: pip install mistral-common "
                                  "(it ships the Mistral tokenizer file)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "tokenizer.model.v1"
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: reinstall mistral-common (pip install -U mistral-common)")
    return path


def check_tokenizer(tok, expected: int = 32000) -> None:
    if len(tok) != expected:
        raise ValueError(f"tokenizer has {len(tok)} entries, expected {expected}: load it with "
                         "LlamaTokenizer.from_pretrained(<dir with tokenizer.model>), not vocab_file=")


def load_tokenizer():
    """The real Mistral tokenizer (32000 entries, BOS added), with a Mistral [INST] chat template."""
    from transformers import LlamaTokenizer

    d = cache_dir() / "tokenizer-mistral-v1"
    if not (d / "tokenizer.model").exists():
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".tokenizer.model.{os.getpid()}"
        shutil.copyfile(tokenizer_file(), tmp)
        os.replace(tmp, d / "tokenizer.model")
    tok = LlamaTokenizer.from_pretrained(str(d), add_bos_token=True)
    check_tokenizer(tok)
    tok.chat_template = MISTRAL_CHAT_TEMPLATE
    tok.pad_token = tok.pad_token or tok.unk_token
    return tok


# ---------------------------------------------------------------- loading
@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    source: str  # "local", "cache", "hub" or "random"
    path: str
    note: str
    preset: Preset = field(repr=False, default=None)

    @property
    def real_weights(self) -> bool:
        return self.source != "random"


def _env_dir(p: Preset) -> str | None:
    return os.environ.get("SMML_" + p.name.upper().replace("-", "_") + "_DIR")


WEIGHTS, INDEX = "model.safetensors", "model.safetensors.index.json"  # the only weights ever read


def _has_weights(d: Path) -> bool:
    return (d / "config.json").exists() and ((d / WEIGHTS).exists() or (d / INDEX).exists())


def weight_files(d: Path) -> list[Path]:
    """The safetensors files a model folder's weights live in (one file, or the shards of its index)."""
    if (d / INDEX).exists():
        return sorted({d / f for f in json.loads((d / INDEX).read_text())["weight_map"].values()})
    return [d / WEIGHTS]


def check_safetensors(path: Path) -> None:
    """Raise ValueError naming ``path`` unless it is a whole safetensors file (header + every tensor)."""
    size = path.stat().st_size if path.exists() else None
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n)) if 8 < 8 + n <= size else None
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        whole = 8 + n + end == size
    except (OSError, TypeError, ValueError, KeyError, AttributeError):
        whole = False
    if not whole:
        raise ValueError(f"{path} is missing, truncated or corrupt ({size} bytes): download it again, or "
                         f"delete its folder {path.parent} so that it is rebuilt")


def _intact(d: Path) -> bool:
    try:
        return _has_weights(d) and all(check_safetensors(f) is None for f in weight_files(d))
    except (OSError, ValueError, KeyError):
        return False


def find_weights(name: str, local_dir: str | os.PathLike | None = None, allow_hub: bool = True):
    """(source, path) of real weights for preset ``name``, or None. Never raises for lack of network."""
    p = preset(name)
    explicit = local_dir or _env_dir(p)
    if explicit:
        d = Path(explicit).expanduser()
        if not _has_weights(d):
            bins = ", ".join(sorted(f.name for f in d.glob("*.bin"))) if d.is_dir() else ""
            raise FileNotFoundError(f"{d} has no config.json + {WEIGHTS} (or {INDEX}): point it at a downloaded "
                                    f"{p.hf_id or p.name} folder, or unset it to fall back"
                                    + (f". Only safetensors weights are read, never {bins}: convert them "
                                       f"(save_pretrained writes safetensors)" if bins else ""))
        return "local", str(d)
    if p.hf_id is None:
        return None
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer.model"]
    try:
        return "cache", snapshot_download(p.hf_id, allow_patterns=patterns, local_files_only=True)
    except Exception:  # noqa: BLE001 - not in the cache
        pass
    if not allow_hub or os.environ.get("HF_HUB_OFFLINE") == "1":
        return None
    try:
        return "hub", snapshot_download(p.hf_id, allow_patterns=patterns)
    except Exception:  # noqa: BLE001 - offline, gated, or no token: fall back
        return None


def random_weights_dir(name: str, seed: int = 0, dtype: torch.dtype = torch.bfloat16, device=None) -> Path:
    """Build preset ``name`` with seeded random weights and ``save_pretrained`` it (once; cached)."""
    from transformers import MistralForCausalLM

    p = preset(name)
    shape = f"h{p.hidden_size}-L{p.num_hidden_layers}-H{p.num_attention_heads}-kv{p.num_key_value_heads}"
    d = cache_dir() / "models" / f"{name}-{shape}-random-seed{seed}-{str(dtype).split('.')[-1]}"  # new shape: new dir
    if _intact(d):
        return d
    dev = torch.device(device) if device is not None else torch.device("cpu")
    torch.manual_seed(seed)
    with torch.device(dev):
        model = MistralForCausalLM(p.config()).to(dtype)
    d.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=d.parent, prefix=f".{d.name}."))  # a fresh folder, renamed into place
    try:
        model.save_pretrained(tmp)
        load_tokenizer().save_pretrained(tmp)
        _swap_in(tmp, d)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return d


def _swap_in(new: Path, d: Path) -> None:
    """Rename the complete folder ``new`` to ``d``; a broken ``d`` is renamed aside first, then deleted.
    If another process put an intact ``d`` there meanwhile, keep that one."""
    if _intact(d):
        return
    aside = d.with_name(f".{d.name}.broken-{os.getpid()}-{time.monotonic_ns()}")
    if d.exists():
        os.replace(d, aside)
    try:
        os.replace(new, d)
    except OSError:  # another process renamed its own rebuild in between
        if not _intact(d):
            raise
    shutil.rmtree(aside, ignore_errors=True)


def load(name: str | None = None, *, local_dir=None, dtype: str | torch.dtype | None = None, device=None,
         allow_hub: bool = True, seed: int = 0) -> Loaded:
    """Load preset ``name`` (default: the profile's mistral-tiny) by the order in the module doc."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prof = _profile.get()
    p = preset(name or prof.tiny_model)
    dt = getattr(torch, dtype) if isinstance(dtype, str) else (dtype or getattr(torch, prof.dtype))
    dev = torch.device(device) if device is not None else hardware.default_device()
    found = find_weights(p.name, local_dir, allow_hub)
    if found:
        source, path = found
        note = f"{p.name}: real weights from {source} ({path})"
        try:
            tok = AutoTokenizer.from_pretrained(path)
        except Exception:  # noqa: BLE001 - a weights-only folder: use the shipped tokenizer
            tok = load_tokenizer()
    else:
        source, path = "random", str(random_weights_dir(p.name, seed, dt, dev))
        why = ("a shrunk small-profile shape" if p.hf_id is None
               else "no local dir, not in the HF cache, hub not reached")
        note = (f"{p.name}: RANDOM weights (seed {seed}; {why}) - same architecture, so speed and memory "
                f"are real, but generated text is gibberish. Saved at {path} and loaded back with from_pretrained.")
        tok = load_tokenizer()
    for f in weight_files(Path(path)):
        check_safetensors(f)  # a truncated file: an error that names it, not deep inside safetensors
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dt, device_map=str(dev), use_safetensors=True)
    model.eval()
    return Loaded(model, tok, source, path, note, p)


# ---------------------------------------------------------------- size math
COMPONENTS = ("embeddings", "attention", "mlp", "norms", "head")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "float8": 1, "int4": 0.5}


def component_of(param_name: str) -> str:
    """Which of COMPONENTS a parameter belongs to, by its name in a HF Mistral model."""
    if "embed_tokens" in param_name:
        return "embeddings"
    if "lm_head" in param_name:
        return "head"
    if "self_attn" in param_name:
        return "attention"
    if "mlp" in param_name:
        return "mlp"
    if "norm" in param_name:
        return "norms"
    raise ValueError(f"parameter {param_name!r} fits none of {COMPONENTS}")


def count_by_component(model: torch.nn.Module) -> dict[str, int]:
    """Parameters per component, counted from the model itself (works on the meta device)."""
    out = dict.fromkeys(COMPONENTS, 0)
    for n, prm in model.named_parameters():
        out[component_of(n)] += prm.numel()
    return out


def meta_model(name: str):
    """Instantiate preset ``name`` on the meta device: shapes without memory (a 7B costs 0 bytes)."""
    from transformers import MistralForCausalLM

    with torch.device("meta"):
        return MistralForCausalLM(preset(name).config())


@dataclass(frozen=True)
class Estimate:
    name: str
    params: dict[str, int]  # per component
    total_params: int
    head_dim: int
    layers: int
    kv_heads: int
    hidden: int

    def weight_bytes(self, dtype: str = "bfloat16") -> float:
        return self.total_params * DTYPE_BYTES[dtype]

    def kv_bytes_per_token(self, dtype: str | float = "bfloat16") -> float:
        """K and V for every layer: 2 * layers * kv_heads * head_dim values per token (dtype: name or bytes)."""
        per_value = DTYPE_BYTES[dtype] if isinstance(dtype, str) else dtype
        return 2 * self.layers * self.kv_heads * self.head_dim * per_value

    def flops_per_token(self, context: int = 0) -> float:
        """Forward FLOPs for one token: 2 per weight it multiplies (embedding lookups are free)
        plus attention over ``context`` earlier tokens (QK^T and AV: 4 * layers * context * hidden)."""
        matmul_params = self.total_params - self.params["embeddings"] - self.params["norms"]
        return 2 * matmul_params + 4 * self.layers * context * self.hidden

    def decode_bytes_per_token(self, batch: int = 1, context: int = 0, dtype: str = "bfloat16") -> float:
        """Bytes a decode step must read per generated token: all weights once per step (shared by the
        batch) plus each sequence's KV cache."""
        return (self.weight_bytes(dtype) - self.params["embeddings"] * DTYPE_BYTES[dtype]) / batch + \
            context * self.kv_bytes_per_token(dtype)


def estimate(name: str) -> Estimate:
    """Parameter counts from the config alone (checked against the meta model in the tests)."""
    p = preset(name)
    h, i, L, V = p.hidden_size, p.intermediate_size, p.num_hidden_layers, p.vocab_size
    hd = h // p.num_attention_heads
    kv = p.num_key_value_heads * hd
    params = {
        "embeddings": V * h,
        "attention": L * (2 * h * h + 2 * h * kv),
        "mlp": L * 3 * h * i,
        "norms": L * 2 * h + h,
        "head": V * h,
    }
    return Estimate(p.name, params, sum(params.values()), hd, L, p.num_key_value_heads, h)
