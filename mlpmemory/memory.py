"""The MLP Memory network: an all-MLP model that maps a base LM's hidden state to the kNN
retriever's next-token distribution (docs/method.md#the-memory, #loss, #mixing).

Why it looks like this:

- **No attention, no token embedding.** The input is the frozen base LM's hidden state at one
  site (by default the last layer's FFN input, ``mem_site="last"``), which already carries the context. The memory is
  stateless per position, so generation reuses only the base LM's KV cache.
- **The base family's own block.** ``L`` pre-norm residual blocks ``h = h + FFN(Norm(h))``, then a
  final norm and an LM head d -> |V| without bias. Llama-like bases get RMSNorm + SwiGLU with the
  base's intermediate size; GPT-2-like bases get LayerNorm + a d -> 4d -> d tanh-GELU MLP; anything
  else gets LayerNorm + exact-GELU MLP ("generic").
- **Head from the base's output embedding** (default ``head_init="embedding"``): it helped for
  SmolLM2 (docs/method.md#measured-on-this-project), so the memory starts from the base's vocabulary
  geometry. Whether the base's final-norm gain suits the memory's input depends on the family
  (Gemma's (1 + w) gains average ~26), so nothing is trusted blindly: :func:`calibrate_final_norm`
  picks the gain (copied or unit, times a scale) with the lowest cross-entropy on stored validation
  rows, and the check (against uniform and the base LM's own cross-entropy) goes into the training
  manifest.
- **A sparse objective.** kNN targets are stored as CSR rows (~hundreds of non-zeros out of |V|).
  ``KL(p || q) = sum_{i in S} p_i (log p_i - log q_i)`` needs ``log q`` only at the target's ids, so
  :func:`sparse_kl` / :func:`memory_loss` never build a dense |V| target (the public code does, in a
  Python loop). One logsumexp per row serves both KL and cross-entropy, in float32.
  Training uses :func:`fused_memory_loss`, the same objective with the head matmul fused in and
  the gradient of the logits formed in the forward, in cache-sized row chunks (1.65x faster on
  CPU; see the comment above it). :func:`memory_loss` stays as the plain reference.
- **Safe, checked checkpoints.** ``config.json`` + ``model.safetensors`` (no pickle), written via
  temp files + rename; the config is also stored in the safetensors metadata so a config and
  weights from different saves are detected. Loading next to a base LM refuses a base or tokenizer
  whose fingerprint differs from the one the memory was trained for.

Presets (:data:`PRESETS`): ``tiny`` = 2 blocks (tests, smoke runs), ``small`` = 4 blocks (our
calibration run and the default), ``base`` = 8 blocks (the paper's "1B" memory for 7B bases), ``parity`` =
as many blocks as give the memory the base model's parameter count (the paper's GPT-2 setting:
18/36/54 blocks for GPT-2 small/medium/large). The head counts in every parameter total.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .capture import CaptureSite, _get, resolve_site
from .errors import MLPMemError
from .io import atomic_path, atomic_write_json, read_json
from .models import resolve_dtype

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TENSORS_SHA256 = "mlpmemory_tensors_sha256"  # safetensors metadata: the weights' own checksum


def tensors_sha256(state, get=None) -> str:
    """Hash of a state dict's tensors (names, shapes, dtypes, bytes) in name order: the same weights give
    the same hash, whatever order a safetensors header lists them in. ``get`` (name -> tensor) reads one
    tensor at a time, e.g. from an open safetensors file; ``state`` is then just the names."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(state):
        t = (get(name) if get is not None else state[name]).detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def check_weights(path: Path, state: dict, stored_sha256: str | None) -> None:
    """Refuse weights that differ from the checksum saved with them, or hold NaN / inf (one line, naming the file)."""
    if stored_sha256 is not None and tensors_sha256(state) != stored_sha256:
        raise MLPMemError(f"{path} does not match the checksum saved with it (corrupted); "
                          "train or save the memory again (e.g. delete it and re-run `mlpmem train`)")
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise MLPMemError(f"{path}: tensor {name} holds NaN or inf values (corrupted); "
                              "train or save the memory again (e.g. delete it and re-run `mlpmem train`)")
FAMILIES = ("llama", "gpt2", "generic")
HEAD_INITS = ("embedding", "random")
PRESETS = {"tiny": {"n_blocks": 2}, "small": {"n_blocks": 4}, "base": {"n_blocks": 8}, "parity": {"param_ratio": 1.0}}
DEFAULT_PRESET = "small"

_LLAMA_TYPES = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "smollm", "olmo", "granite", "phi3",
                "internlm", "deepseek")
_GPT2_TYPES = ("gpt2", "gpt_neo", "gpt_neox", "gptj", "gpt_bigcode", "bloom", "falcon")
# Where the base's final norm lives, relative to ``model.base_model``.
_FINAL_NORM_PATHS = ("norm", "ln_f", "final_layer_norm", "norm_f", "final_layernorm", "decoder.final_layer_norm")


@dataclass
class MLPMemoryConfig:
    hidden_size: int  # d of the base's hidden state at the input site
    vocab_size: int  # rows of the base's output embedding
    n_blocks: int
    intermediate_size: int
    family: str = "llama"  # "llama" (RMSNorm + SwiGLU), "gpt2" (LayerNorm + tanh-GELU), "generic" (LayerNorm + GELU)
    norm_eps: float = 1e-5
    base_model: str = ""
    base_fingerprint: str = ""
    tokenizer_fingerprint: str = ""
    input_site: dict = field(default_factory=dict)  # {"module": ..., "layer": ..., "n_layers": ...}
    lambda_default: float = 0.25  # interpolation weight of the memory at inference
    head_init: str = "embedding"  # "embedding" (copy the base's output embedding) or "random"
    # The final norm's initial gain: {"source": "base" (copied) | "unit", "scale": s}, chosen on stored rows
    # by calibrate_final_norm; {} = copied from the base as is (memories saved before the calibration).
    init_norm: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise MLPMemError(f"unknown memory family {self.family!r}; choose one of {', '.join(FAMILIES)}")
        if self.head_init not in HEAD_INITS:
            raise MLPMemError(f"unknown head_init {self.head_init!r}; choose one of {', '.join(HEAD_INITS)}")
        for name in ("hidden_size", "vocab_size", "n_blocks", "intermediate_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise MLPMemError(f"memory {name} must be a positive integer, got {getattr(self, name)!r}")
        if not 0.0 <= self.lambda_default <= 1.0:
            raise MLPMemError(f"lambda_default must be within [0, 1], got {self.lambda_default}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> MLPMemoryConfig:
        """Unknown keys are ignored (forward compatibility); missing required keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in d.items() if k in names})
        except TypeError as e:
            raise MLPMemError(f"invalid memory config ({e}); re-create it with memory_config_for") from None


def detect_family(model_type: str) -> str:
    model_type = (model_type or "").lower()
    if model_type.startswith(_GPT2_TYPES):
        return "gpt2"
    if model_type.startswith(_LLAMA_TYPES):
        return "llama"
    return "generic"


class RMSNorm(nn.Module):
    """Llama's RMSNorm: normalise in float32, scale, cast back."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class SwiGLU(nn.Module):
    def __init__(self, config: MLPMemoryConfig):
        super().__init__()
        d, inner = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, inner, bias=False)
        self.up_proj = nn.Linear(d, inner, bias=False)
        self.down_proj = nn.Linear(inner, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GeluMLP(nn.Module):
    def __init__(self, config: MLPMemoryConfig):
        super().__init__()
        self.fc_in = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc_out = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = nn.GELU(approximate="tanh" if config.family == "gpt2" else "none")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.act(self.fc_in(x)))


def _make_norm(config: MLPMemoryConfig) -> nn.Module:
    if config.family == "llama":
        return RMSNorm(config.hidden_size, config.norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.norm_eps)


class MemoryBlock(nn.Module):
    """One pre-norm residual block: h + FFN(Norm(h))."""

    def __init__(self, config: MLPMemoryConfig):
        super().__init__()
        self.norm = _make_norm(config)
        self.ffn = SwiGLU(config) if config.family == "llama" else GeluMLP(config)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.ffn(self.norm(h))


class MLPMemory(nn.Module):
    def __init__(self, config: MLPMemoryConfig):
        super().__init__()
        self.config = config
        self.blocks = nn.ModuleList(MemoryBlock(config) for _ in range(config.n_blocks))
        self.norm = _make_norm(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def hidden_forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., d) base hidden states -> (..., d) final normed states (the head's input)."""
        h = hidden.to(self.lm_head.weight.dtype)
        for block in self.blocks:
            h = block(h)
        return self.norm(h)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., d) base hidden states -> (..., V) memory logits."""
        return self.lm_head(self.hidden_forward(hidden))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``model.safetensors`` then ``config.json``, each via a temp file + rename."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors, seen = {}, set()
        for name, t in self.state_dict().items():
            t = t.detach().cpu().contiguous()
            ptr = t.untyped_storage().data_ptr()
            tensors[name] = t.clone() if ptr in seen else t  # safetensors refuses shared storage
            seen.add(ptr)
        config = self.config.to_dict()
        with atomic_path(directory / WEIGHTS_NAME) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt", TENSORS_SHA256: tensors_sha256(tensors),
                                                   "mlpmemory_config": json.dumps(config, sort_keys=True)})
        atomic_write_json(directory / CONFIG_NAME, config)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, base=None, device=None, dtype=None) -> MLPMemory:
        """Load a saved memory; with ``base`` (a LoadedModel), refuse a base it was not trained for."""
        from safetensors import safe_open

        directory = Path(directory)
        if not (directory / CONFIG_NAME).exists() or not (directory / WEIGHTS_NAME).exists():
            raise MLPMemError(f"{directory} is not a saved MLP memory (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
        raw = read_json(directory / CONFIG_NAME)
        config = MLPMemoryConfig.from_dict(raw)
        if base is not None:
            check_base(config, base)
        try:
            with safe_open(str(directory / WEIGHTS_NAME), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                stored = meta.get("mlpmemory_config")
                state = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for truncated/garbled files
            raise MLPMemError(f"{directory / WEIGHTS_NAME} is unreadable ({type(e).__name__}: {e}); "
                              "the file is corrupted, save or train the memory again") from None
        if stored is not None and json.loads(stored) != config.to_dict():
            raise MLPMemError(f"{directory}: {CONFIG_NAME} and {WEIGHTS_NAME} come from different saves; "
                              "save the memory again")
        check_weights(directory / WEIGHTS_NAME, state, meta.get(TENSORS_SHA256))
        with torch.device("meta"):
            memory = cls(config)
        try:
            memory.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0]
            raise MLPMemError(f"{directory / WEIGHTS_NAME} does not match its config ({first})") from None
        if isinstance(dtype, str):  # "float32", "bfloat16", "float16" or "auto" (as for the base)
            dtype = resolve_dtype(dtype, device or "cpu")
        return memory.to(device=device, dtype=dtype).eval()


def check_base(config: MLPMemoryConfig, base) -> None:
    """Refuse a base LM (or tokenizer) other than the one the memory was built for."""
    if config.base_fingerprint and base.fingerprint != config.base_fingerprint:
        raise MLPMemError(f"this memory was trained for base model {config.base_model!r} (fingerprint "
                          f"{config.base_fingerprint}); the given base is {base.name!r} ({base.fingerprint})")
    if config.tokenizer_fingerprint and base.tokenizer_fingerprint != config.tokenizer_fingerprint:
        raise MLPMemError(f"this memory was trained with the tokenizer of {config.base_model!r} (fingerprint "
                          f"{config.tokenizer_fingerprint}); the given base {base.name!r} has tokenizer "
                          f"{base.tokenizer_fingerprint}")


def count_parameters(config: MLPMemoryConfig, n_blocks: int | None = None) -> int:
    """Parameters of a memory with this config (optionally another block count), head included."""
    d, inner, n = config.hidden_size, config.intermediate_size, config.n_blocks if n_blocks is None else n_blocks
    norm = d if config.family == "llama" else 2 * d
    ffn = 3 * d * inner if config.family == "llama" else 2 * d * inner + inner + d
    return n * (norm + ffn) + norm + d * config.vocab_size


def memory_config_for(lm, input_site, *, n_blocks=None, intermediate_size=None, param_ratio=None, preset=None,
                      lambda_default=0.25, head_init="embedding") -> MLPMemoryConfig:
    """A memory config matched to a loaded base LM. Size with exactly one of ``n_blocks``,
    ``param_ratio`` (memory params / base params, head included) or ``preset``; default "small"."""
    given = [k for k, v in (("n_blocks", n_blocks), ("param_ratio", param_ratio), ("preset", preset)) if v is not None]
    if len(given) > 1:
        raise MLPMemError(f"size the memory with one of n_blocks, param_ratio or preset, not {' and '.join(given)}")
    if not given:
        preset = DEFAULT_PRESET
    if preset is not None:
        if preset not in PRESETS:
            raise MLPMemError(f"unknown memory preset {preset!r}; choose one of {', '.join(PRESETS)}")
        n_blocks, param_ratio = PRESETS[preset].get("n_blocks"), PRESETS[preset].get("param_ratio")
    if isinstance(input_site, CaptureSite):
        input_site = input_site.to_dict()
    elif not isinstance(input_site, dict):
        input_site = resolve_site(lm.model, input_site).to_dict()
    cfg = lm.model.config
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    family = detect_family(getattr(cfg, "model_type", ""))
    head = lm.model.get_output_embeddings()
    if head is None:
        raise MLPMemError(f"{lm.name!r} has no output embedding; the memory needs a causal LM with an LM head")
    vocab, d = head.weight.shape
    if intermediate_size is None:
        for attr in ("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size"):
            if isinstance(getattr(cfg, attr, None), int):
                intermediate_size = getattr(cfg, attr)
                break
        else:
            intermediate_size = 4 * d
    eps = next((float(getattr(cfg, a)) for a in ("rms_norm_eps", "layer_norm_epsilon", "layer_norm_eps", "norm_epsilon")
                if isinstance(getattr(cfg, a, None), (int, float))), 1e-5)
    config = MLPMemoryConfig(hidden_size=int(d), vocab_size=int(vocab), n_blocks=int(n_blocks or 1),
                             intermediate_size=int(intermediate_size), family=family, norm_eps=eps,
                             base_model=lm.name, base_fingerprint=lm.fingerprint,
                             tokenizer_fingerprint=lm.tokenizer_fingerprint, input_site=dict(input_site),
                             lambda_default=float(lambda_default), head_init=head_init)
    if param_ratio is not None:
        if param_ratio <= 0:
            raise MLPMemError(f"param_ratio must be positive, got {param_ratio}")
        target = param_ratio * sum(p.numel() for p in lm.model.parameters())  # tied weights counted once
        per_block = count_parameters(config, 1) - count_parameters(config, 0)
        guess = (target - count_parameters(config, 0)) / per_block
        candidates = {max(1, math.floor(guess)), max(1, math.ceil(guess))}
        config.n_blocks = min(candidates, key=lambda n: (abs(count_parameters(config, n) - target), n))
    return config


@torch.no_grad()
def build_memory(lm, config: MLPMemoryConfig) -> MLPMemory:
    """A freshly initialised float32 memory on CPU; with ``head_init="embedding"`` its head is the
    base's output embedding and its final norm the base's final norm (when shapes match)."""
    check_base(config, lm)
    memory = MLPMemory(config)
    if config.head_init == "embedding":
        emb = lm.model.get_output_embeddings().weight
        if tuple(emb.shape) != (config.vocab_size, config.hidden_size):
            raise MLPMemError(f"the base's output embedding is {tuple(emb.shape)} but the memory head is "
                              f"{(config.vocab_size, config.hidden_size)}; use head_init='random' or a matching config")
        memory.lm_head.weight.copy_(emb.detach().float().cpu())
        backbone = getattr(lm.model, "base_model", lm.model)
        norm = next((m for m in (_get(backbone, p) for p in _FINAL_NORM_PATHS) if isinstance(m, nn.Module)), None)
        weight = getattr(norm, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.shape == memory.norm.weight.shape:
            offset = 1.0 if type(norm).__name__.startswith("Gemma") else 0.0  # Gemma scales by (1 + weight)
            memory.norm.weight.copy_(weight.detach().float().cpu() + offset)
            bias, own_bias = getattr(norm, "bias", None), getattr(memory.norm, "bias", None)
            if isinstance(bias, torch.Tensor) and own_bias is not None and bias.shape == own_bias.shape:
                own_bias.copy_(bias.detach().float().cpu())
    return memory


# Scales of the final norm's gain tried by calibrate_final_norm (logits are linear in it).
CALIBRATION_SCALES = (2.0 ** -10, *(2.0 ** e for e in range(-6, 4)))  # 2**-10: next to uniform
UNIFORM_TOLERANCE = 0.01  # nats: "not worse than uniform", up to the sample's noise


def _unit_normed(memory: MLPMemory, x: torch.Tensor) -> torch.Tensor:
    """The memory's final-norm input normalised, before the norm's own gain and bias (float32)."""
    h = x.float()
    for block in memory.blocks:
        h = block(h)
    if isinstance(memory.norm, RMSNorm):
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + memory.norm.eps)
    return F.layer_norm(h, (h.shape[-1],), eps=memory.norm.eps)


def _scaled_ce(memory, normed, targets, gain, bias, scales, chunk: int) -> list[float]:
    """Mean cross-entropy of ``targets`` under head(s * (normed * gain + bias)) for every scale s."""
    totals = [0.0] * len(scales)
    weight = memory.lm_head.weight.float()
    for s0 in range(0, len(normed), chunk):
        z = (normed[s0:s0 + chunk] * gain + bias) @ weight.T
        true = z.gather(-1, targets[s0:s0 + chunk, None])[:, 0]
        for i, s in enumerate(scales):
            totals[i] += float((torch.logsumexp(z * s, -1) - true * s).sum())
    return [x / len(normed) for x in totals]


@torch.no_grad()
def calibrate_final_norm(memory: MLPMemory, inputs, targets, base_logprob=None, rows: int = 256) -> dict:
    """Choose the final norm's initial gain on stored rows, so that no family starts badly.

    The memory reads a hidden state from *inside* the base model, so whether the base's final-norm
    gain fits it depends on the family (Gemma's (1 + w) gains average ~26: copied, the untrained
    memory starts at cross-entropy ~95 where uniform is 12.5). Candidates: the copied gain (and bias)
    and a unit gain, each times a scale in :data:`CALIBRATION_SCALES`; the one with the lowest
    cross-entropy on ``rows`` evenly spaced rows (``inputs`` (N, d), ``targets`` (N,)) is set and
    recorded in ``config.init_norm``. Returns the check: every candidate's cross-entropy, the
    uniform one (log V) and, given ``base_logprob``, the base LM's own on the same rows.
    """
    idx = np.unique(np.linspace(0, len(targets) - 1, min(rows, len(targets))).astype(np.int64))
    device = memory.lm_head.weight.device  # CPU when built by build_memory; the memory's device whatever it is
    x = torch.from_numpy(np.asarray(inputs[idx], dtype=np.float32)).to(device)
    y = torch.from_numpy(np.asarray(targets[idx], dtype=np.int64)).to(device)
    normed = _unit_normed(memory, x)
    norm = memory.norm
    bias = norm.bias.detach().clone() if getattr(norm, "bias", None) is not None else torch.zeros_like(norm.weight)
    sources = {"base": (norm.weight.detach().clone(), bias),
               "unit": (torch.ones_like(norm.weight), torch.zeros_like(bias))}
    chunk = max(1, (64 << 20) // (4 * memory.config.vocab_size))
    ce = {name: _scaled_ce(memory, normed, y, g, b, CALIBRATION_SCALES, chunk) for name, (g, b) in sources.items()}
    best = min(((name, i) for name in ce for i in range(len(CALIBRATION_SCALES))), key=lambda k: ce[k[0]][k[1]])
    scale = CALIBRATION_SCALES[best[1]]
    norm.weight.copy_(sources[best[0]][0] * scale)
    if getattr(norm, "bias", None) is not None:
        norm.bias.copy_(sources[best[0]][1] * scale)
    memory.config.init_norm = {"source": best[0], "scale": scale}
    check = {"rows": int(len(idx)), "uniform_ce": math.log(memory.config.vocab_size), "chosen": memory.config.init_norm,
             "ce": ce[best[0]][best[1]], "ce_copied_as_is": ce["base"][CALIBRATION_SCALES.index(1.0)],
             "candidates": {name: dict(zip(map(str, CALIBRATION_SCALES), v)) for name, v in ce.items()}}
    if base_logprob is not None:
        check["base_lm_ce"] = float(-np.mean(np.asarray(base_logprob, dtype=np.float64)[idx]))
    if check["ce"] > check["uniform_ce"] + UNIFORM_TOLERANCE:
        raise MLPMemError(f"the initial memory starts worse than uniform (cross-entropy {check['ce']:.2f} > "
                          f"{check['uniform_ce']:.2f}) at every calibrated gain; use --head-init random")
    return check


def _rows(offsets: torch.Tensor, nnz: int) -> torch.Tensor:
    """The row of every CSR entry, without a host sync."""
    b = offsets.shape[0] - 1
    return torch.repeat_interleave(torch.arange(b, device=offsets.device), offsets[1:] - offsets[:-1], output_size=nnz)


def _sparse_kl(logits32, lse, offsets, token_ids, probs) -> torch.Tensor:
    if offsets.shape[0] != logits32.shape[0] + 1 or token_ids.shape != probs.shape:
        raise ValueError(f"CSR shapes do not fit: logits {tuple(logits32.shape)}, offsets {tuple(offsets.shape)}, "
                         f"token_ids {tuple(token_ids.shape)}, probs {tuple(probs.shape)}")
    device = logits32.device
    token_ids, probs = token_ids.to(device=device, dtype=torch.long), probs.to(device=device, dtype=torch.float32)
    rows = _rows(offsets.to(device=device, dtype=torch.long), token_ids.shape[0])
    log_q = logits32[rows, token_ids] - lse[rows]
    terms = torch.xlogy(probs, probs) - probs * log_q  # p = 0 contributes 0
    return torch.zeros(logits32.shape[0], device=device, dtype=torch.float32).index_add(0, rows, terms)


def sparse_kl(logits: torch.Tensor, offsets: torch.Tensor, token_ids: torch.Tensor,
              probs: torch.Tensor) -> torch.Tensor:
    """KL(p || softmax(logits)) per row, (B,) float32; p is CSR: offsets (B+1,) from 0, token_ids, probs."""
    logits32 = logits.float()
    return _sparse_kl(logits32, torch.logsumexp(logits32, dim=-1), offsets, token_ids, probs)


def memory_loss(logits, offsets, token_ids, probs, next_token, alpha: float = 0.4):
    """``alpha * KL(p_kNN || p_MLP) + (1 - alpha) * CE(next_token)``, each a mean over rows.
    Returns ``(loss, kl_mean, ce_mean)``; the two parts are detached, for logging. An empty target
    row (no neighbour found) contributes KL 0."""
    logits32 = logits.float()
    lse = torch.logsumexp(logits32, dim=-1)
    kl = _sparse_kl(logits32, lse, offsets, token_ids, probs)
    target = next_token.to(device=logits32.device, dtype=torch.long).unsqueeze(1)
    ce = lse - logits32.gather(1, target).squeeze(1)
    kl_mean, ce_mean = kl.mean(), ce.mean()
    return alpha * kl_mean + (1.0 - alpha) * ce_mean, kl_mean.detach(), ce_mean.detach()


# ---------------------------------------------------------------------------------------------
# The head and the loss, fused: what training spends its time on.
# ---------------------------------------------------------------------------------------------
# Profiling one quick-preset step (B=1024 rows, V=49152, 2 CPU cores, bf16 autocast) through
# ``memory_loss`` showed ~45% of the time in matmuls and the rest in elementwise passes over the
# (B, V) logits: a float32 copy, logsumexp and its backward (sub, exp), two dense zero-filled
# (B, V) gradients from the gathers, the float32 -> bf16 cast of the gradient. The fused version
# runs the one big head matmul, then, in row chunks small enough to stay in cache, computes the
# float32 log-softmax statistics, the loss and *the gradient of the logits* (the loss is a scalar,
# so dL/dlogits is known in the forward: softmax scaled per row minus the sparse targets), and
# writes that gradient over the logits buffer in the compute dtype. Backward is two matmuls.
# Nothing of size (B, V) is ever float32 (or zero-filled), and the logits are never recomputed.

# float32 scratch per chunk. CPU: ~40 rows of a 49k vocabulary, well inside a shared L3; measured
# on 2 cores (quick preset) 2 MB / 8 MB / 16 MB chunks ran 0.84 / 0.83 / 0.88 s per step, and
# fewer, larger chunks mean fewer thread-pool rounds, which hurt most on a busy machine.
_CHUNK_BYTES = {"cpu": 8 << 20}
_DEFAULT_CHUNK_BYTES = 256 << 20  # accelerators: big chunks, few kernel launches


def _chunk_rows(device: torch.device, vocab: int, chunk_rows: int | None) -> int:
    if chunk_rows is not None:
        return max(1, int(chunk_rows))
    return max(1, _CHUNK_BYTES.get(device.type, _DEFAULT_CHUNK_BYTES) // (4 * vocab))


class _FusedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, offsets, token_ids, probs, next_token, alpha, chunk_rows, compute_dtype):
        device = hidden.device
        b, v = hidden.shape[0], weight.shape[0]
        if offsets.shape[0] != b + 1 or token_ids.shape != probs.shape:
            raise ValueError(f"CSR shapes do not fit: hidden {tuple(hidden.shape)}, offsets {tuple(offsets.shape)}, "
                             f"token_ids {tuple(token_ids.shape)}, probs {tuple(probs.shape)}")
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        with torch.autocast(device.type, enabled=False):
            h, w = hidden.to(compute_dtype), weight.to(compute_dtype)
            buf = h @ w.t()  # (B, V) logits in the compute dtype; becomes dL/dlogits below
            offsets_host = offsets.to("cpu", torch.long)
            token_ids = token_ids.to(device=device, dtype=torch.long)
            probs = probs.to(device=device, dtype=torch.float32)
            next_token = next_token.to(device=device, dtype=torch.long)
            rows = _rows(offsets.to(device=device, dtype=torch.long), token_ids.shape[0])
            p_sum = torch.zeros(b, device=device).index_add_(0, rows, probs)  # 1, or 0 for an empty row
            kl = torch.zeros(b, device=device).index_add_(0, rows, torch.xlogy(probs, probs))  # sum p log p
            ce = torch.empty(b, device=device)
            c = _chunk_rows(device, v, chunk_rows)
            for s in range(0, b, c):
                e = min(b, s + c)
                lo, hi = int(offsets_host[s]), int(offsets_host[e])
                r, t, p = rows[lo:hi] - s, token_ids[lo:hi], probs[lo:hi]
                x = buf[s:e].float()
                at_targets = x[r, t]
                at_next = x.gather(1, next_token[s:e, None])[:, 0]
                m = x.amax(1)
                x.sub_(m[:, None]).exp_()
                total = x.sum(1)
                lse = m + total.log()
                kl[s:e].index_add_(0, r, -p * (at_targets - lse[r]))
                ce[s:e] = lse - at_next
                if need_grad:
                    # d/dlogit_j of alpha*KL_row/B + (1-alpha)*CE_row/B:
                    #   softmax_j * (alpha * sum(p) + 1 - alpha) / B - alpha * p_j / B - (1-alpha) * [j = next] / B
                    x.mul_(((alpha * p_sum[s:e] + (1.0 - alpha)) / (b * total))[:, None])
                    x.index_put_((r, t), p * (-alpha / b), accumulate=True)
                    x.index_put_((torch.arange(e - s, device=device), next_token[s:e]),
                                 torch.full((e - s,), -(1.0 - alpha) / b, device=device), accumulate=True)
                    buf[s:e] = x
            # Both input gradients are formed here, so the (B, V) buffer and the compute-dtype weight are
            # freed before backward allocates the float32 (V, d) gradient: they are never alive together.
            grad_h = buf @ w if ctx.needs_input_grad[0] else None
            grad_w = buf.t() @ h if ctx.needs_input_grad[1] else None
        kl_mean, ce_mean = kl.mean(), ce.mean()
        loss = alpha * kl_mean + (1.0 - alpha) * ce_mean
        if need_grad:
            ctx.save_for_backward(grad_h, grad_w)
            ctx.dtypes = (hidden.dtype, weight.dtype)
        ctx.mark_non_differentiable(kl_mean, ce_mean)
        return loss, kl_mean, ce_mean

    @staticmethod
    def backward(ctx, grad_loss, _grad_kl, _grad_ce):
        grad_h, grad_w = ctx.saved_tensors
        scale = grad_loss.to(torch.float32)
        with torch.autocast(scale.device.type, enabled=False):
            # out of place: the saved tensors stay intact for a second backward (retain_graph=True)
            if grad_h is not None:
                grad_h = grad_h.to(ctx.dtypes[0]) * scale
            if grad_w is not None:  # loss.backward() gives scale 1: no pass over the (V, d) gradient then
                grad_w = grad_w.to(ctx.dtypes[1]) if float(scale) == 1.0 else grad_w.to(ctx.dtypes[1]) * scale
        return grad_h, grad_w, None, None, None, None, None, None, None


def fused_memory_loss(hidden, weight, offsets, token_ids, probs, next_token, alpha: float = 0.4, *,
                      compute_dtype: torch.dtype | None = None, chunk_rows: int | None = None):
    """:func:`memory_loss` of ``logits = hidden @ weight.T``, without building float32 logits.

    ``hidden``: (B, d) head inputs (the memory's ``hidden_forward``), ``weight``: (V, d) head
    weight. The head matmuls run in ``compute_dtype`` (default: ``hidden``'s dtype; bf16 under
    autocast); the log-softmax and the loss in float32, ``chunk_rows`` rows at a time (default:
    sized to the device's cache). Returns ``(loss, kl_mean, ce_mean)`` like :func:`memory_loss`,
    with the same value and gradients (w.r.t. ``hidden`` and ``weight``) up to rounding.
    """
    dt = compute_dtype or hidden.dtype
    if not torch.is_grad_enabled():  # validation: no gradient buffers or matmuls at all
        hidden, weight = hidden.detach(), weight.detach()
    return _FusedHeadLoss.apply(hidden, weight, offsets, token_ids, probs, next_token, float(alpha), chunk_rows, dt)
