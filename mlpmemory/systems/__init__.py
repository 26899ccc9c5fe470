"""The systems compared everywhere (eval-ppl, eval-qa, bench, generate): one interface, one registry.

A *system* is a way of predicting the next token with the run's base LM: the base LM alone, or
the base LM combined with something built from the corpus. eval-ppl, eval-qa, bench and generate
iterate over :data:`REGISTRY` and call only the methods of :class:`System`, so adding a system is
one new file with a :class:`System` subclass plus one line in :data:`REGISTRY`.

A system says

- **what it needs from a run**: :meth:`System.load` loads its components from a run directory
  (options of one invocation, e.g. the passages per prompt, are keyword arguments);
  :meth:`System.from_components` wraps components a caller already holds;
- **how it is shown**: :attr:`System.name` (the key in every result file) and :attr:`System.label`;
- **whether it mixes with weight lambda**: :attr:`System.has_lambda`; :meth:`System.default_lambda`
  is the run's validation choice (``<run>/eval/ppl.json``), else :meth:`System.fallback_lambda`;
- **its per-position log-probs**: :attr:`System.component` names its per-token log-probs in the
  score dicts of eval-ppl and of teacher-forced scoring; :meth:`System.site` is the base-LM module
  whose input it reads; :meth:`System.token_logprobs` gives log p(target) there,
  :meth:`System.dense_logprobs` the whole distribution, :meth:`System.eval_logprobs` the cached
  per-token arrays of an eval dir, and :meth:`System.mixed` combines them with the base LM's;
- **the generate hook**: :meth:`System.hook`, a context manager installing the mixing hooks on a
  Hugging Face model (:func:`mlpmemory.inference.mixing_hook`); none for systems without lambda;
- **a prompt transform** where it has one: :meth:`System.retrieve` + :meth:`System.prompt_with`
  (RAG puts passages before the prompt); :attr:`System.transforms_prompt` says whether it has one.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import ClassVar

from ..errors import MLPMemError


def chosen_lambda(run, name: str) -> float | None:
    """The lambda of system ``name`` chosen on validation by eval-ppl (``<run>/eval/ppl.json``), or None."""
    from ..io import read_json

    path = run.path("eval") / "ppl.json"
    if not path.exists():
        return None
    ev = read_json(path)
    lam = (((ev.get("test") or {}).get("systems") or {}).get(name) or {}).get("lambda")
    if lam is None:
        lam = (((ev.get("validation") or {}).get("chosen") or {}).get(name) or {}).get("lambda")
    return float(lam) if lam is not None else None


class System:
    """One way of predicting the next token with the run's base LM (see the module docstring)."""

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""
    has_lambda: ClassVar[bool] = False
    component: ClassVar[str | None] = None  # its per-token log-probs in score dicts ("lm" for the base LM)
    transforms_prompt: ClassVar[bool] = False

    # -- what it needs from a run -------------------------------------------------------------
    @classmethod
    def load(cls, run, **options) -> System:
        """The system with its components loaded from the run directory (``options``: one invocation's)."""
        return cls()

    @classmethod
    def from_components(cls, **components) -> System | None:
        """The system around components a caller holds (``memory=``, ``knn=`` ...), None if it has none."""
        return None

    # -- lambda -------------------------------------------------------------------------------
    def fallback_lambda(self) -> float | None:
        """The lambda used when validation chose none."""
        return None

    def default_lambda(self, run) -> float | None:
        """The run's validation choice, else :meth:`fallback_lambda`; None without a lambda."""
        if not self.has_lambda:
            return None
        lam = chosen_lambda(run, self.name)
        return lam if lam is not None else self.fallback_lambda()

    # -- log-probs ----------------------------------------------------------------------------
    def site(self) -> str | None:
        """The base-LM module whose input :meth:`token_logprobs` / :meth:`dense_logprobs` read."""
        return None

    def token_logprobs(self, hidden, targets):
        """log p(target) (float64 numpy, (N,)) of N hidden states from :meth:`site` and their targets."""
        raise MLPMemError(f"system {self.name} has no per-position component")

    def dense_logprobs(self, hidden, vocab: int, timer=None):
        """log p over the vocabulary (float32 tensor, (N, V)) of N hidden states from :meth:`site`."""
        raise MLPMemError(f"system {self.name} has no per-position component")

    def eval_logprobs(self, ds, *, choice: dict | None = None, batch: int = 4096, progress: bool = True):
        """Its per-token log-probs of an eval dir (cached there); ``choice``: a validation row to report at."""
        raise MLPMemError(f"system {self.name} has no per-token log-probs of an eval dir")

    @classmethod
    def variants(cls, scored, temperatures=None) -> dict:
        """``{setting: per-token log-probs}`` swept on validation (``setting`` is T for the kNN-LM)."""
        return {None: scored}

    def mixed(self, comps: dict, lam: float | None = None, t: float | None = None):
        """Its per-token log-probs (float64) from a score dict ``comps`` at ``lam`` (and T)."""
        from ..inference import mix_logprobs

        scored = self.variants(comps[self.component], None if t is None else [t])[t]
        return mix_logprobs(comps["lm"], scored, lam) if self.has_lambda else scored

    def for_sweep(self) -> System:
        """The system as eval-ppl scores it on validation (the kNN-LM: at a grid of temperatures)."""
        return self

    # -- reports ------------------------------------------------------------------------------
    def settings(self) -> dict:
        """What identifies its components in eval-ppl's ``settings`` (merged into the report)."""
        return {}

    def report_fields(self, comps: dict, choice: dict | None) -> dict:
        """Extra per-system fields of eval-ppl's test report (e.g. the component's own perplexity)."""
        return {}

    @classmethod
    def table_name(cls, row: dict) -> str:
        """Its name in eval-ppl's Markdown table."""
        return cls.name

    def plot_note(self) -> str:
        """Appended to the title of eval-ppl's validation plot."""
        return ""

    # -- generation ---------------------------------------------------------------------------
    def hook(self, model, lam: float = 0.0, timer=None):
        """Context manager: mixing hooks on the HF model ``model`` while active (none at lambda 0)."""
        from ..inference import _check_lambda, mixing_hook

        if not self.has_lambda or _check_lambda(lam) == 0.0:
            return nullcontext(model)
        return mixing_hook(model, self.site(), self.dense_logprobs, lam, timer)

    def retrieve(self, queries: list[str]) -> list[list] | None:
        """Passages per query for :meth:`prompt_with`; None for systems without a prompt transform."""
        return None

    def prompt_with(self, prompt: str, passages) -> str:
        """``prompt`` as this system feeds it to the LM, given :meth:`retrieve`'s passages."""
        return prompt

    def transform_prompts(self, prompts: list[str], queries: list[str] | None = None) -> tuple[list[str], list | None]:
        """(prompts to feed the LM, passages per prompt or None); ``queries`` default to the prompts."""
        found = self.retrieve(list(queries if queries is not None else prompts))
        if found is None:
            return list(prompts), None
        return [self.prompt_with(p, f) for p, f in zip(prompts, found)], found


class ScoredByOwnPass(System):
    """A system eval-ppl scores by its own pass over the test windows (RAG's retrieval, a fine-tune's weights),
    computed beforehand and given as ``scored``: ``{"logprob": (N,) log-probs of the test tokens, **fields}``;
    ``fields`` (settings, seconds ...) join its report. :attr:`scored_by` names the function that computes them."""

    scored: dict | None = None
    scored_by: ClassVar[str] = ""

    def eval_logprobs(self, ds, *, choice=None, batch: int = 4096, progress: bool = True):
        import numpy as np

        if self.scored is None:
            raise MLPMemError(f"the {self.name} system scores an eval dir from its own pass ({self.scored_by})")
        lp = np.asarray(self.scored["logprob"], dtype=np.float64)
        if lp.shape != (ds.n,):
            raise MLPMemError(f"the {self.name} log-probs cover {lp.shape[0]} tokens but the test eval dir {ds.path} "
                              f"has {ds.n}; compute them over the same text and windows")
        return lp

    def report_fields(self, comps: dict, choice: dict | None) -> dict:
        return {**{k: v for k, v in (self.scored or {}).items() if k != "logprob"}, "tokens_scored": len(comps["lm"])}


from .base import BaseLM  # noqa: E402  (the registry's classes subclass System)
from .cpt import CPTSystem  # noqa: E402
from .knn_lm import KNNLMSystem  # noqa: E402
from .lora import LoRASystem  # noqa: E402
from .memory import MemorySystem  # noqa: E402
from .rag import RAGSystem  # noqa: E402

# name -> class, in report order. A new system: one file in this package and one line here.
REGISTRY: dict[str, type[System]] = {
    BaseLM.name: BaseLM,
    MemorySystem.name: MemorySystem,
    KNNLMSystem.name: KNNLMSystem,
    RAGSystem.name: RAGSystem,
    CPTSystem.name: CPTSystem,
    LoRASystem.name: LoRASystem,
}


def names() -> list[str]:
    """Registered system names, in report order."""
    return list(REGISTRY)


def get_system(name: str) -> type[System]:
    """The class of the system called ``name``."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise MLPMemError(f"unknown system {name!r}; choose from {', '.join(REGISTRY)}") from None


def tuned() -> list[type[System]]:
    """The registered systems with a lambda, in report order."""
    return [cls for cls in REGISTRY.values() if cls.has_lambda]


def systems_for(**components) -> list[System]:
    """Every registered system that ``components`` (``memory=``, ``knn=`` ...) provide, in report order."""
    found = (cls.from_components(**components) for cls in REGISTRY.values())
    return [s for s in found if s is not None]


__all__ = ["System", "ScoredByOwnPass", "REGISTRY", "names", "get_system", "tuned", "systems_for", "chosen_lambda",
           "BaseLM", "MemorySystem", "KNNLMSystem", "RAGSystem", "CPTSystem", "LoRASystem"]
