"""The base LM + a kNN-LM over the datastore (the retriever the memory imitates), mixed with weight lambda."""

from __future__ import annotations

from ..errors import MLPMemError
from . import System


class KNNLMSystem(System):
    name = "knn_lm"
    label = "+ kNN-LM"
    has_lambda = True
    component = "knn"

    def __init__(self, knn, temperatures=None):
        """``knn``: a :class:`mlpmemory.inference.KNNLM`; ``temperatures``: the T of its eval-dir scores
        (default: its own T)."""
        self.knn = knn
        self.temperatures = None if temperatures is None else [float(t) for t in temperatures]
        if self.temperatures is not None and (not self.temperatures or any(not t > 0 for t in self.temperatures)):
            raise MLPMemError(f"temperatures must be a non-empty list of numbers > 0, got {temperatures!r}")

    @classmethod
    def load(cls, run, nprobe: int | None = None, index_dir=None, **options) -> KNNLMSystem:
        from ..generation import load_knn

        return cls(load_knn(run, nprobe=nprobe, index_dir=index_dir))

    @classmethod
    def from_components(cls, knn=None, temperatures=None, **components):
        return cls(knn, temperatures) if knn is not None else None

    def for_sweep(self) -> KNNLMSystem:
        """The same kNN-LM scored at a grid of T around its own (T * 2**j, j = -2..2) unless T are given."""
        if self.temperatures is not None:
            return self
        return KNNLMSystem(self.knn, [self.knn.temperature * 2.0 ** j for j in range(-2, 3)])

    def fallback_lambda(self) -> float:
        return 0.25

    def site(self) -> str:
        site = ((getattr(self.knn, "datastore_manifest", None) or {}).get("key_site") or {})
        module = site.get("module") if isinstance(site, dict) else site
        if not module:
            raise MLPMemError("the kNN-LM does not say where its keys come from (datastore_manifest['key_site']"
                              "['module']); load it with KNNLM.from_dirs or load_knn(run)")
        return str(module)

    def token_logprobs(self, hidden, targets):
        import numpy as np

        return np.asarray(self.knn.knn_logprob_of(hidden, targets.cpu().numpy()), np.float64)

    def dense_logprobs(self, hidden, vocab: int, timer=None):
        from ..inference import knn_dense_logprobs

        return knn_dense_logprobs(self.knn, hidden, vocab, timer)

    def eval_logprobs(self, ds, *, choice=None, batch: int = 4096, progress: bool = True) -> dict:
        from ..evaluate import knn_eval_logprobs

        temps = [choice["T"]] if choice is not None else (self.temperatures or [self.knn.temperature])
        return knn_eval_logprobs(ds, self.knn, temps, batch, progress)

    @classmethod
    def variants(cls, scored: dict, temperatures=None) -> dict:
        temps = list(scored) if temperatures is None else [float(t) for t in temperatures]
        for t in temps:
            if t not in scored:
                raise MLPMemError(f"no kNN log-probs at T={t:g} (have {sorted(scored)}); score them with "
                                  "score_components")
        return {t: scored[t] for t in temps}

    def settings(self) -> dict:
        return {"temperatures": list(self.temperatures or [self.knn.temperature]),
                "knn": {"fingerprint": self.knn.fingerprint, "k": self.knn.k,
                        "index_type": type(self.knn.index).__name__}}

    def report_fields(self, comps: dict, choice: dict | None) -> dict:
        from ..evaluate import perplexity

        return {"knn_alone_ppl": perplexity(comps[self.component][choice["T"]]), "k": self.knn.k}

    def plot_note(self) -> str:
        return f", k={self.knn.k}"
