"""The model side of `mlpmem serve`: one worker thread that batches requests into Hugging Face ``generate`` calls.

Why it is built this way:

- **One worker thread owns the model.** A torch model with forward hooks is not re-entrant, and on
  a CPU (or one GPU) one ``generate`` over a left-padded batch uses the hardware better than
  several calls competing for it. HTTP handlers only queue :class:`Job` s and read their events.
- **Batching without new decoding code.** Jobs that wait together and ask for the same decoding
  (:class:`Decoding`: system, lambda, sampling, stop strings) share one ``generate`` call, left-padded
  as :func:`mlpmemory.generation.generate` pads. Each row stops on its own: at its own
  ``max_tokens``, or as soon as its client goes away (:class:`_Rows` is both the streamer and a
  per-row ``StoppingCriteria``); finished rows are padded by HF and cost nothing visible.
- **No state between requests.** The system's mixing hooks (:meth:`mlpmemory.systems.System.hook`)
  are installed for one ``generate`` call and removed after it.
- **The same text as `mlpmem generate`.** A row's final text is cut exactly as
  :func:`mlpmemory.generation._finish_row` cuts it, so a served answer equals a local one; streaming
  sends that text in pieces, holding back what could still turn into a stop string (and trailing
  spaces, which the tokenizer's clean-up may still remove).
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from .errors import MLPMemError
from .log import logger


class Busy(MLPMemError):
    """Too many requests in flight (the HTTP layer answers 429)."""


@dataclass(frozen=True)
class Decoding:
    """What one ``generate`` call fixes for all its rows; jobs batch together only when it is equal."""

    system: str
    lam: float
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    stops: tuple[str, ...] = ()
    seed: int | None = None  # a seeded job runs alone: its random numbers must not depend on its neighbours
    ignore_eos: bool = False  # always max_tokens tokens, EOS suppressed until then (fixed-length load tests)


@dataclass(eq=False)
class Job:
    """One prompt of one request: its token ids, and a queue of events for the HTTP handler.

    Events are ``(index, kind, payload)``: ``("delta", text)``, ``("end", {"text", "finish_reason",
    "completion_tokens"})`` or ``("error", message)``.
    """

    ids: list[int]
    decoding: Decoding
    max_tokens: int
    events: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    index: int = 0
    cancelled: threading.Event = field(default_factory=threading.Event)
    tokens: list[int] = field(default_factory=list)
    sent: str = ""

    def emit(self, kind: str, payload) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (self.index, kind, payload))


def _safe_text(text: str, stops: tuple[str, ...]) -> str:
    """The part of a growing text that later tokens cannot change: without a possible stop-string
    start, a trailing incomplete character, or trailing spaces."""
    hold = max((len(s) for s in stops), default=1) - 1
    text = text[:len(text) - hold] if hold else text
    return text.rstrip("\ufffd").rstrip()


class _Rows:
    """The streamer and per-row stopping criterion of one batched ``generate`` call."""

    def __init__(self, jobs: list[Job], tokenizer, eos: set[int]):  # eos: empty under ignore_eos
        self.jobs, self.tok, self.eos = jobs, tokenizer, eos
        self.finished = [False] * len(jobs)
        self._prompt_seen = False

    # streamer protocol (transformers' BaseStreamer): put(tokens), end()
    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate first passes the prompt ids
            self._prompt_seen = True
            return
        for r, t in enumerate(value.reshape(-1).tolist()):
            if self.finished[r]:
                continue
            job = self.jobs[r]
            job.tokens.append(int(t))
            text = self.tok.decode(job.tokens, skip_special_tokens=True)
            stops = job.decoding.stops
            if t in self.eos or len(job.tokens) >= job.max_tokens or any(s in text for s in stops):
                self.finished[r] = True  # its final text is sent after generate, cut as `mlpmem generate` cuts it
                continue
            safe = _safe_text(text, stops)
            if len(safe) > len(job.sent) and safe.startswith(job.sent):
                job.emit("delta", safe[len(job.sent):])
                job.sent = safe

    def end(self) -> None:
        pass

    # StoppingCriteria protocol: one bool per row
    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        done = [f or j.cancelled.is_set() for f, j in zip(self.finished, self.jobs)]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class Batcher:
    """Queues jobs and runs them, batched, on one worker thread (see the module docstring)."""

    def __init__(self, lm, systems: dict, *, max_batch: int = 8, max_in_flight: int = 64, batch_wait_s: float = 0.005):
        from .generation import _eos_ids

        self.lm, self.systems = lm, systems
        self.max_batch, self.max_in_flight, self.batch_wait_s = max_batch, max_in_flight, batch_wait_s
        self.eos = _eos_ids(lm.model, lm.tokenizer)
        self._queue: deque[Job] = deque()
        self._running: list[Job] = []
        self._cv = threading.Condition()
        self._stopping = False
        self.batches = 0  # generate calls made (the tests read it to see batching happen)
        self.recent: deque[dict] = deque(maxlen=64)  # the last rows' outcomes (tests, /health)
        self._thread = threading.Thread(target=self._work, name="mlpmem-serve-worker", daemon=True)
        self._thread.start()

    # -- the HTTP side ----------------------------------------------------------------------------
    def submit(self, jobs: list[Job]) -> None:
        with self._cv:
            if self._stopping:
                raise Busy("the server is shutting down")
            in_flight = len(self._queue) + len(self._running)
            if in_flight + len(jobs) > self.max_in_flight:
                raise Busy(f"{in_flight} prompts in flight, the limit is {self.max_in_flight}; retry later")
            self._queue.extend(jobs)
            self._cv.notify()

    def load(self) -> dict:
        with self._cv:
            return {"queued": len(self._queue), "running": len(self._running), "batches": self.batches}

    def close(self, timeout: float = 30.0) -> None:
        """Stop: queued jobs get an error, running ones are cancelled (their rows stop at the next token)."""
        with self._cv:
            self._stopping = True
            for job in self._queue:
                job.emit("error", "the server is shutting down")
            self._queue.clear()
            for job in self._running:
                job.cancelled.set()
            self._cv.notify_all()
        self._thread.join(timeout)

    # -- the worker ---------------------------------------------------------------------------------
    def _take(self) -> list[Job]:
        with self._cv:
            while not self._queue and not self._stopping:
                self._cv.wait()
            if self._stopping:
                return []
            if len(self._queue) < self.max_batch and self.batch_wait_s:
                self._cv.wait(self.batch_wait_s)  # requests sent together arrive a few ms apart
            first = self._queue[0]
            same = [j for j in self._queue if j.decoding == first.decoding and not j.cancelled.is_set()]
            batch = [first] if first.decoding.seed is not None else same[:self.max_batch] or [first]
            for j in [j for j in self._queue if j.cancelled.is_set()] + batch:
                if j in self._queue:
                    self._queue.remove(j)
            self._running = batch
            return batch

    def _work(self) -> None:
        while True:
            batch = self._take()
            if not batch:
                return
            try:
                self._generate(batch)
            except Exception as e:  # one bad batch must not stop the server
                logger.exception("serve: generation failed")
                for job in batch:
                    job.emit("error", f"generation failed: {type(e).__name__}: {e}")
            finally:
                with self._cv:
                    self._running = []
                    self.batches += 1

    def _generate(self, jobs: list[Job]) -> None:
        from transformers import StoppingCriteriaList

        from .generation import StageTimer, _finish_row, _generation_config, _left_padded

        d = jobs[0].decoding
        model, tok = self.lm.model, self.lm.tokenizer
        stops, eos = list(d.stops), set() if d.ignore_eos else self.eos
        gc, pad = _generation_config(model, tok, self.eos, max_new_tokens=max(j.max_tokens for j in jobs),
                                     do_sample=d.do_sample, sample_temperature=d.temperature, top_k=d.top_k,
                                     top_p=d.top_p, num_beams=1)  # _Rows stops rows on their generated text
        if d.ignore_eos:
            # EOS is never drawn before max_tokens. (Clearing eos_token_id is not enough: generate fills an
            # unset one from the model's own generation config.)
            gc.min_new_tokens = gc.max_new_tokens
        input_ids, mask = _left_padded([j.ids for j in jobs], pad)
        rows = _Rows(jobs, tok, eos)
        device = self.lm.device
        cuda = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else []
        rng = torch.random.fork_rng(devices=cuda) if d.seed is not None else nullcontext()
        with rng, torch.inference_mode(), self.systems[d.system].hook(model, d.lam, StageTimer()):
            if d.seed is not None:
                torch.manual_seed(d.seed)
            out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), generation_config=gc,
                                 stopping_criteria=StoppingCriteriaList([rows]), streamer=rows)
        for r, job in enumerate(jobs):
            ids, text = _finish_row(out[r, input_ids.shape[1]:].tolist()[:job.max_tokens], tok, eos, pad, stops)
            hit_stop = bool(ids) and ids[-1] in eos or any(
                s in tok.decode(ids, skip_special_tokens=True) for s in stops)
            if text.startswith(job.sent):
                if len(text) > len(job.sent):
                    job.emit("delta", text[len(job.sent):])
            else:  # a streamed piece changed afterwards (not seen in tests): the full text is in the end event
                logger.warning("serve: streamed text is not a prefix of the final text: %r vs %r", job.sent, text)
            end = {"text": text, "finish_reason": "stop" if hit_stop else "length", "completion_tokens": len(ids),
                   "cancelled": job.cancelled.is_set()}
            self.recent.append({k: v for k, v in end.items() if k != "text"})
            job.emit("end", end)

