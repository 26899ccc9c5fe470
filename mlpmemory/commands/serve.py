"""`mlpmem serve`: the run's systems behind an OpenAI-compatible HTTP API (FastAPI + uvicorn).

The routes are :mod:`mlpmemory.api`; batching and the model's one worker thread are
:mod:`mlpmemory.serving`. This module loads the systems, picks their default lambdas (the run's
validation choice) and starts uvicorn, which shuts down gracefully on Ctrl-C / SIGTERM: running
generations are stopped at their next token, queued ones get an error.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

from ..config import opt
from ..errors import MLPMemError
from ..log import log, logger


@dataclass
class Options:
    host: str = opt("127.0.0.1", "address to bind (another than 127.0.0.1 / localhost exposes the server: set an API "
                                 "key, see --api-key-env)")
    port: int = opt(8000, "TCP port", minimum=1)
    serve_systems: str = opt("all", "comma-separated systems to serve (base, memory, knn_lm, rag), or all that the run "
                                    "has")
    max_batch: int = opt(8, "prompts batched into one generate call (left-padded)", minimum=1)
    max_in_flight: int = opt(64, "prompts queued or generating at once; more get HTTP 429", minimum=1)
    max_tokens_limit: int = opt(1024, "the largest max_tokens a request may ask for", minimum=1)
    max_request_bytes: int = opt(1_000_000, "the largest request body; larger ones get HTTP 413", minimum=1)
    batch_wait_ms: float = opt(5.0, "how long the worker waits for more requests before starting a batch",
                               minimum=0.0)
    api_key_env: str = opt("MLPMEM_API_KEY", "environment variable holding the bearer token clients must send "
                                             "(unset or empty: no authentication)")


def load_systems(run, spec: str) -> tuple[dict, dict]:
    """({name: system}, {name: default lambda}) of the systems in ``spec`` ("all": every one the run has)."""
    from ..systems import get_system, names

    wanted = names() if spec == "all" else [s.strip() for s in spec.split(",") if s.strip()]
    systems, lambdas = {}, {}
    for name in wanted:
        cls = get_system(name)
        try:
            systems[name] = cls.load(run)
        except MLPMemError as e:
            if spec != "all":
                raise
            logger.warning("serve: %s not served (%s)", name, e)
            continue
        lambdas[name] = systems[name].default_lambda(run)
    if not systems:
        raise MLPMemError(f"no system of {spec!r} could be loaded from {run.dir}")
    return systems, lambdas


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build(run, opts: Options):
    """The FastAPI app of ``opts`` on ``run`` (the tests start it with uvicorn themselves)."""
    from ..api import ServeLimits, Server, create_app
    from ..serving import Batcher

    systems, lambdas = load_systems(run, opts.serve_systems)
    lm = run.lm
    batcher = Batcher(lm, systems, max_batch=opts.max_batch, max_in_flight=opts.max_in_flight,
                      batch_wait_s=opts.batch_wait_ms / 1000)
    limits = ServeLimits(max_tokens=opts.max_tokens_limit, max_request_bytes=opts.max_request_bytes)
    server = Server(lm, systems, lambdas, batcher, limits, api_key=os.environ.get(opts.api_key_env) or None)
    return create_app(server), server


def main(run, opts: Options) -> None:
    import uvicorn

    app, server = build(run, opts)
    if not _is_loopback(opts.host) and not server.api_key:
        logger.warning("serve: listening on %s without an API key: anyone who reaches this address can use it "
                       "(set %s)", opts.host, opts.api_key_env)
    shown = ", ".join(f"{n}" + (f" (lambda {server.lambdas[n]:g})" if server.lambdas.get(n) is not None else "")
                      for n in server.systems)
    log(f"serve: http://{opts.host}:{opts.port}/v1 - systems {shown}; default system {server.default_system}; "
        f"batches of up to {opts.max_batch}, context {server.context} tokens"
        + ("; bearer token required" if server.api_key else ""))
    uvicorn.run(app, host=opts.host, port=opts.port, log_level="warning", timeout_graceful_shutdown=10)
