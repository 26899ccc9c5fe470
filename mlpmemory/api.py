"""The HTTP side of `mlpmem serve`: an OpenAI-compatible API (FastAPI) over :class:`mlpmemory.serving.Batcher`.

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``
(server-sent events with ``"stream": true``). A request picks its system by ``model`` (a system name,
or :data:`MODEL_ALIAS` for the run's default system) or by the extra body field ``system``, and its
mixing weight by the extra field ``lam`` (default: the run's validation choice); ``top_k`` and
``ignore_eos`` (as in vLLM) are further extras. Errors are OpenAI-shaped JSON (``{"error":
{"message", "type", "param", "code"}}``) with a 4xx status for every mistake a client can fix, and
the server keeps serving after them.

Why requests are parsed by hand (not FastAPI's body models): a body over the size limit must be
refused before it is read whole, and malformed JSON must get the same error shape as any other
bad field.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import MLPMemError
from .log import log
from .serving import Batcher, Busy, Decoding, Job

MODEL_ALIAS = "mlpmemory"  # the model id that means "the run's default system"


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


# -- request bodies ---------------------------------------------------------------------------------

class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # 0: greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    seed: int | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # extras of this server
    system: str | None = None
    lam: float | None = Field(None, ge=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1)
    ignore_eos: bool = False  # as vLLM: always max_tokens tokens


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False


_UNSUPPORTED = {"n": 1, "echo": False, "logprobs": None, "best_of": None, "presence_penalty": 0.0,
                "frequency_penalty": 0.0}


@dataclass
class ServeLimits:
    max_tokens: int = 1024  # per request
    max_request_bytes: int = 1_000_000
    default_completion_tokens: int = 16  # OpenAI's default for /v1/completions


# -- the server ---------------------------------------------------------------------------------------

class Server:
    """The systems, their default lambdas, the limits and the batcher behind the routes."""

    def __init__(self, lm, systems: dict, lambdas: dict, batcher: Batcher, limits: ServeLimits,
                 api_key: str | None = None):
        self.lm, self.systems, self.lambdas, self.batcher, self.limits = lm, systems, lambdas, batcher, limits
        self.api_key = api_key
        self.default_system = "memory" if "memory" in systems else next(iter(systems))
        cfg = lm.model.config
        self.context = int(getattr(cfg, "max_position_embeddings", None) or lm.tokenizer.model_max_length)

    def resolve(self, req: _Sampling) -> tuple[str, float]:
        """(system name, lambda) of a request."""
        name = req.system or (self.default_system if req.model == MODEL_ALIAS else req.model)
        if name not in self.systems:
            what = "system" if req.system else "model"
            raise ApiError(404, f"The {what} `{name}` does not exist here; served: {', '.join(self.model_ids())}",
                           param=what, code="model_not_found")
        system = self.systems[name]
        if req.lam is not None and not system.has_lambda:
            raise ApiError(400, f"system {name} does not mix with a lambda; drop `lam`", param="lam")
        lam = req.lam if req.lam is not None else self.lambdas.get(name) or 0.0
        return name, float(lam) if system.has_lambda else 0.0

    def model_ids(self) -> list[str]:
        return [*self.systems, MODEL_ALIAS]

    def check(self, req: _Sampling) -> None:
        for name, default in _UNSUPPORTED.items():
            value = getattr(req, name, default)
            if value is not None and value is not False and value != default:
                raise ApiError(400, f"`{name}` is not supported by this server", param=name)
        if req.max_tokens is not None and req.max_tokens > self.limits.max_tokens:
            raise ApiError(400, f"max_tokens {req.max_tokens} is over this server's limit of {self.limits.max_tokens}",
                           param="max_tokens")

    def decoding(self, req: _Sampling, system: str, lam: float) -> Decoding:
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ApiError(400, "`stop` takes up to 4 non-empty strings", param="stop")
        greedy = req.temperature == 0.0
        return Decoding(system=system, lam=lam, do_sample=not greedy,
                        temperature=req.temperature if not greedy else 1.0,
                        top_p=req.top_p if not greedy and req.top_p < 1.0 else None,
                        top_k=req.top_k if not greedy else None, stops=tuple(stops), seed=req.seed,
                        ignore_eos=req.ignore_eos)

    def token_ids(self, texts: list[str], max_tokens: int | None, param: str) -> tuple[list[list[int]], list[int]]:
        """Token ids as `mlpmem generate` makes them, and each prompt's max_tokens (checked against the context)."""
        from .generation import _ids_of

        ids, limits = [], []
        for i, text in enumerate(texts):
            try:
                row = _ids_of(self.lm.tokenizer, text, i)
            except MLPMemError as e:
                raise ApiError(400, str(e), param="prompt") from None
            room = self.context - len(row)
            want = max_tokens if max_tokens is not None else min(self.limits.max_tokens, room)
            if want > room or room < 1:
                raise ApiError(400, f"This model's maximum context length is {self.context} tokens. However, you "
                                    f"requested {len(row) + max(want, 1)} tokens ({len(row)} in the prompt, "
                                    f"{max(want, 1)} in the completion). Please reduce the prompt or {param}.",
                               param=param, code="context_length_exceeded")
            ids.append(row)
            limits.append(want)
        return ids, limits


def _chunk(kind: str, rid: str, created: int, model: str, index: int, text: str | None, finish: str | None,
           role: bool = False) -> dict:
    if kind == "chat":
        delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
        choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}
    choice = {"index": index, "text": text or "", "finish_reason": finish, "logprobs": None}
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _sse(payload) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _read_json(request: Request, limit: int) -> dict:
    size = request.headers.get("content-length")
    if size and size.isdigit() and int(size) > limit:
        raise ApiError(413, f"request body of {int(size):,} bytes is over the limit of {limit:,}")
    body = b""
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise ApiError(413, f"request body is over the limit of {limit:,} bytes")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"malformed JSON body: {e}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the JSON body must be an object")
    return data


def _validated(cls, data: dict):
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        raise ApiError(400, f"{loc}: {err['msg']}" if loc else err["msg"], param=loc or None) from None


async def _respond(server: Server, request: Request, req: _Sampling, kind: str, texts: list[str], max_tokens,
                   decoding: Decoding, model: str):
    ids, limits = server.token_ids(texts, max_tokens, "max_completion_tokens" if kind == "chat" else "max_tokens")
    loop, events = asyncio.get_running_loop(), asyncio.Queue()
    jobs = [Job(ids=row, decoding=decoding, max_tokens=m, events=events, loop=loop, index=i)
            for i, (row, m) in enumerate(zip(ids, limits))]
    try:
        server.batcher.submit(jobs)
    except Busy as e:
        raise ApiError(429, str(e), type_="rate_limit_error") from None
    rid, created = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
    prompt_tokens = sum(len(r) for r in ids)
    extra = {"system": decoding.system, "lam": decoding.lam}
    if req.stream:
        usage = bool((req.stream_options or {}).get("include_usage"))
        return StreamingResponse(_stream(jobs, events, kind, rid, created, model, prompt_tokens, usage),
                                 media_type="text/event-stream")
    ends = await _collect(request, jobs, events)
    if ends is None:  # the client went away: nothing to answer
        return JSONResponse({}, status_code=499)
    choices = [{"index": i, "finish_reason": e["finish_reason"], "logprobs": None,
                **({"message": {"role": "assistant", "content": e["text"]}} if kind == "chat" else {"text": e["text"]})}
               for i, e in sorted(ends.items())]
    return JSONResponse({"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
                         "created": created, "model": model, "choices": choices,
                         "usage": _usage(prompt_tokens, sum(e["completion_tokens"] for e in ends.values())),
                         "mlpmemory": extra})


async def _collect(request: Request, jobs: list[Job], events: asyncio.Queue) -> dict | None:
    ends: dict[int, dict] = {}
    try:
        while len(ends) < len(jobs):
            try:
                index, what, payload = await asyncio.wait_for(events.get(), timeout=0.5)
            except TimeoutError:
                if await request.is_disconnected():
                    return None
                continue
            if what == "error":
                raise ApiError(503, payload, type_="server_error")
            if what == "end":
                ends[index] = payload
        return ends
    finally:
        for job in jobs:  # a client gone (or an error) stops the rows still generating
            job.cancelled.set()


async def _stream(jobs, events, kind, rid, created, model, prompt_tokens, include_usage):
    ended, completion_tokens = 0, 0
    try:
        if kind == "chat":
            for job in jobs:
                yield _sse(_chunk(kind, rid, created, model, job.index, None, None, role=True))
        while ended < len(jobs):
            index, what, payload = await events.get()
            if what == "error":
                yield _sse({"error": {"message": payload, "type": "server_error", "param": None, "code": None}})
                break
            if what == "delta":
                yield _sse(_chunk(kind, rid, created, model, index, payload, None))
            else:
                ended += 1
                completion_tokens += payload["completion_tokens"]
                yield _sse(_chunk(kind, rid, created, model, index, None, payload["finish_reason"]))
        if include_usage:
            yield _sse({"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                        "created": created, "model": model, "choices": [],
                        "usage": _usage(prompt_tokens, completion_tokens)})
        yield "data: [DONE]\n\n"
    finally:  # also when the client disconnects (the response task is cancelled)
        for job in jobs:
            job.cancelled.set()


def create_app(server: Server) -> FastAPI:
    """The FastAPI application; the batcher is closed when the app shuts down."""

    @asynccontextmanager
    async def lifespan(app):
        yield
        await run_in_threadpool(server.batcher.close)
        log(f"serve: shut down cleanly after {server.batcher.load()['batches']} generate calls")

    app = FastAPI(title="mlpmemory", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        return ApiError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def _server_error(request, exc: Exception):
        return ApiError(500, f"{type(exc).__name__}: {exc}", type_="server_error").response()

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if server.api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {server.api_key}".encode()):
                return ApiError(401, "Incorrect API key provided", code="invalid_api_key").response()
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "systems": list(server.systems), **server.batcher.load()}

    @app.get("/v1/models")
    async def models():
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "mlpmemory", "system": name,
                 "label": s.label, "lam": server.lambdas.get(name)} for name, s in server.systems.items()]
        data.append({"id": MODEL_ALIAS, "object": "model", "created": 0, "owned_by": "mlpmemory",
                     "system": server.default_system, "label": "the run's default system",
                     "lam": server.lambdas.get(server.default_system)})
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = _validated(CompletionRequest, await _read_json(request, server.limits.max_request_bytes))
        server.check(req)
        name, lam = server.resolve(req)
        prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        if not prompts:
            raise ApiError(400, "`prompt` holds no text", param="prompt")
        texts, _ = await run_in_threadpool(server.systems[name].transform_prompts, prompts)
        max_tokens = req.max_tokens or server.limits.default_completion_tokens
        return await _respond(server, request, req, "text", texts, max_tokens, server.decoding(req, name, lam),
                              req.model)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        from .generation import chat_text

        req = _validated(ChatRequest, await _read_json(request, server.limits.max_request_bytes))
        req.max_tokens = req.max_completion_tokens or req.max_tokens
        server.check(req)
        name, lam = server.resolve(req)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            text = chat_text(server.lm.tokenizer, messages)
        except MLPMemError as e:
            raise ApiError(400, str(e), param="messages") from None
        except Exception as e:  # the template's own refusal (e.g. roles out of order)
            raise ApiError(400, f"the chat template refused these messages: {e}", param="messages") from None
        last_user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), messages[-1]["content"])
        texts, _ = await run_in_threadpool(server.systems[name].transform_prompts, [text], [last_user])
        return await _respond(server, request, req, "chat", texts, req.max_tokens, server.decoding(req, name, lam),
                              req.model)

    return app
