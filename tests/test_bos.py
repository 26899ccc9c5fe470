"""BOS-aware windows (docs/method.md#windows): a tokenizer that puts a BOS before text gets it before
every window the model scores, never as a target; rows, positions and manifests follow."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import synthetic_text, tiny_run_args, write_docs

from mlpmemory.cli import main
from mlpmemory.corpus import sliding_windows
from mlpmemory.datastore import build_datastore, open_datastore
from mlpmemory.errors import MLPMemError
from mlpmemory.evaluate import build_eval_dir
from mlpmemory.models import bos_prefix

BLOCK, STRIDE = 32, 12


def write_text_tokens(path, tokenizer, n_words: int = 160) -> np.ndarray:
    """A stream of real text tokens (no special tokens, so no BOS inside it), written as int32."""
    ids = tokenizer(synthetic_text(n_words, seed=3), add_special_tokens=False).input_ids
    tokens = np.asarray(ids + [tokenizer.eos_token_id] + ids[:40], dtype=np.int32)
    tokens.tofile(path)
    return tokens


def hand_rows(lm, tokens, prefix: list[int]):
    """Per window, ``prefix + window`` through the model in a plain loop; the FFN inputs of layer 2 (key
    site "last") and layer 1 (memory site "0.5") caught by forward pre-hooks on the MLP modules."""
    model, caught = lm.model, {}
    hooks = [model.model.layers[i].mlp.register_forward_pre_hook(
        lambda mod, args, i=i: caught.__setitem__(i, args[0][0].clone())) for i in (1, 2)]
    keys, mems, values, lps = [], [], [], []
    try:
        for w in sliding_windows(len(tokens), BLOCK, STRIDE):
            ids = torch.tensor(prefix + tokens[w.begin:w.end].tolist())[None]
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0].float(), -1)
            for j in range(w.first_target, w.end):
                col = len(prefix) + j - 1 - w.begin  # the state that predicts stream token j
                keys.append(caught[2][col].numpy())
                mems.append(caught[1][col].numpy())
                values.append(tokens[j])
                lps.append(logp[col, tokens[j]].item())
    finally:
        for h in hooks:
            h.remove()
    return np.array(keys), np.array(mems), np.array(values), np.array(lps)


@pytest.fixture(scope="module")
def bos_eval_dir(tiny_llama_bos, tmp_path_factory):
    root = tmp_path_factory.mktemp("bos_eval")
    tokens = write_text_tokens(root / "t.i32", tiny_llama_bos.tokenizer)
    manifest = build_eval_dir(tiny_llama_bos, root / "t.i32", len(tokens), root / "ev", key_site="last",
                              mem_site="0.5", block=BLOCK, stride=STRIDE, batch_size=3, progress=False)
    return root, tokens, manifest


def test_bos_prefix_follows_the_tokenizer(tiny_tokenizer, tiny_bos_tokenizer, tiny_llama_bos, tiny_gpt2):
    from transformers import AutoTokenizer

    bos = tiny_bos_tokenizer.bos_token_id
    assert bos is not None and tiny_bos_tokenizer("the").input_ids[0] == bos
    assert bos_prefix(tiny_bos_tokenizer) == [bos]
    assert bos_prefix(AutoTokenizer.from_pretrained(tiny_llama_bos.path)) == [bos]  # as a run loads it
    assert bos_prefix(tiny_tokenizer) == [] and bos_prefix(tiny_gpt2.tokenizer) == []


def test_eval_dir_equals_a_hand_loop_with_bos_before_every_window(bos_eval_dir, tiny_llama_bos):
    root, tokens, manifest = bos_eval_dir
    bos = tiny_llama_bos.tokenizer.bos_token_id
    ds = open_datastore(root / "ev")
    assert manifest["bos_prefix"] == ds.manifest["bos_prefix"] == [bos]
    assert ds.manifest["key_site"]["layer"] == 2 and ds.manifest["mem_site"]["layer"] == 1
    keys, mems, values, lps = hand_rows(tiny_llama_bos, tokens, [bos])
    assert ds.n == len(tokens) - 1 == len(values)  # the rows of a window without a prefix
    np.testing.assert_array_equal(ds.values, tokens[1:])
    assert bos not in set(ds.values.tolist())  # never a target
    np.testing.assert_allclose(ds.lm_logprob, lps, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ds.keys.astype(np.float32), keys, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(ds.mem_inputs.astype(np.float32), mems, rtol=2e-3, atol=2e-3)
    # ... and not what the model gives without the BOS.
    plain_keys, _, _, plain = hand_rows(tiny_llama_bos, tokens, [])
    assert np.abs(ds.lm_logprob - plain).max() > 1e-2
    assert np.abs(ds.keys.astype(np.float32) - plain_keys).max() > 1e-2


def test_online_memory_inputs_read_the_shifted_positions(bos_eval_dir, tiny_llama_bos):
    from mlpmemory.train import OnlineInputs

    root, _, _ = bos_eval_dir
    ds = open_datastore(root / "ev")
    rows = np.array([0, 1, 30, 31, 45, ds.n - 1])
    online = OnlineInputs(tiny_llama_bos, ds, root / "t.i32")(rows)
    np.testing.assert_allclose(online.numpy(), ds.mem_inputs[rows].astype(np.float32), rtol=2e-3, atol=2e-3)


def test_a_datastore_built_without_the_prefix_is_refused(tiny_llama_bos, tiny_llama, tmp_path):
    tokens = write_text_tokens(tmp_path / "t.i32", tiny_llama_bos.tokenizer)
    kw = dict(key_site="last", mem_site=None, block=16, stride=8, progress=False)

    def built_before_the_prefix_existed(name, lm):
        build_datastore(lm, tmp_path / "t.i32", len(tokens), tmp_path / name, **kw)
        path = tmp_path / name / "manifest.json"
        m = json.loads(path.read_text())
        m.pop("bos_prefix")
        path.write_text(json.dumps(m))
        return (tmp_path / name / "keys.f16").stat().st_mtime_ns

    # No prefix then and now: still the same datastore, reused as it is.
    mtime = built_before_the_prefix_existed("plain", tiny_llama)
    build_datastore(tiny_llama, tmp_path / "t.i32", len(tokens), tmp_path / "plain", **kw)
    assert (tmp_path / "plain" / "keys.f16").stat().st_mtime_ns == mtime
    # Built without the BOS the tokenizer now adds: refused, naming the field.
    built_before_the_prefix_existed("bos", tiny_llama_bos)
    bos = tiny_llama_bos.tokenizer.bos_token_id
    with pytest.raises(MLPMemError, match=rf"bos_prefix=\[\] but now bos_prefix=\[{bos}\]"):
        build_datastore(tiny_llama_bos, tmp_path / "t.i32", len(tokens), tmp_path / "bos", **kw)


def test_rag_inputs_start_with_bos_and_without_passages_equal_the_base_pass(bos_eval_dir, tiny_llama_bos):
    from mlpmemory.rag import Passage, _chunk_inputs, ralm_logprobs

    root, tokens, _ = bos_eval_dir
    tok = tiny_llama_bos.tokenizer
    lp = ralm_logprobs(tiny_llama_bos, None, root / "t.i32", 0, len(tokens), block=BLOCK, stride=STRIDE,
                       retrieve_every=5, query_tokens=4, n_passages=0, batch_size=3, progress=False)
    np.testing.assert_allclose(lp, open_datastore(root / "ev").lm_logprob, rtol=1e-4, atol=1e-4)
    st = {"chunks_with_passage": 0}
    passage = Passage("d", "paris is the capital", 1.0)
    bos, sep, text = tok.bos_token_id, [tok.eos_token_id], tok("paris is the capital", add_special_tokens=False)
    [(ids, off, m)] = _chunk_inputs(tok, tokens.astype(np.int64), [(0, 10, 15)], [[passage]], sep, BLOCK, 4, st,
                                    [bos])
    assert ids == [bos] + text.input_ids + sep + tokens[0:14].tolist() and (off, m) == (9, 5)


def test_bench_prompts_start_with_bos(tiny_llama_bos):
    from types import SimpleNamespace

    from mlpmemory.commands.bench import Bench, Entry
    from mlpmemory.generation import StageTimer

    tok = tiny_llama_bos.tokenizer
    prompts = torch.tensor([tok("the river city", add_special_tokens=False).input_ids[:3]] * 2)
    bench = Bench(tiny_llama_bos, prompts, rag_n=1)
    assert bench.ids.tolist() == [[tok.bos_token_id] + row for row in prompts.tolist()]
    assert bench.texts == [tok.decode(row) for row in prompts.tolist()]  # what retrieval reads: no BOS
    rag = SimpleNamespace(transforms_prompt=True, transform_prompts=lambda texts: (["paris. " + t for t in texts], 0))
    ids, mask, _ = bench.inputs(Entry("rag", rag), [0, 1], StageTimer(torch.device("cpu")))
    first = mask.argmax(-1)
    assert ids[torch.arange(2), first].tolist() == [tok.bos_token_id] * 2 and int((ids == tok.bos_token_id).sum()) == 2


def test_prompts_keep_exactly_one_bos(tiny_bos_tokenizer, tiny_tokenizer):
    from mlpmemory.generation import _ids_of

    tok = tiny_bos_tokenizer
    once = tok("the river").input_ids
    assert once[0] == tok.bos_token_id and once[1] != tok.bos_token_id
    assert _ids_of(tok, "the river", 0) == once
    assert _ids_of(tok, "<bos>the river", 0) == once  # a chat template that writes the BOS itself
    assert _ids_of(tiny_tokenizer, "the river", 0) == tiny_tokenizer("the river").input_ids


def test_run_end_to_end_with_a_bos_tokenizer(tiny_llama_bos, tmp_path, capsys):
    write_docs(tmp_path / "docs.jsonl", 30)
    run_dir = tmp_path / "run"
    assert main(["run", *tiny_run_args(run_dir, tiny_llama_bos.path, tmp_path / "docs.jsonl", "--memory-preset",
                                       "tiny", "--no-rag-ppl")]) == 0
    bos = tiny_llama_bos.tokenizer.bos_token_id
    passes = [m for m in map(json.loads, map(Path.read_text, run_dir.rglob("manifest.json"))) if "key_site" in m]
    assert len(passes) >= 3 and all(m["bos_prefix"] == [bos] for m in passes)  # datastore, tune, test eval dir
    prompts = ["the river city", "paris is the capital of"]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    out = tmp_path / "gen.jsonl"
    assert main(["generate", "--run-dir", str(run_dir), "--prompt-file", str(tmp_path / "p.txt"), "--system",
                 "memory", "--lam", "0", "--max-new-tokens", "6", "--output", str(out)]) == 0
    capsys.readouterr()
    tok, model = tiny_llama_bos.tokenizer, tiny_llama_bos.model
    for prompt, rec in zip(prompts, (json.loads(line) for line in out.read_text().splitlines())):
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.inference_mode():
            ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                 pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
        assert rec["new_tokens"] == len(ref) and rec["text"] == tok.decode(ref, skip_special_tokens=True)
