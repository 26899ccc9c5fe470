"""The base LM + the MLP memory, mixed with weight lambda in log space."""

from __future__ import annotations

from . import System


class MemorySystem(System):
    name = "memory"
    label = "+ MLP memory"
    has_lambda = True
    component = "memory"

    def __init__(self, memory, fingerprint: str | None = None):
        self.memory = memory
        self._fingerprint = fingerprint

    @classmethod
    def load(cls, run, **options) -> MemorySystem:
        from ..generation import load_memory

        return cls(load_memory(run))

    @classmethod
    def from_components(cls, memory=None, memory_fingerprint: str | None = None, **components):
        return cls(memory, memory_fingerprint) if memory is not None else None

    @property
    def fingerprint(self) -> str:
        """Identity of the memory for caches (hashed from its weights unless given)."""
        if self._fingerprint is None:
            from ..evaluate import fingerprint_memory

            self._fingerprint = fingerprint_memory(self.memory)
        return self._fingerprint

    def fallback_lambda(self) -> float | None:
        return getattr(getattr(self.memory, "config", None), "lambda_default", None)

    def site(self) -> str:
        from ..inference import memory_input_module

        return memory_input_module(self.memory)

    def token_logprobs(self, hidden, targets):
        from ..inference import memory_token_logprobs

        return memory_token_logprobs(self.memory, hidden, targets).double().cpu().numpy()

    def dense_logprobs(self, hidden, vocab: int, timer=None):
        from ..inference import memory_dense_logprobs

        return memory_dense_logprobs(self.memory, hidden, vocab, timer)

    def eval_logprobs(self, ds, *, choice=None, batch: int = 4096, progress: bool = True):
        from ..evaluate import memory_eval_logprobs

        return memory_eval_logprobs(ds, self.memory, self.fingerprint, batch, progress).astype("float64")

    def settings(self) -> dict:
        return {"memory_fingerprint": self.fingerprint}

    def report_fields(self, comps: dict, choice: dict | None) -> dict:
        from ..evaluate import perplexity

        return {"memory_alone_ppl": perplexity(comps[self.component])}
