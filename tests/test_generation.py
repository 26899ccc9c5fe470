"""Generation through HF `generate` with the memory / kNN-LM hooks equals slow no-cache oracles:
lambda 0 is the base model token for token, lambda > 0 follows the argmax of the full augmented
forward at every step, the KV cache is used, beams / sampling / stop strings work, teacher-forced
scoring is batch-independent, and `mlpmem generate` works end to end."""

import json

import faiss
import numpy as np
import pytest
import torch
from helpers import synthetic_text

from mlpmemory.capture import capture_inputs, resolve_site
from mlpmemory.cli import main
from mlpmemory.commands.generate import Options, parse_stop, read_prompts
from mlpmemory.config import make_config
from mlpmemory.errors import MLPMemError
from mlpmemory.generation import StageTimer, augmented, generate, score_continuations
from mlpmemory.inference import KNNLM, MemoryAugmentedLM, mix_logprobs
from mlpmemory.memory import build_memory, memory_config_for

PROMPTS = ["the river city", "paris is the capital of france and the king", "a", "music film team game school north"]


@pytest.fixture(params=["llama", "gpt2"])
def lm(request, tiny_llama, tiny_gpt2):
    return tiny_llama if request.param == "llama" else tiny_gpt2


def peaky_memory(lm):
    """A 1-block memory with a random, scaled-up head: its distribution is sharp and unlike the base's."""
    torch.manual_seed(5)
    memory = build_memory(lm, memory_config_for(lm, resolve_site(lm.model, "last"), n_blocks=1, head_init="random"))
    with torch.no_grad():
        memory.lm_head.weight.mul_(40.0)
    return memory.eval()


def tiny_knn(lm, k=8):
    """A kNN-LM over the tiny model's own key-site states on synthetic text (Flat index)."""
    site = resolve_site(lm.model, "last")
    ids = torch.tensor(lm.tokenizer(synthetic_text(400, seed=11)).input_ids[:200])[None]
    with torch.inference_mode(), capture_inputs(lm.model, [site]) as cap:
        lm.model(ids)
    keys = cap[site.module_path][0, :-1].float().numpy()
    values = ids[0, 1:].numpy().astype(np.int32)
    index = faiss.IndexFlatL2(keys.shape[1])
    index.add(keys)
    d, _ = index.search(keys[:50], 2)
    return KNNLM(index, values, k=k, temperature=float(np.median(d[:, 1])) / 2 + 1e-3, lam=0.5,
                 datastore_manifest={"key_site": site.to_dict()}, vocab_size=lm.model.config.vocab_size)


def oracle_greedy(lm, prompt, step_logp, n):
    """Slow greedy decoding: at each step the full sequence is run without cache, argmax of the last position."""
    ids = list(lm.tokenizer(prompt).input_ids)
    out, steps = [], []
    for _ in range(n):
        with torch.inference_mode():
            logp = step_logp(torch.tensor([ids + out]))
        steps.append(logp)
        out.append(int(logp.argmax()))
        if out[-1] == lm.tokenizer.eos_token_id:
            break
    return out, steps


def memory_step(lm, memory, lam):
    aug = MemoryAugmentedLM(lm.model, memory, lam=lam)
    return lambda ids: aug(ids)[0, -1]


def knn_step(lm, knn, lam):
    site = resolve_site(lm.model, "last")

    def step(ids):
        with capture_inputs(lm.model, [site]) as cap:
            logits = lm.model(ids).logits[0, -1]
        q = torch.from_numpy(knn.knn_logprobs_full(cap[site.module_path][0, -1:]))[0]
        return mix_logprobs(torch.log_softmax(logits.float(), -1), q, lam)
    return step


def test_lambda_zero_is_the_base_model_token_for_token(lm):
    tok = lm.tokenizer
    got = generate(lm, PROMPTS, lam=0.0, max_new_tokens=10, batch_size=3)
    lens = [len(tok(p).input_ids) for p in PROMPTS]
    assert len(set(lens)) > 2  # left padding is exercised
    for i, prompt in enumerate(PROMPTS):
        ids = torch.tensor([tok(prompt).input_ids])
        with torch.inference_mode():
            ref = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                                    pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
        one = generate(lm, [prompt], max_new_tokens=10)
        assert one.token_ids[0] == got.token_ids[i]
        assert got.token_ids[i] == ref[:len(got.token_ids[i])]
        assert got.texts[i] == tok.decode(got.token_ids[i], skip_special_tokens=True)
    # The memory at lambda 0 installs nothing: identical to the base.
    assert generate(lm, PROMPTS, memory=peaky_memory(lm), lam=0.0, max_new_tokens=10).token_ids == got.token_ids
    # And HF's own batched, left-padded generate agrees too.
    left = [[tok.pad_token_id] * (max(lens) - n) + tok(p).input_ids for p, n in zip(PROMPTS, lens)]
    mask = torch.tensor([[0] * (max(lens) - n) + [1] * n for n in lens])
    with torch.inference_mode():
        batch_ref = lm.model.generate(torch.tensor(left), attention_mask=mask, max_new_tokens=10, do_sample=False,
                                      pad_token_id=tok.pad_token_id)[:, max(lens):].tolist()
    for i, ids in enumerate(got.token_ids):
        assert batch_ref[i][:len(ids)] == ids


@pytest.mark.parametrize("component", ["memory", "knn"])
def test_mixed_generation_follows_the_no_cache_oracle(lm, component):
    lam, n = 0.5, 8
    if component == "memory":
        extra = {"memory": peaky_memory(lm)}
        step = memory_step(lm, extra["memory"], lam)
    else:
        extra = {"knn": tiny_knn(lm)}
        step = knn_step(lm, extra["knn"], lam)
    timer = StageTimer()
    got = generate(lm, PROMPTS, lam=lam, max_new_tokens=n, batch_size=4, timer=timer, **extra)
    base = generate(lm, PROMPTS, max_new_tokens=n)
    assert got.token_ids != base.token_ids  # the component changes what is generated
    want_stages = {"memory_forward", "mixing"} if component == "memory" else {"search", "distribution", "mixing"}
    assert set(timer.totals) == want_stages and set(got.stage_seconds) == want_stages
    assert timer.counts["mixing"] == n  # one hooked forward per generated token
    tok = lm.tokenizer
    for i, prompt in enumerate(PROMPTS):
        want, steps = oracle_greedy(lm, prompt, step, n)
        assert got.token_ids[i] == want
        # The logits HF's generate saw at every step are the oracle's mixed log-probs.
        ids = torch.tensor([tok(prompt).input_ids])
        with torch.inference_mode(), augmented(lm.model, lam=lam, **extra):
            out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(want), do_sample=False,
                                    pad_token_id=tok.pad_token_id, output_logits=True, return_dict_in_generate=True)
        assert len(out.logits) == len(steps)
        for seen, ref in zip(out.logits, steps):
            torch.testing.assert_close(seen[0], ref.float(), rtol=1e-4, atol=1e-4)


def test_kv_cache_is_used_and_memory_runs_only_where_needed(tiny_llama):
    lm, memory = tiny_llama, peaky_memory(tiny_llama)
    lengths, mem_rows = [], []
    h1 = lm.model.register_forward_pre_hook(lambda m, a, kw: lengths.append(kw["input_ids"].shape[1]), with_kwargs=True)
    h2 = memory.register_forward_pre_hook(lambda m, a: mem_rows.append(tuple(a[0].shape)))
    try:
        out = generate(lm, PROMPTS[:3], memory=memory, lam=0.3, max_new_tokens=6, batch_size=3)
    finally:
        h1.remove()
        h2.remove()
    width = max(len(lm.tokenizer(p).input_ids) for p in PROMPTS[:3])
    n_steps = max(len(t) for t in out.token_ids)
    assert n_steps == 6
    assert lengths == [width] + [1] * (n_steps - 1)  # prefill once, then one new position per step
    assert mem_rows == [(3, 32)] * n_steps  # the memory never sees the whole prompt


def test_beams_sampling_stop_strings_and_lengths(tiny_llama):
    lm, memory = tiny_llama, peaky_memory(tiny_llama)
    eos = lm.tokenizer.eos_token_id
    kw = dict(memory=memory, lam=0.4, max_new_tokens=7)
    greedy = generate(lm, PROMPTS, **kw)
    for ids in greedy.token_ids:  # exactly max_new_tokens unless EOS came first
        assert len(ids) == 7 or (ids[-1] == eos and len(ids) < 7)
    assert any(len(ids) == 7 for ids in greedy.token_ids)
    assert greedy.new_tokens == sum(map(len, greedy.token_ids)) and len(greedy.ttft_s) == len(PROMPTS)
    assert all(0 < t <= greedy.seconds for t in greedy.ttft_s)

    beams = generate(lm, PROMPTS, num_beams=3, batch_size=2, **kw)
    assert beams.token_ids == [generate(lm, [p], num_beams=3, **kw).token_ids[0] for p in PROMPTS]
    assert all(len(ids) == 7 or ids[-1] == eos for ids in beams.token_ids)

    # Sampling from the mixed distribution: top_k=1 is greedy; a seed reproduces without touching global RNG.
    assert generate(lm, PROMPTS, do_sample=True, top_k=1, seed=3, **kw).token_ids == greedy.token_ids
    state = torch.get_rng_state()
    s1 = generate(lm, PROMPTS, do_sample=True, sample_temperature=3.0, seed=1, **kw)
    assert torch.equal(torch.get_rng_state(), state)
    assert generate(lm, PROMPTS, do_sample=True, sample_temperature=3.0, seed=1, **kw).token_ids == s1.token_ids
    s2 = generate(lm, PROMPTS, do_sample=True, sample_temperature=3.0, top_p=0.99, seed=2, **kw)
    assert s1.token_ids != s2.token_ids

    # A stop string taken from the middle of a greedy continuation cuts it there.
    i = max(range(len(PROMPTS)), key=lambda j: len(set(greedy.token_ids[j])))
    full_ids, full = greedy.token_ids[i], greedy.texts[i]
    stop = lm.tokenizer.decode(full_ids[2:4])
    cut = generate(lm, [PROMPTS[i]], stop_strings=[stop, "never-there"], **kw)
    assert cut.texts[0] == full[:full.index(stop)]
    assert full_ids[:len(cut.token_ids[0])] == cut.token_ids[0] and len(cut.token_ids[0]) <= 4
    assert stop in lm.tokenizer.decode(cut.token_ids[0])


def test_a_stop_string_that_begins_in_the_prompt_does_not_stop(tiny_llama):
    """HF's own stop_strings fire on the prompt's end + the first new token; ours look at new text only."""
    lm, kw = tiny_llama, dict(max_new_tokens=6)
    checked = 0
    for prompt in [*PROMPTS, "the king of", "paris was"]:
        full = generate(lm, [prompt], **kw)
        text = full.texts[0]
        for back in (1, 2, 3):
            stop = prompt[-back:] + text[:1]  # spans the prompt and the continuation
            if text and stop not in text:
                got = generate(lm, [prompt], stop_strings=[stop], **kw)
                assert (got.texts[0], got.token_ids[0]) == (text, full.token_ids[0]), stop
                checked += 1
    assert checked


def test_parse_stop_and_prompt_files(tmp_path):
    assert parse_stop(r"a,b\n,\,x,,\\") == ["a", "b\n", ",x", "\\"]
    assert parse_stop(None) == []
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "x y"}) + "\n\n" + json.dumps({"prompt": "z"}) + "\n")
    assert read_prompts(str(tmp_path / "p.jsonl")) == ["x y", "z"]
    (tmp_path / "p.txt").write_text("one\n\ntwo three\n")
    assert read_prompts(str(tmp_path / "p.txt")) == ["one", "two three"]
    (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(MLPMemError, match="prompt"):
        read_prompts(str(tmp_path / "bad.jsonl"))
    for bad in (dict(), dict(prompt="a", prompt_file="b"), dict(prompt="a", num_beams=0),
                dict(prompt="a", top_p=1.5), dict(prompt="a", sample_temperature=0.0), dict(prompt="a", lam=2.0)):
        with pytest.raises(MLPMemError):
            Options(**bad).validate()


def test_score_continuations_batched_equals_unbatched_and_hand_computation(tiny_llama):
    lm, memory, knn = tiny_llama, peaky_memory(tiny_llama), tiny_knn(tiny_llama)
    tok = lm.tokenizer
    conts = [" river city", " the", " born in london and died", ""]
    batched = score_continuations(lm, PROMPTS, conts, memory=memory, knn=knn, batch_size=3)
    for i, (p, c) in enumerate(zip(PROMPTS, conts)):
        single = score_continuations(lm, [p], [c], memory=memory, knn=knn, batch_size=1)[0]
        c_ids = tok(c, add_special_tokens=False).input_ids
        assert set(batched[i]) == {"lm", "memory", "knn"}
        for name in ("lm", "memory", "knn"):
            assert batched[i][name].dtype == np.float64 and batched[i][name].shape == (len(c_ids),)
            np.testing.assert_allclose(batched[i][name], single[name], rtol=1e-5, atol=1e-5)
        if not c_ids:
            continue
        p_ids = tok(p).input_ids
        ids = torch.tensor([p_ids + c_ids])
        site = resolve_site(lm.model, "last")
        with torch.inference_mode(), capture_inputs(lm.model, [site]) as cap:
            logp = torch.log_softmax(lm.model(ids).logits[0].float(), -1)
        pos = torch.arange(len(p_ids) - 1, len(p_ids) + len(c_ids) - 1)
        target = torch.tensor(c_ids)
        np.testing.assert_allclose(batched[i]["lm"], logp[pos, target].double().numpy(), rtol=1e-5, atol=1e-5)
        with torch.inference_mode():
            q = torch.log_softmax(memory(cap[site.module_path][0, pos]).float(), -1)
        np.testing.assert_allclose(batched[i]["memory"], q[torch.arange(len(c_ids)), target].numpy(),
                                   rtol=1e-4, atol=1e-4)
        want_knn = knn.knn_logprob_of(cap[site.module_path][0, pos], c_ids)
        np.testing.assert_array_equal(np.isneginf(batched[i]["knn"]), np.isneginf(want_knn))


# -- the CLI --------------------------------------------------------------------------------------


@pytest.mark.parametrize("system", ["base", "memory", "knn_lm"])
def test_cli_generate_each_system(tiny_run, system, capsys):
    assert main(["generate", "--run-dir", str(tiny_run), "--prompt", "the river", "--system", system,
                 "--max-new-tokens", "5"]) == 0
    cap = capsys.readouterr()
    assert cap.out.strip()  # the streamed continuation
    assert f"system {system}" in cap.err and "tokens/s" in cap.err


def test_cli_generate_prompt_file_output_and_lambda(tiny_run, tiny_llama, tmp_path, capsys):
    from mlpmemory.config import make_config
    from mlpmemory.pipeline import Run
    from mlpmemory.systems import chosen_lambda

    (tmp_path / "p.txt").write_text("the river\nparis is\nmusic film team\n")
    out = tmp_path / "o" / "gen.jsonl"
    assert main(["generate", "--run-dir", str(tiny_run), "--prompt-file", str(tmp_path / "p.txt"), "--max-new-tokens",
                 "4", "--gen-batch-size", "2", "--output", str(out), "--stop", r"\n,xyz", "--chat"]) == 0
    cap = capsys.readouterr()
    assert cap.out.count(">>> ") == 3 and "chat template" in cap.err
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in recs] == ["the river", "paris is", "music film team"]
    lam = chosen_lambda(Run(make_config(None, None, base=json.loads((tiny_run / "config.json").read_text()))),
                        "memory")
    assert lam is not None and all(r["lam"] == lam and r["system"] == "memory" for r in recs)
    assert all(0 < r["new_tokens"] <= 4 and "\n" not in r["text"] for r in recs)
    # Same prompts through the API: identical texts.
    from mlpmemory.generation import load_memory
    run = Run(make_config(None, None, base=json.loads((tiny_run / "config.json").read_text())))
    api = generate(run.lm, ["the river", "paris is", "music film team"], memory=load_memory(run), lam=lam,
                   max_new_tokens=4, stop_strings=["\n", "xyz"])
    assert api.texts == [r["text"] for r in recs]
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "the city"}) + "\n")
    assert main(["generate", "--run-dir", str(tiny_run), "--prompt-file", str(tmp_path / "p.jsonl"),
                 "--num-beams", "2", "--max-new-tokens", "3", "--system", "knn_lm", "--lam", "0.3"]) == 0
    cap = capsys.readouterr()
    assert cap.out.strip() and "lambda 0.3" in cap.err


def test_cli_generate_errors(tiny_run, tiny_llama, tmp_path, capsys):
    def fails(argv, fragment):
        assert main(argv) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("mlpmem: error: ") and fragment in last, last

    empty = ["--run-dir", str(tmp_path / "empty"), "--model", str(tiny_llama.path), "--device", "cpu",
             "--dtype", "float32"]
    fails(["generate", *empty, "--prompt", "x"], "no config.json")  # a typo is refused, never built
    assert not (tmp_path / "empty").exists()
    (tmp_path / "empty").mkdir()  # a run with its settings but no stage built yet
    (tmp_path / "empty" / "config.json").write_text(json.dumps(make_config().to_dict()))
    fails(["generate", *empty, "--prompt", "x"], "mlpmem train")
    fails(["generate", *empty, "--prompt", "x", "--system", "knn_lm"], "mlpmem run")
    fails(["generate", "--run-dir", str(tiny_run)], "--prompt")
    fails(["generate", "--run-dir", str(tiny_run), "--prompt", "x", "--top-p", "2"], "--top-p")
    fails(["generate", "--run-dir", str(tiny_run), "--prompt-file", str(tmp_path / "none.txt")], "none.txt")
    # The base system needs no trained memory.
    assert main(["generate", *empty, "--prompt", "x", "--system", "base", "--max-new-tokens", "2"]) == 0
