"""lm-evaluation-harness model ``mlpmemory``: any system of a finished run, scored by this project's own code.

Why it is built this way:

- **lm_eval's tokenisation, our scoring.** The class is a ``TemplateLM``, so contexts and
  continuations are split exactly as lm_eval's ``HFLM`` splits them (whole string encoded, the
  context's trailing spaces moved to the continuation, an empty context replaced by the BOS / EOS
  prefix token, left truncation to the model's length, the same rolling windows). What differs is
  only the scoring, so at lambda 0 every number is HFLM's and any gap is the memory's.
- **Log-likelihoods are the project's.** One forward per batch: the base LM's log-probs of the
  continuation tokens from :func:`mlpmemory.inference.lm_scoring_forward` (the LM head on scored
  rows only), the system's from :meth:`System.token_logprobs` at the input of its site captured in
  the same forward, mixed by :func:`mlpmemory.inference.mix_logprobs`: the calls of
  :func:`mlpmemory.generation.score_continuations`, so eval-qa's dev likelihood and the harness agree.
- **is_greedy is the mixture's.** Whether every continuation token is the argmax of the *mixed*
  distribution needs the whole distribution at those positions: the LM's logits there and
  :meth:`System.dense_logprobs` of the same captured states, mixed by ``mix_with_lm`` (the generate
  hook's maths), a bounded number of rows at a time. Rolling log-likelihoods skip it (lm_eval drops it).
- **Generation is** :func:`mlpmemory.generation.generate` (the mixing hooks on HF ``generate``):
  greedy unless the task samples, stop strings cut the text as lm_eval cuts it.
- **RAG transforms the context**: the passages retrieved for the document's ``question`` (else the
  context) go before the context; it has no rolling log-likelihood (eval-ppl's in-context RALM is that).
- **Registered on import.** lm_eval 0.4 finds models only in its registry (no plugin entry point), so
  ``python -m mlpmemory.harness <lm_eval arguments>`` imports this module, adds this package's task
  folder to ``--include_path`` and runs lm_eval's own command line.
"""

from __future__ import annotations

import sys
from contextlib import nullcontext
from dataclasses import replace

import numpy as np
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from .errors import MLPMemError
from .harness_tasks import TASKS_DIR


def _int_arg(value, name: str, default: int) -> int:
    """lm_eval passes numbers as strings and batch sizes as 'auto'; 'auto' means ``default``."""
    if value is None or str(value).startswith("auto"):
        return default
    try:
        n = int(value)
    except ValueError:
        raise MLPMemError(f"{name} must be an integer, got {value!r}") from None
    if n < 1:
        raise MLPMemError(f"{name} must be >= 1, got {value!r}")
    return n


@register_model("mlpmemory")
class MLPMemoryLM(TemplateLM):
    """A run's base LM with one of its systems (``system``: base, memory, knn_lm, rag) at weight ``lam``.

    The device is the run's setting: lm_eval passes its own ``--device`` default (cuda:0) whether given or
    not, so it is ignored; ``max_batch_size`` is lm_eval's too (the batch is ``batch_size``)."""

    def __init__(self, run_dir: str = "runs/quick", system: str = "memory", lam=None, batch_size=8,
                 max_batch_size=None, device=None, max_length=None, rag_n=3, nprobe=None, run=None, **kwargs):
        from .systems import get_system

        super().__init__()
        if kwargs:
            raise MLPMemError(f"model_args: unknown {', '.join(sorted(kwargs))}; known: run_dir, system, lam, "
                              "batch_size, max_length, rag_n, nprobe")
        from .pipeline import open_run

        self.run = run if run is not None else open_run(str(run_dir))
        self.system = get_system(system).load(self.run, nprobe=None if nprobe is None else int(nprobe),
                                              n_passages=int(rag_n))
        self.lam = self._lambda(lam)
        self.lm = self.run.lm
        self.tokenizer = self.lm.tokenizer
        self._device = self.lm.device
        self.batch = _int_arg(batch_size, "batch_size", 8)
        self._max_length = None if max_length is None else _int_arg(max_length, "max_length", 0)

    def _lambda(self, lam) -> float:
        from .inference import _check_lambda

        lam = None if lam is None else _check_lambda(lam)
        if not self.system.has_lambda:
            if lam:
                raise MLPMemError(f"system {self.system.name} has no lambda; drop lam=")
            return 0.0
        lam = self.system.default_lambda(self.run) if lam is None else lam
        if lam is None:
            raise MLPMemError(f"no lambda for {self.system.name}: eval-ppl chose none in this run; give lam=")
        return _check_lambda(lam)

    # -- what TemplateLM asks ---------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        from lm_eval.models.utils import resolve_max_length

        return self._max_length or resolve_max_length(self.lm.model.config, self.tokenizer, default=2048)

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        """The tokenizer's defaults (its BOS, once: not again before a text that starts with it), as HFLM."""
        if add_special_tokens is None:
            bos = self.tokenizer.bos_token
            add_special_tokens = not (bos and string.startswith(bos))
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

    def apply_chat_template(self, chat_history, add_generation_prompt=True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    # -- the three request types ------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return super().loglikelihood(self._with_passages(requests), disable_tqdm=disable_tqdm)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        return self.score_tokens([(ctx, cont) for _, ctx, cont in requests], greedy=True)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        if self.system.transforms_prompt:
            raise MLPMemError("rag has no rolling log-likelihood here (eval-ppl scores in-context RALM perplexity)")
        windows, owner = [], []
        for i, req in enumerate(requests):
            for w in get_rolling_token_windows(token_list=self.tok_encode(req.args[0]),
                                               prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                                               context_len=1):
                windows.append(make_disjoint_window(w))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (lp, _) in zip(owner, self.score_tokens(windows, greedy=False)):
            totals[i] += lp
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        import json

        requests = self._with_passages(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):  # one generate call per distinct set of generation settings
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out: list[str] = [""] * len(requests)
        for idx in groups.values():
            texts = self._generate([requests[i].args[0] for i in idx], requests[idx[0]].args[1])
            for i, text in zip(idx, texts):
                out[i] = text
        return out

    # -- helpers ------------------------------------------------------------------------------------
    def _with_passages(self, requests):
        """The requests with RAG's passages before each context (query: the document's question)."""
        if not self.system.transforms_prompt or not requests:
            return requests
        queries = [r.doc.get("question") if isinstance(r.doc, dict) and isinstance(r.doc.get("question"), str)
                   else r.args[0] for r in requests]
        contexts, _ = self.system.transform_prompts([r.args[0] for r in requests], queries)
        return [replace(r, arguments=(c, *r.args[1:])) for r, c in zip(requests, contexts)]

    def _generate(self, contexts: list[str], gen_kwargs: dict) -> list[str]:
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

        from .generation import generate
        from .log import logger

        kw = dict(normalize_gen_kwargs(gen_kwargs, 256))
        until = handle_stop_sequences(kw.pop("until", None), eos=self.tokenizer.decode([self.eot_token_id]))
        max_new = int(kw.pop("max_gen_toks"))
        do_sample, temperature = bool(kw.pop("do_sample", False)), float(kw.pop("temperature", 0.0) or 1.0)
        top_k, top_p = kw.pop("top_k", None), kw.pop("top_p", None)
        if kw:
            logger.warning(f"harness: generation settings ignored: {', '.join(sorted(kw))}")
        res = generate(self.lm, [self._fit_context(c, max_new) for c in contexts], system=self.system, lam=self.lam,
                       max_new_tokens=max_new, do_sample=do_sample, sample_temperature=temperature, top_k=top_k,
                       top_p=top_p, stop_strings=until, batch_size=self.batch)
        return [postprocess_generated_text(t, until, None) for t in res.texts]

    def _fit_context(self, context: str, max_new: int) -> str:
        """``context`` cut on the left to leave room for ``max_new`` tokens (HFLM's truncation, on text); an
        empty one is the prefix token, as for log-likelihoods."""
        keep = self.max_length - max_new
        if keep < 1:
            raise MLPMemError(f"max_gen_toks {max_new} leaves no room for a context in {self.max_length} tokens")
        if not context:
            return self.tokenizer.decode([self.prefix_token_id], skip_special_tokens=False)
        ids = self.tok_encode(context)
        return context if len(ids) <= keep else self.tokenizer.decode(ids[-keep:], skip_special_tokens=False)

    def score_tokens(self, pairs: list[tuple[list[int], list[int]]], greedy: bool = True) -> list[tuple[float, bool]]:
        """(log p of the continuation under the system at lambda, is it the mixture's greedy choice) per
        (context ids, continuation ids) pair; ``greedy=False`` skips the second (returned False)."""
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        out: list = [None] * len(pairs)
        # a system without a lambda decodes with its own weights (cpt, lora: swapped in; base, rag: none);
        # the mixing systems are scored by _score_batch from the base LM's states and their component
        weights = self.system.hook(self.lm.model, 0.0) if not self.system.has_lambda else nullcontext()
        with torch.inference_mode(), weights:
            for start in range(0, len(order), self.batch):
                idx = order[start:start + self.batch]
                for i, res in zip(idx, self._score_batch([pairs[i] for i in idx], greedy)):
                    out[i] = res
        return out

    def _mixing(self) -> bool:
        return self.system.has_lambda and self.lam > 0.0

    def _inputs(self, batch) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, list[int]]]]:
        """Right-padded (input_ids, attention_mask) of the pairs as HFLM feeds them (the last max_length + 1
        tokens, the last one only a target), and per pair (position predicting its first token, its tokens)."""
        seqs, spans = [], []
        for ctx, cont in batch:
            if not cont:
                raise MLPMemError("an empty continuation has no log-likelihood; give at least one token")
            seq = (list(ctx) + list(cont))[-(self.max_length + 1):]
            if len(seq) <= len(cont):
                raise MLPMemError(f"a continuation of {len(cont)} tokens does not fit in {self.max_length} tokens")
            seqs.append(seq[:-1])
            spans.append((len(seq) - 1 - len(cont), list(cont)))
        from .generation import _right_padded

        return (*_right_padded(seqs, self.tokenizer.pad_token_id or 0), spans)

    def _score_batch(self, batch, greedy: bool) -> list[tuple[float, bool]]:
        from .capture import capture_inputs
        from .inference import lm_scoring_forward, mix_logprobs, resolve_input_site

        model = self.lm.model
        input_ids, mask, spans = self._inputs(batch)
        site = resolve_input_site(model, self.system.site()) if self._mixing() else None
        with capture_inputs(model, [site] if site else []) as cap:
            states, score = lm_scoring_forward(model, input_ids=input_ids.to(self._device),
                                               attention_mask=mask.to(self._device), use_cache=False)
        rows = torch.tensor([r for r, (_, c) in enumerate(spans) for _ in c], device=self._device)
        pos = torch.tensor([p + j for p, c in spans for j in range(len(c))], device=self._device)
        targets = torch.tensor([t for _, c in spans for t in c], device=self._device)
        states = states[rows, pos]
        hidden = cap[site.module_path][rows, pos] if site else None
        logp = score(states, targets).double().cpu().numpy()
        if site:
            logp = mix_logprobs(logp, self.system.token_logprobs(hidden, targets), self.lam)
        hit = self._greedy_hits(states, hidden, targets) if greedy else np.zeros(len(targets), bool)
        bounds = np.cumsum([0] + [len(c) for _, c in spans])
        return [(float(logp[a:b].sum()), bool(hit[a:b].all())) for a, b in zip(bounds[:-1], bounds[1:])]

    def _greedy_hits(self, states, hidden, targets) -> np.ndarray:
        """Per scored row: is its target the argmax of the mixed distribution (the LM's alone at lambda 0)?"""
        from .inference import mix_with_lm, output_head, rows_per_chunk

        head = output_head(self.lm.model)  # None: ``states`` are the model's logits already
        vocab = self.lm.model.get_output_embeddings().weight.shape[0] if head is not None else states.shape[-1]
        step, top = max(1, rows_per_chunk(vocab) // 4), []
        for s in range(0, len(targets), step):
            logits = head(states[s:s + step]) if head is not None else states[s:s + step]
            if hidden is not None:
                logits = mix_with_lm(logits, self.system.dense_logprobs(hidden[s:s + step], vocab).to(logits.device),
                                     self.lam)
            top.append(logits.float().argmax(-1))
        return (torch.cat(top) == targets).cpu().numpy() if top else np.zeros(0, bool)


def main(argv: list[str] | None = None) -> None:
    """lm_eval's command line (run, ls, validate) with the ``mlpmemory`` model registered and this package's
    tasks included (unless ``--include_path`` is given: then add :data:`TASKS_DIR` to it yourself)."""
    from lm_eval.__main__ import cli_evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
        argv += ["--include_path", str(TASKS_DIR)]
    sys.argv = ["lm_eval", *argv]
    try:
        cli_evaluate()
    except MLPMemError as e:
        print(f"mlpmem: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
