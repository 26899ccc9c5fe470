"""`mlpmem generate`: text from any registered system through Hugging Face ``generate``, streamed to the terminal.

The decoding itself is :func:`mlpmemory.generation.generate` (hooks on the unchanged base model); this
module reads prompts, picks the system and its lambda (the run's validation choice unless given), and
prints or writes the results.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import opt
from ..errors import MLPMemError
from ..generation import StageTimer, generate
from ..io import atomic_write_text
from ..log import log, logger
from ..systems import names
from .stages import check_writable

SYSTEMS = tuple(names())


@dataclass
class Options:
    prompt: str | None = opt(None, "the prompt to continue")
    prompt_file: str | None = opt(None, "prompts to continue: .txt (one per line) or .jsonl (a 'prompt' field)")
    system: str = opt("memory", "which system generates: the base LM, + MLP memory, + kNN-LM, + RAG "
                                "(3 BM25 passages before the prompt) or a fine-tune (cpt, lora: `mlpmem finetune`)",
                      choices=list(SYSTEMS))
    lam: float | None = opt(None, "weight of the memory / kNN distribution (default: the lambda chosen on validation "
                                  "by eval-ppl, else the memory's lambda_default / 0.25 for the kNN-LM)")
    max_new_tokens: int = opt(64, "new tokens per prompt (fewer only at EOS or a stop string)")
    do_sample: bool = opt(False, "sample instead of greedy / beam search")
    sample_temperature: float = opt(1.0, "sampling temperature")
    top_k: int | None = opt(None, "sample among the k most likely tokens (default: no top-k filter)")
    top_p: float | None = opt(None, "nucleus sampling mass (default: no top-p filter)")
    num_beams: int = opt(1, "beam search width (1: greedy or sampling)")
    stop: str | None = opt(None, "comma-separated stop strings (\\n, \\t and \\, escapes allowed); the text is cut "
                                 "before the first one")
    gen_seed: int | None = opt(None, "random seed for sampling")
    gen_batch_size: int = opt(8, "prompts per generate call (left-padded)")
    chat: bool = opt(False, "wrap each prompt in the tokenizer's chat template (when it has one)")
    output: str | None = opt(None, "also write JSONL: {prompt, system, lam, text, new_tokens, ttft_s} per prompt")

    def validate(self) -> Options:
        if (self.prompt is None) == (self.prompt_file is None):
            raise MLPMemError("give exactly one of --prompt and --prompt-file")
        if self.num_beams < 1 or self.max_new_tokens < 1 or self.gen_batch_size < 1:
            raise MLPMemError("--num-beams, --max-new-tokens and --gen-batch-size must be >= 1")
        if not self.sample_temperature > 0:
            raise MLPMemError(f"--sample-temperature must be > 0, got {self.sample_temperature}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise MLPMemError(f"--top-p must be within (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise MLPMemError(f"--top-k must be >= 1, got {self.top_k}")
        if self.lam is not None and not 0.0 <= self.lam <= 1.0:
            raise MLPMemError(f"--lam must be within [0, 1], got {self.lam}")
        return self


def parse_stop(spec: str | None) -> list[str]:
    r"""``"a,b\n"`` -> ["a", "b\n"]; ``\n``, ``\t``, ``\r``, ``\\`` and ``\,`` are escapes."""
    escapes = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", ",": "\0"}  # an escaped comma survives the split as NUL
    text = re.sub(r"\\([ntr\\,])", lambda m: escapes[m.group(1)], spec or "")
    return [s.replace("\0", ",") for s in text.split(",") if s]


def read_prompts(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise MLPMemError(f"prompt file {path} does not exist")
    lines = p.read_text(encoding="utf-8").splitlines()
    if p.suffix == ".jsonl":
        prompts = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise MLPMemError(f"{path}:{n} is not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
                raise MLPMemError(f"{path}:{n} has no string field 'prompt'")
            prompts.append(rec["prompt"])
    else:
        prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise MLPMemError(f"prompt file {path} holds no prompts")
    return prompts


def check_output(output: str) -> None:
    """A one-line error, before any generation, when ``--output`` cannot be written."""
    out = Path(output)
    if out.is_dir() or (out.exists() and not out.is_file()):
        raise MLPMemError(f"--output {output} is not a regular file; give a file path")
    check_writable(out.parent, "the folder of --output", "--output")
    if out.exists() and not os.access(out, os.W_OK):
        raise MLPMemError(f"--output {output} is not writable; give another --output")


def _chat_wrap(tokenizer, prompts: list[str]) -> list[str]:
    from ..generation import chat_text

    if not getattr(tokenizer, "chat_template", None):
        logger.warning("the tokenizer has no chat template; --chat ignored")
        return prompts
    return [chat_text(tokenizer, [{"role": "user", "content": p}]) for p in prompts]


def main(run, opts: Options) -> None:
    from tqdm.auto import tqdm
    from transformers import TextStreamer

    from ..systems import get_system

    prompts = [opts.prompt] if opts.prompt is not None else read_prompts(opts.prompt_file)
    if opts.output:  # before generating: the generated text must not be lost to an unwritable --output
        check_output(opts.output)
    system = get_system(opts.system).load(run)
    lam = 0.0
    if system.has_lambda:
        lam = opts.lam if opts.lam is not None else system.default_lambda(run)
    lm = run.lm
    inputs, _ = system.transform_prompts(prompts)  # RAG: passages first (retrieved for the prompt itself)
    inputs = _chat_wrap(lm.tokenizer, inputs) if opts.chat else inputs
    stream = len(prompts) == 1 and opts.num_beams == 1
    streamer = TextStreamer(lm.tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    if opts.gen_seed is not None:
        torch.manual_seed(opts.gen_seed)  # once per process: batches draw different random numbers
    timer = StageTimer(lm.device)
    kw = dict(system=system, lam=lam, max_new_tokens=opts.max_new_tokens, do_sample=opts.do_sample,
              sample_temperature=opts.sample_temperature, top_k=opts.top_k, top_p=opts.top_p,
              num_beams=opts.num_beams, stop_strings=parse_stop(opts.stop), batch_size=opts.gen_batch_size,
              streamer=streamer, timer=timer)
    records, seconds = [], 0.0
    starts = range(0, len(inputs), opts.gen_batch_size)
    for start in tqdm(starts, desc="generate", unit="batch", disable=len(starts) < 2, file=sys.stderr):
        res = generate(lm, inputs[start:start + opts.gen_batch_size], **kw)
        seconds += res.seconds
        for j, text in enumerate(res.texts):
            prompt = prompts[start + j]
            if not stream:  # (the streamer already printed it, ending with a newline)
                print(text if len(prompts) == 1 else f">>> {prompt}\n{text}\n", flush=True)
            records.append({"prompt": prompt, "system": opts.system, "lam": lam, "text": text,
                            "new_tokens": len(res.token_ids[j]), "ttft_s": res.ttft_s[j]})
    if opts.output:
        atomic_write_text(opts.output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    n_tok = sum(r["new_tokens"] for r in records)
    ttft = sum(r["ttft_s"] for r in records) / len(records)
    stages = ", ".join(f"{k} {v:.2f}s" for k, v in timer.totals.items())
    log(f"generate: system {opts.system}, lambda {lam:g}, {len(records)} prompt(s), {n_tok} new tokens in "
        f"{seconds:.2f}s ({n_tok / max(seconds, 1e-9):.1f} tokens/s), mean TTFT {ttft:.3f}s"
        + (f" [{stages}]" if stages else "") + (f"; wrote {opts.output}" if opts.output else ""))
