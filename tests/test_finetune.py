"""The fine-tuning baselines (+CPT, +LoRA) on copies of the tiny run: zero adapters are the base LM exactly,
an interrupted training resumes to the same weights, the systems refuse another base model, generate with
them equals the fine-tuned model loaded plainly, and eval-ppl reports their rows once they exist."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch
from helpers import synthetic_text
from safetensors.torch import load_file, save_file

from mlpmemory.cli import main
from mlpmemory.errors import MLPMemError
from mlpmemory.finetune import DIRS, FILES, METHODS, FinetuneSettings, Schedule, finetune, trainable_model
from mlpmemory.finetuned import lora_weights, window_logprobs
from mlpmemory.generation import generate
from mlpmemory.io import read_json
from mlpmemory.pipeline import open_run
from mlpmemory.systems import get_system

PROMPTS = ["the river city", "king of the north was born in"]
# ~5 steps of 2 windows (block 32, stride 16): checkpoints after steps 2, 4 and 5
SETTINGS = dict(tokens=160, windows_per_step=2, micro_windows=1, checkpoint_every=2)  # 2 passes per step


def _copy(tiny_run, where):
    shutil.copytree(tiny_run, where)
    return where


@pytest.fixture(scope="module")
def trained(tiny_run, tmp_path_factory, one_torch_thread):
    """A copy of the tiny run with both fine-tunes trained, uninterrupted."""
    root = _copy(tiny_run, tmp_path_factory.mktemp("finetuned") / "run")
    run = open_run(root)
    for method in METHODS:
        assert finetune(run, method, FinetuneSettings(**SETTINGS), progress=False)["complete"]
    return root


def _logits(model, tok, text):
    with torch.inference_mode():
        return model(torch.tensor([tok(text).input_ids])).logits


def test_zero_lora_is_the_base_lm_exactly(tiny_run, tmp_path, one_torch_thread):
    run = open_run(tiny_run)  # read only
    lm = run.lm
    base = _logits(lm.model, lm.tokenizer, PROMPTS[1])
    model, peft_model = trainable_model(lm, "lora", rank=4, alpha=8.0)  # peft's init: B = 0
    assert torch.equal(_logits(model.eval(), lm.tokenizer, PROMPTS[1]), base)
    from peft import get_peft_model_state_dict

    save_file({k: v.detach().contiguous() for k, v in get_peft_model_state_dict(peft_model).items()},
              str(tmp_path / FILES["lora"][0]))
    peft_model.peft_config["default"].save_pretrained(str(tmp_path))
    system = get_system("lora")(lora_weights(lm.model, tmp_path))
    with system.hook(lm.model):
        assert torch.equal(_logits(lm.model, lm.tokenizer, PROMPTS[1]), base)
        # the eval pass of a fine-tune walks the base pass's windows and batches: same log-probs, bit for bit
        test = read_json(tiny_run / "eval_test" / "manifest.json")
        lp = window_logprobs(lm, tiny_run / "corpus" / "heldout.i32", test, progress=False)
    want = np.fromfile(tiny_run / "eval_test" / "lm_logprob.f32", dtype=np.float32)
    np.testing.assert_array_equal(lp, want)


def test_budget_rank_and_files(trained):
    mem = read_json(trained / "memory" / "manifest.json")
    lora = read_json(trained / DIRS["lora"] / "manifest.json")
    cpt = read_json(trained / DIRS["cpt"] / "manifest.json")
    for m in (lora, cpt):
        assert m["budget"]["memory_tokens"] == mem["steps"] * mem["batch_rows"] and m["budget"]["tokens"] == 160
        assert 160 <= m["tokens_trained"] == m["tokens_planned"] < 160 + 2 * 32 and m["steps"] == m["steps_planned"]
        assert m["seconds"] > 0 and m["base_model_fingerprint"] == open_run(trained).lm.fingerprint
        assert not (trained / DIRS[m["method"]] / "checkpoint").exists()
        assert all(f in m["checksums"] for f in FILES[m["method"]])
    per_rank = 3 * (64 + 48 + 48 + 64 + 96 + 96 + 96)  # tiny llama: q, k, v, o, gate, up, down of 3 layers
    target = mem["memory_params"] - mem["head_params"]
    assert lora["lora"]["memory_non_head_params"] == target
    assert lora["lora"]["rank"] == max(1, round(target / per_rank))
    assert lora["trainable_params"] == lora["lora"]["params"] == lora["lora"]["rank"] * per_rank
    assert cpt["trainable_params"] == sum(p.numel() for p in open_run(trained).lm.model.parameters())
    # the default budget is the memory's: steps x rows per step, in datastore windows' scored tokens
    ds = read_json(trained / "datastore" / "manifest.json")
    from mlpmemory.corpus import sliding_windows

    sched = Schedule(sliding_windows(ds["n_tokens"], ds["block"], ds["stride"]), 2, 0, mem["steps"] * mem["batch_rows"])
    assert mem["steps"] * mem["batch_rows"] <= sched.tokens < mem["steps"] * mem["batch_rows"] + 2 * 32


@pytest.mark.parametrize("method", METHODS)
def test_killed_training_resumes_to_the_same_weights(trained, tmp_path, method, one_torch_thread):
    root = _copy(trained, tmp_path / "run")
    shutil.rmtree(root / DIRS[method])
    run = open_run(root)
    assert finetune(run, method, FinetuneSettings(**SETTINGS), progress=False, stop_after_steps=3) == {}
    assert (root / DIRS[method] / "checkpoint" / "state.json").exists()  # step 2's: step 2 is trained again
    assert read_json(root / DIRS[method] / "checkpoint" / "state.json")["step"] == 2
    assert finetune(open_run(root), method, FinetuneSettings(**SETTINGS), progress=False)["complete"]
    got = load_file(str(root / DIRS[method] / FILES[method][0]))
    want = load_file(str(trained / DIRS[method] / FILES[method][0]))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_systems_refuse_another_base_model(trained, tiny_tokenizer, tmp_path, capsys):
    from helpers import make_tiny_model

    other = make_tiny_model("llama", tiny_tokenizer, seed=1, save_to=tmp_path / "other")
    run = open_run(trained, model=other.path)
    for method in METHODS:
        with pytest.raises(MLPMemError, match="base model fingerprint"):
            get_system(method).load(run)
    capsys.readouterr()
    assert main(["generate", "--run-dir", str(trained), "--model", other.path, "--system", "cpt", "--prompt", "x"]) == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("mlpmem: error:")]
    assert len(errors) == 1 and "base model fingerprint" in errors[0]


def test_generate_with_cpt_equals_the_finetuned_model_loaded_plainly(trained, tmp_path):
    from mlpmemory.models import load_model

    run = open_run(trained)
    lm, system = run.lm, get_system("cpt").load(run)
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in lm.model.named_parameters()}
    plain_lm = load_model(str(trained / DIRS["cpt"]), device="cpu", dtype="float32")
    want = _logits(plain_lm.model, lm.tokenizer, PROMPTS[1])
    with system.hook(lm.model):
        assert torch.equal(_logits(lm.model, lm.tokenizer, PROMPTS[1]), want)
    assert not torch.allclose(_logits(lm.model, lm.tokenizer, PROMPTS[1]), want, atol=1e-4)  # it was trained
    base = generate(lm, PROMPTS, max_new_tokens=8)
    got = generate(lm, PROMPTS, system=system, max_new_tokens=8)
    plain = generate(plain_lm, PROMPTS, max_new_tokens=8)
    assert got.token_ids == plain.token_ids and got.texts == plain.texts
    assert generate(lm, PROMPTS, max_new_tokens=8).token_ids == base.token_ids  # restored after
    assert all(p.data_ptr() == before[n][0] and torch.equal(p, before[n][1]) for n, p in lm.model.named_parameters())
    out = tmp_path / "gen.jsonl"
    assert main(["generate", "--run-dir", str(trained), "--system", "cpt", "--prompt", PROMPTS[1],
                 "--max-new-tokens", "8", "--output", str(out)]) == 0
    assert json.loads(out.read_text())["text"] == generate(plain_lm, PROMPTS[1:], max_new_tokens=8).texts[0]


def test_lora_system_equals_peft_with_the_saved_adapter(trained):
    from peft import PeftModel

    run = open_run(trained)
    lm = run.lm
    base = _logits(lm.model, lm.tokenizer, PROMPTS[0])
    want = _logits(PeftModel.from_pretrained(copy.deepcopy(lm.model), str(trained / DIRS["lora"])).eval(),
                   lm.tokenizer, PROMPTS[0])
    assert not torch.allclose(want, base, atol=1e-4)  # trained
    with get_system("lora").load(run).hook(lm.model):
        got = _logits(lm.model, lm.tokenizer, PROMPTS[0])
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    assert torch.equal(_logits(lm.model, lm.tokenizer, PROMPTS[0]), base)


def test_eval_ppl_reports_cpt_and_lora_once_trained(tiny_run, trained, capsys):
    before = read_json(tiny_run / "eval" / "ppl.json")["test"]["systems"]
    assert "cpt" not in before and "lora" not in before
    assert main(["eval-ppl", "--run-dir", str(trained)]) == 0
    table = capsys.readouterr().out
    rows = read_json(trained / "eval" / "ppl.json")["test"]["systems"]
    assert rows["base"]["ppl"] == before["base"]["ppl"] and rows["memory"]["ppl"] == before["memory"]["ppl"]
    for method in METHODS:
        r = rows[method]
        assert r["lambda"] is None and np.isfinite(r["ppl"]) and r["tokens_trained"] >= 160
        assert (trained / "eval_test" / f"{method}_logprob.f32").exists() and f"| {method} (" in table
    assert rows["lora"]["lora_rank"] == read_json(trained / DIRS["lora"] / "manifest.json")["lora"]["rank"]
    assert main(["eval-ppl", "--run-dir", str(trained)]) == 0  # finished: the same report, nothing recomputed
    assert read_json(trained / "eval" / "ppl.json")["test"]["systems"] == rows
    capsys.readouterr()
    # the main job's table and results.json, and the out-of-domain table (any text file is an OOD set)
    other = trained.parent / "other.txt"
    other.write_text(synthetic_text(200, seed=5))
    assert main(["run", "--run-dir", str(trained), "--ood", str(other)]) == 0
    printed = capsys.readouterr().out
    results = read_json(trained / "results.json")
    for method, label in (("cpt", "+ CPT"), ("lora", "+ LoRA")):
        assert results["ppl"][method] == rows[method]["ppl"] and f"| {label} | {rows[method]['ppl']:.3f} |" in printed
        assert results["finetuned"][method]["tokens_trained"] == rows[method]["tokens_trained"]
        assert results["out_of_domain"]["other"]["systems"][method]["ppl"] > 1
    assert printed.count("| + LoRA |") == 2  # the test table and the out-of-domain table


def test_finetune_command(trained, tmp_path, capsys, one_torch_thread):
    root = _copy(trained, tmp_path / "run")
    shutil.rmtree(root / DIRS["lora"])
    assert main(["finetune", "--run-dir", str(root), "--method", "lora", "--ft-tokens", "40", "--lora-rank", "2"]) == 0
    out = capsys.readouterr().out
    assert "finetune lora: complete" in out and "LoRA rank 2" in out
    m = read_json(root / DIRS["lora"] / "manifest.json")
    assert m["lora"]["rank"] == 2 and m["lora"]["rank_rule"] == "given" and m["budget"]["rule"] == "given"


def test_gpt2_lora_merge_equals_peft_and_dropout_runs_resume_exactly(tiny_gpt2, tmp_path, one_torch_thread):
    """GPT-2: adapters on c_attn / c_proj / c_fc (Conv1D, weights stored (in, out)); its dropout draws random numbers,
    so an exact resume needs the checkpoint's RNG state."""
    from helpers import tiny_run_args, write_docs
    from peft import PeftModel, get_peft_model_state_dict

    model, peft_model = trainable_model(tiny_gpt2, "lora", rank=4, alpha=8.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)  # as if trained
    save_file({k: v.detach().contiguous() for k, v in get_peft_model_state_dict(peft_model).items()},
              str(tmp_path / FILES["lora"][0]))
    peft_model.peft_config["default"].save_pretrained(str(tmp_path))
    assert json.loads((tmp_path / FILES["lora"][1]).read_text())["fan_in_fan_out"] is True
    lm = tiny_gpt2
    want = _logits(PeftModel.from_pretrained(copy.deepcopy(lm.model), str(tmp_path)).eval(), lm.tokenizer, PROMPTS[1])
    base = _logits(lm.model, lm.tokenizer, PROMPTS[1])
    tensors = lora_weights(lm.model, tmp_path)
    assert {n.rsplit(".", 2)[-2] for n in tensors} == {"c_attn", "c_proj", "c_fc"}
    with get_system("lora")(tensors).hook(lm.model):
        torch.testing.assert_close(_logits(lm.model, lm.tokenizer, PROMPTS[1]), want, atol=2e-5, rtol=1e-5)
    assert torch.equal(_logits(lm.model, lm.tokenizer, PROMPTS[1]), base) and not torch.allclose(want, base, atol=1e-3)

    write_docs(tmp_path / "docs.jsonl", 20)
    a = tmp_path / "a"
    assert main(["run", *tiny_run_args(a, lm.path, tmp_path / "docs.jsonl", "--memory-preset", "tiny",
                                       "--no-rag-ppl")]) == 0
    b = _copy(a, tmp_path / "b")
    for method in METHODS:
        assert finetune(open_run(a), method, FinetuneSettings(**SETTINGS), progress=False)["complete"]
        assert finetune(open_run(b), method, FinetuneSettings(**SETTINGS), progress=False, stop_after_steps=3) == {}
        assert finetune(open_run(b), method, FinetuneSettings(**SETTINGS), progress=False)["complete"]
        got, ref = (load_file(str(r / DIRS[method] / FILES[method][0])) for r in (b, a))
        assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
