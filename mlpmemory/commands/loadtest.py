"""`mlpmem loadtest`: `mlpmem serve` under load, measured from the outside with the real `openai` client.

It starts the server as its own process on a free localhost port (nothing else is reachable), then
for each system and each concurrency level sends ``--load-requests`` streaming completions (greedy,
``ignore_eos``, so every request generates exactly ``--load-max-tokens`` tokens and systems are
compared on the same work), at most ``c`` in flight at once. Per level: time to first token (first
streamed text, HTTP included) p50/p95, end-to-end latency p50/p95, generated tokens/s over the
level's wall time, requests/s and errors. Results go to ``<run>/loadtest/loadtest.{json,md}``.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..config import opt
from ..errors import MLPMemError
from ..io import atomic_write_json, atomic_write_text
from ..log import log


@dataclass
class Options:
    load_systems: str = opt("base,memory", "comma-separated systems to load-test")
    concurrency: str = opt("1,4,8", "comma-separated numbers of requests in flight at once")
    load_requests: int = opt(16, "requests per system and concurrency level (after one warm-up request)", minimum=1)
    load_max_tokens: int = opt(32, "tokens generated per request (ignore_eos: always this many)", minimum=1)
    load_prompt_tokens: int = opt(64, "prompt length in tokens (distinct windows of the held-out text)", minimum=1)
    load_max_batch: int = opt(8, "the server's --max-batch", minimum=1)
    load_startup_s: float = opt(600.0, "seconds to wait for the server to answer /health", minimum=1.0)
    load_out: str | None = opt(None, "output folder (default: <run>/loadtest)")

    def levels(self) -> list[int]:
        try:
            levels = [int(x) for x in self.concurrency.split(",") if x.strip()]
        except ValueError:
            raise MLPMemError(f"--concurrency takes comma-separated integers, got {self.concurrency!r}") from None
        if not levels or min(levels) < 1:
            raise MLPMemError(f"--concurrency takes integers >= 1, got {self.concurrency!r}")
        return levels

    def validate(self) -> Options:
        self.levels()
        return self


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prompts(run, n: int, length: int) -> list[str]:
    from .bench import load_prompts

    ids = load_prompts(run, n, length)
    return [run.lm.tokenizer.decode(row, skip_special_tokens=True) for row in ids.tolist()]


class _ServerProcess:
    """`mlpmem serve` in a child process, stopped with SIGTERM (its graceful shutdown) on exit."""

    def __init__(self, run, opts: Options, out: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "mlpmemory", "serve", "--run-dir", str(run.dir), "--port", str(self.port),
               "--serve-systems", opts.load_systems, "--max-batch", str(opts.load_max_batch),
               "--max-tokens-limit", str(opts.load_max_tokens), "--max-in-flight", str(4 * max(opts.levels()))]
        self.log_path = out / "server.log"
        self._log = open(self.log_path, "w")
        env = {**os.environ, "MLPMEM_API_KEY": ""}
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self._wait(opts.load_startup_s)

    def _wait(self, timeout: float) -> None:
        import httpx

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise MLPMemError(f"`mlpmem serve` exited with status {self.proc.returncode} before answering; "
                                  f"see {self.log_path}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.close()
        raise MLPMemError(f"`mlpmem serve` did not answer /health within {timeout:g}s; see {self.log_path}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


async def _one(client, system: str, prompt: str, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    first, tokens = None, 0
    try:
        stream = await client.completions.create(model=system, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True})
        async for chunk in stream:
            if first is None and any(c.text for c in chunk.choices):
                first = time.perf_counter()
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
    except Exception as e:  # counted, not raised: the load test reports errors
        return {"ok": False, "error": f"{type(e).__name__}: {e}"[:300]}
    end = time.perf_counter()
    return {"ok": True, "ttft_s": (first or end) - t0, "latency_s": end - t0, "tokens": tokens}


async def _level(url: str, system: str, prompts: list[str], concurrency: int, max_tokens: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    gate = asyncio.Semaphore(concurrency)

    async def gated(p):
        async with gate:
            return await _one(client, system, p, max_tokens)

    await _one(client, system, prompts[0], max_tokens)  # warm-up (not counted)
    t0 = time.perf_counter()
    results = await asyncio.gather(*(gated(p) for p in prompts))
    wall = time.perf_counter() - t0
    await client.close()
    ok = [r for r in results if r["ok"]]

    def pct(key, q):
        return float(np.percentile([r[key] for r in ok], q) * 1000) if ok else None

    return {"system": system, "concurrency": concurrency, "requests": len(results), "errors": len(results) - len(ok),
            "error_examples": sorted({r["error"] for r in results if not r["ok"]})[:3], "wall_s": wall,
            "tokens": sum(r["tokens"] for r in ok), "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
            "requests_per_s": len(ok) / wall, "ttft_ms_p50": pct("ttft_s", 50), "ttft_ms_p95": pct("ttft_s", 95),
            "latency_ms_p50": pct("latency_s", 50), "latency_ms_p95": pct("latency_s", 95)}


def _markdown(report: dict) -> str:
    s = report["settings"]
    lines = [f"# mlpmem serve under load ({report['machine']['cpu']}, {report['machine']['cores']} cores, "
             f"{report['machine']['device']}, {report['machine']['dtype']})", "",
             f"{s['load_requests']} streaming requests per row, {s['load_prompt_tokens']}-token prompts, "
             f"{s['load_max_tokens']} tokens each (greedy, ignore_eos), server batches up to {s['load_max_batch']}.",
             "", "| system | concurrency | tokens/s | requests/s | TTFT p50 ms | TTFT p95 ms | latency p50 ms | "
             "latency p95 ms | errors |", "|---|---|---|---|---|---|---|---|---|"]
    for r in report["levels"]:
        fmt = lambda v: "-" if v is None else f"{v:,.0f}"
        lines.append(f"| {r['system']} | {r['concurrency']} | {r['tokens_per_s']:.1f} | {r['requests_per_s']:.2f} | "
                     f"{fmt(r['ttft_ms_p50'])} | {fmt(r['ttft_ms_p95'])} | {fmt(r['latency_ms_p50'])} | "
                     f"{fmt(r['latency_ms_p95'])} | {r['errors']} |")
    for key, value in report["ratios"].items():
        lines.append(f"\n{key}: {value:.3f}")
    return "\n".join(lines) + "\n"


def main(run, opts: Options) -> None:
    from .bench import machine_info

    systems = [s.strip() for s in opts.load_systems.split(",") if s.strip()]
    out = Path(opts.load_out) if opts.load_out else run.dir / "loadtest"
    out.mkdir(parents=True, exist_ok=True)
    prompts = _prompts(run, opts.load_requests, opts.load_prompt_tokens)
    machine = machine_info(run.lm)
    run.release_lm()  # the server process holds its own copy
    log(f"loadtest: starting `mlpmem serve` ({', '.join(systems)}); its log: {out / 'server.log'}")
    server = _ServerProcess(run, opts, out)
    levels = []
    try:
        for system in systems:
            for c in opts.levels():
                level = asyncio.run(_level(server.url, system, prompts, c, opts.load_max_tokens))
                log(f"loadtest: {system} at concurrency {c}: {level['tokens_per_s']:.1f} tokens/s, TTFT p50 "
                    f"{level['ttft_ms_p50'] or 0:.0f} ms, {level['errors']} errors")
                levels.append(level)
    finally:
        server.close()
    by = {(r["system"], r["concurrency"]): r["tokens_per_s"] for r in levels}
    ratios = {f"{s}_over_base_tokens_per_s_at_concurrency_{c}": by[(s, c)] / by[("base", c)]
              for s in systems if s != "base" for c in opts.levels() if ("base", c) in by and by[("base", c)] > 0}
    report = {"what": "mlpmem serve measured from a client: streaming completions over localhost HTTP",
              "settings": asdict(opts), "machine": machine, "levels": levels, "ratios": ratios,
              "server_exit_status": server.proc.returncode}
    atomic_write_json(out / "loadtest.json", report)
    atomic_write_text(out / "loadtest.md", _markdown(report))
    print(_markdown(report))
    print(f"loadtest: {out / 'loadtest.json'}, {out / 'loadtest.md'}")
