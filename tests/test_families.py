"""The family matrix (issue 16, item 4): a tiny random causal LM of every architecture users bring,
saved to a folder with the tiny tokenizer, goes through the real CLI (``mlpmem run``: datastore ->
index -> targets -> train -> eval-ppl, then ``mlpmem generate``), and for each family:

- the run completes and both capture sites resolve without flags, to a module of that model;
- lambda 0 is the base model: the eval sweep's memory row at lambda 0 has exactly the base
  perplexity, and ``generate --system memory --lam 0`` gives the base model's greedy tokens;
- the initial (untrained) memory, as the pipeline starts it, is not worse than uniform on the run's
  stored validation rows, and the training manifest records that check;
- windows start the way the tokenizer starts text: the stored keys are the hidden states of the
  held-out tokens read after the tokenizer's own prefix (a BOS for Llama, Mistral and the Gemmas,
  whose tokenizers add one by default, as the real ones do; nothing for the others), and the BOS is
  never a scored value.

Models are random (2 layers, d 32, vocab ~300); Gemma's final norm is given the large (1 + w) gain
trained Gemma checkpoints have (Gemma 3 270M: mean 26), which a fresh w = 0 would hide.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from helpers import tiny_run_args, write_docs

from mlpmemory.capture import capture_inputs, resolve_site
from mlpmemory.cli import main

PROMPTS = ["the river city", "paris is the capital of", "music film team game"]
UNIFORM_TOLERANCE = 0.05  # nats over log(V)


@dataclass(frozen=True)
class Family:
    name: str
    config: str  # transformers config class
    model: str  # transformers causal-LM class
    kwargs: dict = field(default_factory=dict)
    bos: bool = False  # the tokenizer adds a BOS by default
    gemma_gain: bool = False  # give the final (1 + w) norm a trained-like gain


_DECODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256)
FAMILIES = [
    Family("llama", "LlamaConfig", "LlamaForCausalLM", dict(_DECODER, tie_word_embeddings=True), bos=True),
    Family("mistral", "MistralConfig", "MistralForCausalLM", dict(_DECODER, sliding_window=16), bos=True),
    Family("qwen2", "Qwen2Config", "Qwen2ForCausalLM", dict(_DECODER, tie_word_embeddings=True)),
    Family("qwen3", "Qwen3Config", "Qwen3ForCausalLM",
           dict(_DECODER, head_dim=8, tie_word_embeddings=True, layer_types=["full_attention"] * 2)),
    Family("gemma2", "Gemma2Config", "Gemma2ForCausalLM",
           dict(_DECODER, head_dim=8, query_pre_attn_scalar=8, sliding_window=16,
                layer_types=["sliding_attention", "full_attention"]), bos=True, gemma_gain=True),
    Family("gemma3_text", "Gemma3TextConfig", "Gemma3ForCausalLM",
           dict(_DECODER, head_dim=8, query_pre_attn_scalar=8, sliding_window=16,
                layer_types=["sliding_attention", "full_attention"]), bos=True, gemma_gain=True),
    Family("phi3", "Phi3Config", "Phi3ForCausalLM", dict(_DECODER, original_max_position_embeddings=256)),
    Family("gpt2", "GPT2Config", "GPT2LMHeadModel", dict(n_embd=32, n_layer=2, n_head=4, n_positions=256)),
    Family("gpt_neox", "GPTNeoXConfig", "GPTNeoXForCausalLM",
           dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=256)),
    Family("opt", "OPTConfig", "OPTForCausalLM",
           dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32,
                max_position_embeddings=256)),
    Family("falcon", "FalconConfig", "FalconForCausalLM",
           dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256)),
]


def build_model(family: Family, tokenizer, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    cfg = getattr(transformers, family.config)(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                                               bos_token_id=bos, pad_token_id=tokenizer.pad_token_id,
                                               **family.kwargs)
    model = getattr(transformers, family.model)(cfg).eval().requires_grad_(False)
    if family.gemma_gain:
        with torch.no_grad():
            model.model.norm.weight.fill_(25.0)  # scales by 1 + w = 26
    return model


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    path = tmp_path_factory.mktemp("family_docs") / "docs.jsonl"
    write_docs(path, 24)
    return path


@pytest.fixture(scope="module", params=FAMILIES, ids=[f.name for f in FAMILIES])
def family_run(request, tmp_path_factory, docs, tiny_tokenizer, tiny_bos_tokenizer):
    """One finished run per family: (family, run dir, the run's loaded base LM, the run)."""
    from mlpmemory.config import make_config
    from mlpmemory.pipeline import Run

    family = request.param
    root = tmp_path_factory.mktemp(family.name)
    tok = tiny_bos_tokenizer if family.bos else tiny_tokenizer
    model_dir = root / "model"
    build_model(family, tok).save_pretrained(str(model_dir))
    tok.save_pretrained(str(model_dir))
    run_dir = root / "run"
    argv = ["run", *tiny_run_args(run_dir, model_dir, docs, "--memory-preset", "tiny", "--train-batch", "256",
                                  "--no-rag-ppl")]
    assert main(argv) == 0, family.name
    run = Run(make_config(None, None, base=json.loads((run_dir / "config.json").read_text())))
    assert type(run.lm.model).__name__ == family.model
    return family, run_dir, run.lm, run


def test_run_completes_and_capture_sites_resolve(family_run):
    from mlpmemory.io import read_manifest

    family, run_dir, lm, *_ = family_run
    manifest = read_manifest(run_dir / "datastore")
    modules = dict(lm.model.named_modules())
    n_layers = lm.model.config.get_text_config().num_hidden_layers
    for key in ("key_site", "mem_site"):
        site = manifest[key]
        assert site["module"] in modules, (family.name, key, site)
        assert site["layer"] == n_layers - 1 and site["n_layers"] == n_layers  # "last", found without flags
    results = json.loads((run_dir / "results.json").read_text())
    assert math.isfinite(results["ppl"]["base"]) and math.isfinite(results["ppl"]["mlp_memory"])


def test_lambda_zero_is_the_base_model_in_the_eval_sweep(family_run):
    run_dir = family_run[1]
    report = json.loads((run_dir / "eval" / "ppl.json").read_text())
    rows = report["validation"]["rows"]
    base = next(r for r in rows if r["system"] == "base")
    zero = [r for r in rows if r["system"] == "memory" and r["lambda"] == 0.0]
    assert len(zero) == 1
    assert zero[0]["ppl"] == base["ppl"] == report["validation"]["base_ppl"]
    assert zero[0]["nll"] == base["nll"]


def test_lambda_zero_generates_the_base_models_tokens(family_run, tmp_path, capsys):
    _, run_dir, lm, *_ = family_run
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    texts = {}
    for system, extra in (("base", []), ("memory", ["--lam", "0"])):
        out = tmp_path / f"{system}.jsonl"
        assert main(["generate", "--run-dir", str(run_dir), "--prompt-file", str(tmp_path / "prompts.txt"),
                     "--system", system, "--max-new-tokens", "8", "--gen-batch-size", "2", "--output", str(out),
                     *extra]) == 0
        recs = [json.loads(line) for line in out.read_text().splitlines()]
        assert [r["system"] for r in recs] == [system] * len(PROMPTS)
        texts[system] = [(r["text"], r["new_tokens"]) for r in recs]
    capsys.readouterr()
    assert texts["memory"] == texts["base"]
    # And the base system is the model's own greedy decoding, prompts tokenised as the tokenizer says.
    tok = lm.tokenizer
    for prompt, (text, n_new) in zip(PROMPTS, texts["base"]):
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.inference_mode():
            ref = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                    pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
        assert n_new == len(ref) and text == tok.decode(ref, skip_special_tokens=True)


def test_initial_memory_is_not_worse_than_uniform(family_run):
    """The untrained memory as the pipeline starts it (``build_memory``, then its final-norm gain calibrated
    on the validation slice: :func:`mlpmemory.pipeline.initial_memory`) scores the run's stored validation
    rows no worse than uniform, and the training manifest records that check."""
    from mlpmemory.datastore import open_datastore
    from mlpmemory.io import read_manifest
    from mlpmemory.memory import memory_config_for
    from mlpmemory.pipeline import initial_memory

    family, run_dir, lm, run = family_run
    tune = open_datastore(run_dir / "tune")
    torch.manual_seed(0)
    memory, check = initial_memory(run, memory_config_for(lm, tune.manifest["mem_site"], preset="tiny"))
    with torch.no_grad():
        logits = memory.eval()(torch.from_numpy(np.asarray(tune.mem_inputs, dtype=np.float32))).float()
    ce = float(torch.nn.functional.cross_entropy(logits, torch.from_numpy(np.asarray(tune.values, dtype=np.int64))))
    uniform = math.log(memory.config.vocab_size)
    assert ce <= uniform + UNIFORM_TOLERANCE, (family.name, ce, uniform, check)
    recorded = read_manifest(run_dir / "memory")["init_check"]
    assert recorded["ce"] <= recorded["uniform_ce"] + UNIFORM_TOLERANCE and recorded["chosen"] == check["chosen"]
    if family.gemma_gain:  # the case this guards: Gemma's (1 + w) gain, copied as is, starts far worse than uniform
        assert check["ce_copied_as_is"] > uniform + 1.0


def test_windows_start_as_the_tokenizer_says(family_run):
    from mlpmemory.datastore import open_datastore, read_tokens

    family, run_dir, lm, *_ = family_run
    tok = lm.tokenizer
    prefix = [tok.bos_token_id] if family.bos else []
    assert tok("the river").input_ids == prefix + tok("the river", add_special_tokens=False).input_ids
    tune, store = open_datastore(run_dir / "tune"), open_datastore(run_dir / "datastore")
    assert tune.manifest["bos_prefix"] == store.manifest["bos_prefix"] == prefix
    if prefix:  # the BOS is context, never a scored value
        assert not np.isin(prefix, tune.values).any() and not np.isin(prefix, store.values).any()
    held = read_tokens(run_dir / "corpus" / "heldout.i32", 0, 8).astype(np.int64)
    # The row that predicts held-out token 1 (row 1 when held-out token 0 is scored from the prefix alone).
    r = 0 if int(tune.values[0]) == held[1] else 1
    assert int(tune.values[r]) == held[1] and (r == 0 or int(tune.values[0]) == held[0])
    site = resolve_site(lm.model, tune.manifest["key_site"]["module"])
    ids = torch.tensor([prefix + held.tolist()])
    with torch.inference_mode(), capture_inputs(lm.model, [site]) as cap:
        lm.model(ids)
    want = cap[site.module_path][0, len(prefix)].float().numpy()  # the state at held-out token 0
    np.testing.assert_allclose(np.asarray(tune.keys[r], dtype=np.float32), want, rtol=1e-2, atol=1e-2)


def test_a_flattened_ffn_input_is_captured_per_position(tiny_tokenizer):
    """OPT's layer calls ``fc1`` on the normed state flattened to (batch * seq, d): the capture has the
    (batch, seq, d) shape, each position's row being the pre-FFN norm's output there."""
    model = build_model(next(f for f in FAMILIES if f.name == "opt"), tiny_tokenizer)
    site = resolve_site(model, "last")
    assert site.module_path == "model.decoder.layers.1.fc1"
    ids = torch.tensor([tiny_tokenizer(p).input_ids[:3] for p in PROMPTS])
    normed = []
    handle = model.model.decoder.layers[1].final_layer_norm.register_forward_hook(lambda m, a, out: normed.append(out))
    try:
        for forward in (model, model.base_model):  # the pipeline calls either
            normed.clear()
            with torch.inference_mode(), capture_inputs(model, [site]) as cap:
                forward(ids)
            assert cap[site.module_path].shape == (*ids.shape, 32)
            torch.testing.assert_close(cap[site.module_path], normed[0].reshape(*ids.shape, 32))
    finally:
        handle.remove()
