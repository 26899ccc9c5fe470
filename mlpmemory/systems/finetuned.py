"""The base LM fine-tuned on the memory's corpus (CPT, LoRA): what the memory competes with for the same budget.

A fine-tuned model is a system with no lambda: its :meth:`FinetunedSystem.hook` swaps the fine-tuned
weights into the run's base LM while active (:func:`mlpmemory.finetuned.swapped_parameters`), so generate,
eval-qa and serve decode with it through the unchanged HF model; eval-ppl scores it by its own pass over the
eval windows (:func:`mlpmemory.finetuned.cached_finetuned_logprobs`), like RAG.
"""

from __future__ import annotations

from typing import ClassVar

from ..errors import MLPMemError
from . import ScoredByOwnPass


class FinetunedSystem(ScoredByOwnPass):
    """A fine-tune of the run's base LM (subclasses: :class:`CPTSystem`, :class:`LoRASystem`)."""

    method: ClassVar[str] = ""
    scored_by = "finetuned.cached_finetuned_logprobs"

    def __init__(self, tensors: dict | None = None, manifest: dict | None = None, scored: dict | None = None):
        """``tensors``: ``{parameter name: tensor}`` swapped into the base LM; ``manifest``: the fine-tune's;
        ``scored``: eval-ppl's ``{"logprob": (N,) log-probs of the test tokens, **fields}``."""
        self.tensors, self.manifest, self.scored = tensors, manifest or {}, scored

    @classmethod
    def load(cls, run, **options) -> FinetunedSystem:
        from ..finetuned import load_finetuned

        return cls(*load_finetuned(run, cls.method))

    @classmethod
    def from_components(cls, **components):
        scored = components.get(cls.name)
        return cls(scored=scored) if scored is not None else None

    @property
    def fingerprint(self) -> str:
        from ..finetuned import finetune_fingerprint

        return finetune_fingerprint(self.manifest)

    def summary(self) -> dict:
        """What eval-ppl reports beside its perplexity: the budget and size it was trained with."""
        m = self.manifest
        return {"fingerprint": self.fingerprint, "tokens_trained": m.get("tokens_trained"), "steps": m.get("steps"),
                "trainable_params": m.get("trainable_params"), "train_seconds": m.get("seconds"),
                "lr": (m.get("settings") or {}).get("lr"), "budget_tokens": (m.get("budget") or {}).get("tokens"),
                "lora_rank": (m.get("lora") or {}).get("rank")}

    def hook(self, model, lam: float = 0.0, timer=None):
        from ..finetuned import swapped_parameters

        if self.tensors is None:
            raise MLPMemError(f"system {self.name} was made from eval-ppl scores only; load it with "
                              f"get_system({self.name!r}).load(run) to decode with it")
        return swapped_parameters(model, self.tensors)

    @classmethod
    def table_name(cls, row: dict) -> str:
        tokens = row.get("tokens_trained")
        return cls.name if tokens is None else f"{cls.name} ({tokens:,} tokens)"
