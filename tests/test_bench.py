"""`mlpmem bench` end to end on a tiny run, the FLOP model against a hand count, the stage split,
and the prefix-index cache (no wall-clock assertions)."""

import json

import pytest

from mlpmemory import bench_report
from mlpmemory.cli import main
from mlpmemory.commands import bench

TINY = ["--bench-prompts", "2", "--bench-prompt-tokens", "12", "--bench-decode-tokens", "4", "--bench-repeats", "2",
        "--bench-k", "16", "--bench-nprobe", "4", "--bench-rag-n", "2", "--bench-sizes", "300,1000000",
        "--bench-threads", "1"]  # one thread: the CI box is shared, and spinning OpenMP threads crawl


@pytest.fixture(scope="module")
def benched(tiny_run):
    import faiss
    import torch

    before = torch.get_num_threads(), faiss.omp_get_max_threads()
    assert main(["bench", "--run-dir", str(tiny_run), *TINY]) == 0
    # --bench-threads is for the bench only: later tests on the shared run sum in the same order as before
    assert (torch.get_num_threads(), faiss.omp_get_max_threads()) == before
    return json.loads((tiny_run / "bench" / "bench.json").read_text())


def test_bench_end_to_end(tiny_run, benched):
    out = tiny_run / "bench"
    for name in ("bench.md", "throughput.png", "stage_split.png", "scaling.png"):
        assert (out / name).stat().st_size > 0, name
    assert benched["order"] == list(bench.SYSTEMS) and set(benched["systems"]) == set(bench.SYSTEMS)
    rows = json.loads((tiny_run / "datastore" / "manifest.json").read_text())["n"]
    assert benched["scaling"]["sizes"] == [300, rows]  # 1,000,000 capped at the datastore's rows
    for pt in benched["scaling"]["points"]:
        assert set(pt["systems"]) == {"base", "memory", "knn_exact", "knn_ivfpq"}
        assert pt["systems"]["knn_exact"]["index"]["n"] == pt["n"]
        assert all(s[f"batch_{b}"]["tokens_per_s"] > 0 for s in pt["systems"].values() for b in (1, 8))
    for _name, r in benched["systems"].items():
        d = r["decode"]
        assert d["repeats"] == 2 and len(d["runs"]) == 2
        # 2 prompts x 3 steps
        assert all(len(run["step_ms"]) == 2 * 3 and len(run["ttft_ms"]) == 2 for run in d["runs"])
        assert d["latency_ms_p50"] <= d["latency_ms_p95"]
        assert r["prefill"]["batch_1"]["runs"][0]["tokens"] == 2 * 12
        assert r["prefill"]["batch_8"]["runs"][0]["tokens"] == 8 * 12  # 2 prompts cycled to a full batch
        assert r["memory"]["peak_rss_mb"] > 0
    # each system really ran its own machinery
    assert "memory_forward" in benched["systems"]["memory"]["decode"]["stage_s_per_token"]
    for k in ("knn_exact", "knn_ivfpq"):
        assert {"search", "distribution", "mixing"} <= set(benched["systems"][k]["decode"]["stage_s_per_token"])
    assert "retrieval" in benched["systems"]["rag"]["prefill"]["batch_1"]["stage_s_per_token"]
    assert "memory_forward" not in benched["systems"]["base"]["decode"]["stage_s_per_token"]
    assert benched["systems"]["knn_ivfpq"]["index"]["factory"].startswith("IVF")
    om = benched["overhead_model"]
    assert set(om) == {"prefill_batch_1", "prefill_batch_8", "decode"}
    assert all(row["predicted_overhead"] > 0 for row in om.values())
    md = (out / "bench.md").read_text()
    assert all(label in md for label in bench_report.LABELS.values()) and "predicted overhead" in md
    assert benched["machine"]["torch_threads"] >= 1 and benched["machine"]["cores"] >= 1


def test_stage_split_sums_to_at_most_total(benched):
    for r in benched["systems"].values():
        for block in (r["prefill"]["batch_1"], r["prefill"]["batch_8"], r["decode"]):
            for run in block["runs"]:
                st = run["stages"]
                sections = sum(v for k, v in st.items() if k not in ("base_forward", "total"))
                assert sections <= st["total"] + 1e-9  # timed sections are nested inside the total
                assert st["base_forward"] >= -1e-9
                assert abs(st["base_forward"] + sections - st["total"]) < 1e-9


def test_index_cache_reused(tiny_run, benched):
    files = sorted((tiny_run / "bench" / "indexes").rglob("index.faiss"))
    assert len(files) == 4  # Flat + IVF-PQ at N = 300 and N = all rows
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    assert main(["bench", "--run-dir", str(tiny_run), *TINY[:-2], "--bench-sizes", "300",
                 "--bench-systems", "knn_exact,knn_ivfpq", "--bench-repeats", "1"]) == 0
    assert {p: p.stat().st_mtime_ns for p in files} == mtimes


def test_flops_hand_count(tiny_llama):
    # tiny llama: d=32, 3 layers, 4 heads (head_dim 8), 2 KV heads, FFN 64, tied head, vocab V
    v, d, layers = len(tiny_llama.tokenizer), 32, 3
    per_layer = d * d + 2 * d * 16 + d * d + 3 * d * 64 + 2 * d  # q, k+v (2 KV heads x 8), o, SwiGLU, 2 RMSNorms
    non_emb = layers * per_layer + d  # + final norm
    ctx = 10.5
    got = bench_report.base_flops_per_token(tiny_llama.model, ctx)
    assert got["non_embedding_params"] == non_emb
    assert got["total"] == pytest.approx(2 * non_emb + 4 * layers * ctx * 4 * 8 + 2 * d * v)


def test_bad_options(tiny_run, capsys):
    assert main(["bench", "--run-dir", str(tiny_run), "--bench-systems", "base,warp"]) == 2
    assert "warp" in capsys.readouterr().err
    assert main(["bench", "--run-dir", str(tiny_run), "--bench-prompt-tokens", "100000"]) == 2
    assert "--bench-prompt-tokens" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_prefill_scoring_equals_the_dense_mixture_gathered(tiny_run, dtype):
    """Bench's prefill scores the targets only (chunked heads, mix_logprobs); it equals the generate hook's
    whole mixed distribution gathered at the same targets."""
    import numpy as np
    import torch

    from mlpmemory.generation import StageTimer
    from mlpmemory.pipeline import open_run
    from mlpmemory.systems import get_system

    run = open_run(tiny_run)
    systems = {name: get_system(name).load(run) for name in ("base", "memory", "knn_lm")}
    if dtype == "bfloat16":  # loaded in float32 (a bf16 base has another fingerprint), then cast
        run.lm.model.to(torch.bfloat16)
        systems["memory"].memory.to(torch.bfloat16)
    b = bench.Bench(run.lm, bench.load_prompts(run, 3, 12), rag_n=1)
    ids = b.ids
    targets = ids[:, 1:].reshape(-1)
    for name, lam in (("base", 0.0), ("memory", 0.4), ("knn_lm", 0.3)):
        entry = bench.Entry(name, systems[name], lam)
        fast = b.score(entry, ids, torch.ones_like(ids), None, StageTimer())
        with torch.inference_mode(), entry.system.hook(run.lm.model, lam, StageTimer()):
            dense = torch.log_softmax(run.lm.model(input_ids=ids).logits.float(), -1)[:, :-1]
        want = dense.reshape(-1, dense.shape[-1]).gather(-1, targets[:, None])[:, 0].double().numpy()
        np.testing.assert_allclose(fast, want, rtol=0, atol=1e-4 if dtype == "float32" else 3e-2, err_msg=name)
