"""`mlpmem serve` live on localhost, talked to with the real `openai` client (tiny models): answers equal
local `generate`, streaming equals non-streaming, batching changes nothing, every bad request gets its
4xx and the server keeps serving."""

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import openai
import pytest

from mlpmemory.generation import chat_text, generate
from mlpmemory.pipeline import open_run
from mlpmemory.systems import get_system

PROMPTS = ["the river city", "king of the north", "paris was built", "the army won the war at", "music", "london"]
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run_dir, **options):
    """A real uvicorn server on a free localhost port, in a thread; returns (namespace, stop)."""
    import uvicorn

    from mlpmemory.commands.serve import Options, build

    run = open_run(run_dir)
    run.lm.tokenizer.chat_template = CHAT_TEMPLATE  # the tiny tokenizer has none
    app, server = build(run, Options(**options))
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=_free_port(), log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert uv.started
    url = f"http://127.0.0.1:{uv.config.port}"

    def stop():
        uv.should_exit = True
        thread.join(30)

    return SimpleNamespace(url=url, server=server, uv=uv, thread=thread), stop


@pytest.fixture(scope="module")
def served(tiny_run):
    ns, stop = start_server(tiny_run, max_batch=4, max_tokens_limit=200, max_request_bytes=20_000, batch_wait_ms=100)
    yield ns
    stop()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def local(tiny_run):
    """The same run loaded separately: local generation never shares the server's model object."""
    run = open_run(tiny_run)
    run.lm.tokenizer.chat_template = CHAT_TEMPLATE
    return SimpleNamespace(run=run, systems={n: get_system(n).load(run) for n in ("base", "memory", "knn_lm")})


def local_text(local, system: str, prompt: str, max_tokens: int, lam=None, stops=None) -> str:
    s = local.systems[system]
    lam = (s.default_lambda(local.run) if lam is None else lam) if s.has_lambda else 0.0
    return generate(local.run.lm, [prompt], system=s, lam=lam, max_new_tokens=max_tokens, stop_strings=stops).texts[0]


def test_health_and_models(served, client):
    health = httpx.get(served.url + "/health").json()
    assert health["status"] == "ok" and {"base", "memory", "knn_lm"} <= set(health["systems"])
    ids = {m.id for m in client.models.list().data}
    assert {"base", "memory", "knn_lm", "mlpmemory"} <= ids


@pytest.mark.parametrize("system", ["base", "memory", "knn_lm"])
def test_completion_equals_local_generate(client, local, system):
    for prompt in PROMPTS[:3]:
        got = client.completions.create(model=system, prompt=prompt, max_tokens=12, temperature=0)
        assert got.choices[0].text == local_text(local, system, prompt, 12), (system, prompt)
        assert got.usage.completion_tokens <= 12 and got.choices[0].finish_reason in ("stop", "length")
        assert got.model_extra["mlpmemory"]["system"] == system


def test_lambda_zero_is_the_base_model(client, local):
    for prompt in PROMPTS:
        base = client.completions.create(model="base", prompt=prompt, max_tokens=10, temperature=0).choices[0].text
        for system in ("memory", "knn_lm"):
            got = client.completions.create(model=system, prompt=prompt, max_tokens=10, temperature=0,
                                            extra_body={"lam": 0.0})
            assert got.choices[0].text == base == local_text(local, "base", prompt, 10)
    # and lambda is honoured: lam=1 (the memory alone) differs from base on some prompt
    alone = [client.completions.create(model="memory", prompt=p, max_tokens=10, temperature=0,
                                       extra_body={"lam": 1.0}).choices[0].text for p in PROMPTS]
    assert alone != [local_text(local, "base", p, 10) for p in PROMPTS]


def test_system_by_body_field_and_alias(client, served):
    p = PROMPTS[0]
    by_field = client.completions.create(model="mlpmemory", prompt=p, max_tokens=8, temperature=0,
                                         extra_body={"system": "knn_lm"})
    by_model = client.completions.create(model="knn_lm", prompt=p, max_tokens=8, temperature=0)
    assert by_field.choices[0].text == by_model.choices[0].text
    alias = client.completions.create(model="mlpmemory", prompt=p, max_tokens=8, temperature=0)
    assert alias.model_extra["mlpmemory"]["system"] == served.server.default_system == "memory"
    assert alias.model_extra["mlpmemory"]["lam"] == served.server.lambdas["memory"]


def test_chat_uses_the_chat_template(client, local):
    messages = [{"role": "system", "content": "answer briefly"}, {"role": "user", "content": "where is paris"}]
    got = client.chat.completions.create(model="memory", messages=messages, max_tokens=12, temperature=0)
    want = local_text(local, "memory", chat_text(local.run.lm.tokenizer, messages), 12)
    assert got.choices[0].message.content == want and got.choices[0].message.role == "assistant"


def _streamed(stream) -> tuple[str, str, object]:
    text, finish, usage = "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            piece = c.delta.content if hasattr(c, "delta") else c.text
            text += piece or ""
            finish = c.finish_reason or finish
    return text, finish, usage


@pytest.mark.parametrize("stop", [None, [" the", "."]])
def test_streaming_equals_non_streaming(client, stop):
    for prompt in PROMPTS:
        kw = dict(model="memory", prompt=prompt, max_tokens=24, temperature=0, stop=stop)
        whole = client.completions.create(**kw)
        text, finish, usage = _streamed(client.completions.create(**kw, stream=True,
                                                                    stream_options={"include_usage": True}))
        assert (text, finish) == (whole.choices[0].text, whole.choices[0].finish_reason), prompt
        assert usage.completion_tokens == whole.usage.completion_tokens
        if stop:
            assert not any(s in text for s in stop)
    messages = [{"role": "user", "content": PROMPTS[1]}]
    whole = client.chat.completions.create(model="knn_lm", messages=messages, max_tokens=16, temperature=0)
    text, finish, _ = _streamed(client.chat.completions.create(model="knn_lm", messages=messages, max_tokens=16,
                                                               temperature=0, stream=True))
    assert (text, finish) == (whole.choices[0].message.content, whole.choices[0].finish_reason)


def test_stop_strings_like_local_generate(client, local):
    for prompt in PROMPTS:
        got = client.completions.create(model="memory", prompt=prompt, max_tokens=30, temperature=0, stop=[" the"])
        assert got.choices[0].text == local_text(local, "memory", prompt, 30, stops=[" the"])
        assert " the" not in got.choices[0].text


def test_concurrent_requests_equal_sequential_ones(client, served):
    settings = [(p, "memory" if i % 2 else "base", 6 + 3 * i) for i, p in enumerate(PROMPTS)]

    def ask(s):
        prompt, system, n = s
        return client.completions.create(model=system, prompt=prompt, max_tokens=n, temperature=0).choices[0].text

    sequential = [ask(s) for s in settings]
    before = served.server.batcher.load()["batches"]
    with ThreadPoolExecutor(len(settings)) as pool:
        together = list(pool.map(ask, settings))
    assert together == sequential
    assert served.server.batcher.load()["batches"] - before < len(settings)  # some requests shared a batch
    # several prompts in one request: one batch, choices in order
    many = client.completions.create(model="base", prompt=PROMPTS[:4], max_tokens=8, temperature=0)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert [c.text for c in many.choices] == [ask((p, "base", 8)) for p in PROMPTS[:4]]


def test_sampling_is_reproducible_with_a_seed(client):
    kw = dict(model="memory", prompt=PROMPTS[2], max_tokens=12, temperature=0.9, top_p=0.9)
    first = client.completions.create(**kw, seed=7).choices[0].text
    assert client.completions.create(**kw, seed=7).choices[0].text == first
    others = {client.completions.create(**kw, seed=s).choices[0].text for s in (8, 9, 10)}
    assert others - {first}  # it really samples: other seeds give other text


def _post(served, path, body, **kw):
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(served.url + path, content=data, headers={"content-type": "application/json"}, timeout=60, **kw)


BAD = {
    "malformed JSON": ("/v1/completions", '{"model": "base", "prompt": ', 400, None),
    "not an object": ("/v1/completions", "[1, 2]", 400, None),
    "missing prompt": ("/v1/completions", {"model": "base"}, 400, "prompt"),
    "unknown model": ("/v1/completions", {"model": "gpt-9", "prompt": "x"}, 404, "model"),
    "unknown system": ("/v1/completions", {"model": "mlpmemory", "system": "nope", "prompt": "x"}, 404, "system"),
    "lambda over 1": ("/v1/completions", {"model": "memory", "prompt": "x", "lam": 1.5}, 400, "lam"),
    "lambda under 0": ("/v1/completions", {"model": "memory", "prompt": "x", "lam": -0.1}, 400, "lam"),
    "lambda for base": ("/v1/completions", {"model": "base", "prompt": "x", "lam": 0.3}, 400, "lam"),
    "prompt over the context": ("/v1/completions", {"model": "base", "prompt": "the river " * 200, "max_tokens": 8},
                                400, "max_tokens"),
    "max_tokens over the limit": ("/v1/completions", {"model": "base", "prompt": "x", "max_tokens": 201}, 400,
                                  "max_tokens"),
    "max_tokens 0": ("/v1/completions", {"model": "base", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    "n > 1": ("/v1/completions", {"model": "base", "prompt": "x", "n": 2}, 400, "n"),
    "temperature 5": ("/v1/completions", {"model": "base", "prompt": "x", "temperature": 5}, 400, "temperature"),
    "empty messages": ("/v1/chat/completions", {"model": "base", "messages": []}, 400, "messages"),
    "bad role": ("/v1/chat/completions", {"model": "base", "messages": [{"role": "robot", "content": "x"}]}, 400,
                 None),
    "body too large": ("/v1/completions", {"model": "base", "prompt": "x" * 30_000}, 413, None),
    "unknown route": ("/v1/embeddings", {"model": "base", "input": "x"}, 404, None),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_requests_get_openai_errors_and_the_server_goes_on(served, client, case):
    path, body, status, param = BAD[case]
    r = _post(served, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    if param:
        assert err["param"] == param, err
    after = client.completions.create(model="base", prompt="the", max_tokens=3, temperature=0)
    assert after.choices[0].finish_reason in ("stop", "length")


def test_openai_client_raises_its_own_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-9", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="lam"):
        client.completions.create(model="memory", prompt="x", max_tokens=2, extra_body={"lam": 2})


def test_bearer_token(served, monkeypatch):
    monkeypatch.setattr(served.server, "api_key", "s3cret")
    body = {"model": "base", "prompt": "the", "max_tokens": 2}
    assert _post(served, "/v1/completions", body).status_code == 401
    assert _post(served, "/v1/completions", body, ).json()["error"]["code"] == "invalid_api_key"
    assert _post(served, "/v1/completions", body, auth=None).status_code == 401
    ok = httpx.post(served.url + "/v1/completions", json=body, headers={"Authorization": "Bearer s3cret"}, timeout=60)
    assert ok.status_code == 200
    assert httpx.get(served.url + "/health").status_code == 200  # probes need no token
    keyed = openai.OpenAI(base_url=served.url + "/v1", api_key="s3cret", max_retries=0)
    assert keyed.completions.create(model="base", prompt="the", max_tokens=2).choices


def test_a_client_that_disconnects_stops_its_generation(served, monkeypatch):
    from mlpmemory import serving

    put = serving._Rows.put

    def slow_put(self, value):  # 10 ms a token: the full 200 tokens would take 2 s, a hang-up is seen far sooner
        time.sleep(0.01)
        put(self, value)

    monkeypatch.setattr(serving._Rows, "put", slow_put)
    batcher = served.server.batcher
    body = {"model": "knn_lm", "prompt": "the", "max_tokens": 200, "temperature": 1.0, "seed": 1, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", served.url + "/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and '"text": ""' not in line:
                break  # the first piece of text: now hang up
    deadline = time.monotonic() + 30
    while batcher.load()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert batcher.load() | {"batches": 0} == {"queued": 0, "running": 0, "batches": 0}
    last = batcher.recent[-1]
    assert last["cancelled"] and last["completion_tokens"] < 200, last


def test_shutdown_ends_streams_and_stops_the_worker(tiny_run):
    ns, stop = start_server(tiny_run, serve_systems="base")
    body = {"model": "base", "prompt": "the", "max_tokens": 200, "temperature": 1.0, "seed": 3, "stream": True,
            "ignore_eos": True}
    lines = []

    def read():
        with httpx.stream("POST", ns.url + "/v1/completions", json=body, timeout=60) as r:
            lines.extend(r.iter_lines())

    reader = threading.Thread(target=read)
    reader.start()
    while not ns.server.batcher.load()["running"] and reader.is_alive():
        time.sleep(0.01)
    stop()
    reader.join(30)
    assert not reader.is_alive() and not ns.thread.is_alive()
    assert not ns.server.batcher._thread.is_alive()


def test_loadtest_end_to_end(tiny_run, tmp_path):
    from mlpmemory.cli import main

    out = tmp_path / "lt"
    assert main(["loadtest", "--run-dir", str(tiny_run), "--load-requests", "3", "--concurrency", "1,2",
                 "--load-max-tokens", "4", "--load-prompt-tokens", "8", "--load-max-batch", "2",
                 "--load-out", str(out)]) == 0
    report = json.loads((out / "loadtest.json").read_text())
    assert [(r["system"], r["concurrency"]) for r in report["levels"]] == [
        ("base", 1), ("base", 2), ("memory", 1), ("memory", 2)]
    for r in report["levels"]:
        assert r["errors"] == 0 and r["tokens"] == 3 * 4, r  # ignore_eos: exactly max_tokens each
        assert 0 < r["ttft_ms_p50"] <= r["latency_ms_p95"]
    assert set(report["ratios"]) == {f"memory_over_base_tokens_per_s_at_concurrency_{c}" for c in (1, 2)}
    # SIGTERM: a graceful shutdown (uvicorn re-raises the signal once it has shut down)
    assert report["server_exit_status"] in (0, -15)
    assert "serve: shut down cleanly" in (out / "server.log").read_text()
    assert "| memory | 2 |" in (out / "loadtest.md").read_text()


def test_ignore_eos_generates_max_tokens_even_where_eos_comes_first(client):
    """Where a (seeded, hot) sample ends at EOS before max_tokens, ignore_eos still gives exactly max_tokens."""
    kw = dict(model="base", prompt="the river", max_tokens=200, temperature=2.0)
    early = next((seed for seed in range(40)
                  if client.completions.create(**kw, seed=seed).choices[0].finish_reason == "stop"), None)
    assert early is not None, "no seed ended at EOS: the test has no case"
    forced = client.completions.create(**kw, seed=early, extra_body={"ignore_eos": True})
    assert forced.usage.completion_tokens == 200 and forced.choices[0].finish_reason == "length"
