"""Capture hidden states at the input of a decoder layer's FFN, from any causal LM, with hooks.

Why the FFN input: the kNN-LM convention keys the datastore on the input of the last layer's
feed-forward block (after its pre-FFN norm; docs/method.md#datastore), and the MLP Memory reads
the same kind of state (by default at the same site, ``last``; the paper used ~70% depth). Both
are the *input* of a module every architecture has (the layer's MLP), so one forward pre-hook on
that module captures them exactly, in any family, without copying modelling code.

Why stop early: building a datastore needs nothing after the deepest capture site. When the
caller asks, the hook raises after the deepest capture and we skip the remaining layers, the final
norm and the |V|-sized LM head; a key build is then *cheaper* than a plain forward pass.

Sites are given as a layer index (``29``, negative counts from the end), a depth fraction
(``0.7`` -> layer ``int(0.7 * n_layers)``), ``last``, or an explicit module path whose input is
captured (``model.layers.20.mlp``) for architectures we do not recognise.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .errors import MLPMemError

# Where decoder layers live, and what their FFN is called, in the families we know. OPT (and XGLM,
# BioGPT) have no FFN module: the layer calls its first linear ``fc1`` directly, on the normed state
# flattened to (batch * seq, d); the capture hook restores the (batch, seq, d) shape.
LAYER_LIST_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers", "transformer.layers")
FFN_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe", "fc1")


@dataclass(frozen=True)
class CaptureSite:
    """A resolved capture site: the module whose input we take, and its layer (if known)."""

    module_path: str
    layer: int | None
    n_layers: int | None

    def to_dict(self) -> dict:
        return {"module": self.module_path, "layer": self.layer, "n_layers": self.n_layers}


def _get(root: torch.nn.Module, path: str):
    obj = root
    for part in path.split("."):
        if part.isdigit():
            try:
                obj = obj[int(part)]
            except (IndexError, TypeError, KeyError):
                return None
        else:
            obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    for path in LAYER_LIST_PATHS:
        layers = _get(model, path)
        if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
            return path, layers
    raise MLPMemError(
        f"cannot find the decoder layers of {type(model).__name__}; name the capture module explicitly, "
        f"e.g. --key-site <path.to.layers.N.mlp> (any module whose input is the hidden state to capture)"
    )


def resolve_site(model: torch.nn.Module, spec: str | int | float) -> CaptureSite:
    """Turn a user's site spec into the module whose input is captured."""
    spec_str = str(spec).strip()
    if not spec_str:
        raise MLPMemError("empty capture site; give a layer index, a depth fraction such as 0.7, 'last', "
                          "or a module path")
    # An explicit module path.
    if not _is_number(spec_str) and spec_str != "last":
        module = _get(model, spec_str)
        if not isinstance(module, torch.nn.Module):
            raise MLPMemError(f"model {type(model).__name__} has no module {spec_str!r}; "
                              "give a dotted path as printed by print(model), e.g. model.layers.20.mlp")
        return CaptureSite(spec_str, None, None)
    path, layers = decoder_layers(model)
    n = len(layers)
    if spec_str == "last":
        layer = n - 1
    elif "." in spec_str or "e" in spec_str.lower():
        frac = float(spec_str)
        if not 0.0 <= frac <= 1.0:
            raise MLPMemError(f"depth fraction must be within [0, 1], got {frac}")
        layer = min(n - 1, int(frac * n))
    else:
        layer = int(spec_str)
        if layer < 0:
            layer += n
        if not 0 <= layer < n:
            raise MLPMemError(f"layer {spec_str} out of range: the model has {n} layers (0..{n - 1})")
    for ffn in FFN_NAMES:
        if isinstance(getattr(layers[layer], ffn, None), torch.nn.Module):
            return CaptureSite(f"{path}.{layer}.{ffn}", layer, n)
    raise MLPMemError(
        f"layer {layer} of {type(model).__name__} has no FFN named any of {FFN_NAMES}; "
        f"name the module explicitly, e.g. --key-site {path}.{layer}.<ffn module name>"
    )


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


class _StopForward(Exception):
    pass


@contextmanager
def capture_inputs(model: torch.nn.Module, sites: list[CaptureSite], stop_early: bool = False):
    """Within the block, every forward stores the input of each site's module in the yielded dict.

    With ``stop_early`` the forward is cut right after the last site fires; call the model via
    :func:`run_captured` so the interruption is swallowed.
    """
    captured: dict[str, torch.Tensor] = {}
    remaining = {s.module_path for s in sites}
    handles = []
    lead: dict[str, torch.Size] = {}  # site -> (batch, seq) its parent (the layer) was called with

    def make_parent_hook(path: str):
        def hook(module, args, kwargs):
            h = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("hidden_states")
            if isinstance(h, torch.Tensor) and h.dim() == 3:
                lead[path] = h.shape[:2]
        return hook

    def make_hook(path: str):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
            if x is None:
                raise MLPMemError(f"could not read the input of {path}: "
                                  "the module was called without a tensor argument")
            if x.dim() == 2 and path in lead and x.shape[0] == lead[path].numel():
                x = x.view(*lead[path], x.shape[-1])  # flattened by the layer (OPT's fc1): back to (batch, seq, d)
            captured[path] = x.detach()
            if stop_early and remaining.issubset(captured.keys()):
                raise _StopForward
        return hook

    for s in sites:
        module = _get(model, s.module_path)
        parent = _get(model, s.module_path.rpartition(".")[0]) if "." in s.module_path else None
        if isinstance(parent, torch.nn.Module):
            handles.append(parent.register_forward_pre_hook(make_parent_hook(s.module_path), with_kwargs=True))
        handles.append(module.register_forward_pre_hook(make_hook(s.module_path), with_kwargs=True))
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def check_captured(captured: dict, site: CaptureSite, lead: tuple[int, int], width: int, role: str) -> torch.Tensor:
    """The tensor captured at ``site``, checked to be hidden states: floating point, (batch, seq, width).

    A module path can name any module, e.g. ``model.embed_tokens`` (its input is token ids),
    ``lm_head`` (it does not run in the backbone's forward) or a projection whose input has
    another width; each is a one-line error naming the module, before any row is written.
    """
    hint = "choose a module inside a decoder layer whose input is the hidden state, e.g. a layer index or 'last'"
    x = captured.get(site.module_path)
    if x is None:
        raise MLPMemError(f"{role} {site.module_path!r} did not run during the model's forward (nothing was "
                          f"captured); {hint}")
    dtype = str(x.dtype).replace("torch.", "")
    what = f"{role} {site.module_path!r} receives a {dtype} tensor of shape {tuple(x.shape)}"
    if not x.is_floating_point():
        raise MLPMemError(f"{what} (token ids?), not floating-point hidden states; {hint}")
    if x.dim() != 3 or tuple(x.shape[:2]) != tuple(lead) or x.shape[-1] != width:
        raise MLPMemError(f"{what}, not (batch, seq, d) = {(*tuple(lead), width)} with d = the model's hidden size; "
                          f"{hint}")
    return x


def run_captured(fn, *args, **kwargs):
    """Call ``fn`` and treat an early stop from :func:`capture_inputs` as normal completion."""
    try:
        return fn(*args, **kwargs)
    except _StopForward:
        return None
