"""Mixing is exact at both ends and equals probability-space mixing; the augmented LM and the kNN-LM
equal hand-computed oracles (captured states through the memory; brute-force neighbours)."""

from types import SimpleNamespace

import faiss
import numpy as np
import pytest
import torch

from mlpmemory.errors import MLPMemError
from mlpmemory.inference import KNNLM, MemoryAugmentedLM, mix_logprobs


def random_logprobs(rng, shape):
    x = rng.normal(size=shape) * 3
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("lam", [0.0, 0.01, 0.25, 0.5, 0.9, 1.0])
def test_log_space_mixing_equals_direct_mixing(lam):
    rng = np.random.default_rng(0)
    lp, lq = random_logprobs(rng, (7, 50)), random_logprobs(rng, (7, 50))
    direct = np.log((1 - lam) * np.exp(lp) + lam * np.exp(lq))
    np.testing.assert_allclose(mix_logprobs(lp, lq, lam), direct, rtol=1e-12, atol=1e-12)
    got_t = mix_logprobs(torch.from_numpy(lp), torch.from_numpy(lq), lam)
    assert isinstance(got_t, torch.Tensor)
    np.testing.assert_allclose(got_t.numpy(), direct, rtol=1e-12, atol=1e-12)
    # A mixture of distributions is a distribution.
    np.testing.assert_allclose(np.exp(mix_logprobs(lp, lq, lam)).sum(-1), 1.0, rtol=1e-12)


def test_mixing_ends_are_exact_and_zero_probability_is_handled():
    rng = np.random.default_rng(1)
    lp, lq = random_logprobs(rng, (3, 9)).astype(np.float32), random_logprobs(rng, (3, 9)).astype(np.float32)
    assert mix_logprobs(lp, lq, 0.0) is lp and mix_logprobs(lp, lq, 1) is lq
    t = torch.from_numpy(lp)
    assert mix_logprobs(t, torch.from_numpy(lq), 0) is t
    lq[:, 0] = -np.inf  # the other component gives token 0 probability 0
    mixed = mix_logprobs(lp, lq, 0.3)
    np.testing.assert_allclose(mixed[:, 0], np.log(0.7) + lp[:, 0], rtol=1e-6)
    assert np.isfinite(mixed).all()
    both = mix_logprobs(np.array([-np.inf]), np.array([-np.inf]), 0.5)
    assert both[0] == -np.inf
    for bad in (-0.1, 1.5, float("nan"), "x"):
        with pytest.raises(MLPMemError, match="lambda"):
            mix_logprobs(lp, lq, bad)


def make_memory(d, vocab, site, seed=0):
    torch.manual_seed(seed)
    mem = torch.nn.Sequential(torch.nn.Linear(d, 48), torch.nn.GELU(), torch.nn.Linear(48, vocab))
    mem.config = SimpleNamespace(input_site={"module": site}, lambda_default=0.3)
    return mem.eval()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_memory_augmented_lm_matches_hand_mixture(family, tiny_llama, tiny_gpt2):
    lm = tiny_llama if family == "llama" else tiny_gpt2
    model = lm.model
    vocab = model.config.vocab_size
    site = "model.layers.1.mlp" if family == "llama" else "transformer.h.1.mlp"
    mem = make_memory(32, vocab, site)
    ids = torch.randint(0, vocab, (2, 17), generator=torch.Generator().manual_seed(3))

    with torch.inference_mode():
        base_logp = torch.log_softmax(model(ids).logits.float(), -1)
        aug0 = MemoryAugmentedLM(lm, mem, lam=0.0)
        assert torch.equal(aug0(ids), base_logp)

        # Oracle: the FFN input, captured with a hook registered by hand.
        seen = {}
        module = dict(model.named_modules())[site]
        handle = module.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0].clone()))
        model(ids)
        handle.remove()
        q = torch.log_softmax(mem(seen["x"]).float(), -1)
        direct = torch.log(0.7 * base_logp.exp() + 0.3 * q.exp())
        aug = MemoryAugmentedLM(model, mem)  # lam from memory.config.lambda_default
        assert aug.lam == 0.3
        got, out = aug(ids, return_base_output=True)
        assert got.shape == (2, 17, vocab)
        torch.testing.assert_close(got, direct, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.log_softmax(out.logits.float(), -1), base_logp)

        # Oracle 2: the LM head's input is the last entry of output_hidden_states.
        mem_head = make_memory(32, vocab, "lm_head", seed=1)
        hs = model(ids, output_hidden_states=True).hidden_states[-1]
        q2 = torch.log_softmax(mem_head(hs).float(), -1)
        direct2 = torch.log(0.5 * base_logp.exp() + 0.5 * q2.exp())
        torch.testing.assert_close(MemoryAugmentedLM(model, mem_head, lam=0.5)(ids), direct2, rtol=1e-5, atol=1e-5)

        # Attention mask passes through to the base LM.
        mask = torch.ones_like(ids)
        torch.testing.assert_close(aug(ids, attention_mask=mask), got)


def test_memory_augmented_lm_refuses_bad_setup(tiny_llama):
    vocab = tiny_llama.model.config.vocab_size
    with pytest.raises(MLPMemError, match="has no module"):
        MemoryAugmentedLM(tiny_llama, make_memory(32, vocab, "model.layers.9.mlp"))
    plain = torch.nn.Linear(32, vocab)
    with pytest.raises(MLPMemError, match="input_site"):
        MemoryAugmentedLM(tiny_llama, plain, lam=0.2)
    with pytest.raises(MLPMemError, match="lambda"):
        MemoryAugmentedLM(tiny_llama, plain, input_site="last")
    wrong_vocab = MemoryAugmentedLM(tiny_llama, torch.nn.Linear(32, vocab + 3), lam=0.2, input_site="last")
    with pytest.raises(MLPMemError, match="vocabulary"):
        with torch.inference_mode():
            wrong_vocab(torch.zeros(1, 4, dtype=torch.long))


def brute_force_knn_logprob(keys, values, queries, targets, k, temperature):
    d = ((queries[:, None, :].astype(np.float64) - keys[None].astype(np.float64)) ** 2).sum(-1)
    out = []
    for row in range(len(queries)):
        nn = np.argsort(d[row])[:k]
        logits = -d[row, nn] / temperature
        w = np.exp(logits - logits.max())
        w /= w.sum()
        p = w[values[nn] == targets[row]].sum()
        out.append(np.log(p) if p > 0 else -np.inf)
    return np.array(out)


def test_knnlm_equals_brute_force(tmp_path):
    rng = np.random.default_rng(0)
    n, d, vocab, k, t = 300, 8, 20, 16, 4.0
    keys = rng.normal(size=(n, d)).astype(np.float32)
    values = rng.integers(0, vocab, n).astype(np.int32)
    queries = rng.normal(size=(25, d)).astype(np.float32)
    targets = rng.integers(0, vocab, 25)
    index = faiss.IndexFlatL2(d)
    index.add(keys)
    knn = KNNLM(index, values, k=k, temperature=t, lam=0.1, vocab_size=vocab, search_batch=7)
    got = knn.knn_logprob_of(queries, targets)
    want = brute_force_knn_logprob(keys, values, queries, targets, k, t)
    assert np.isneginf(want).any() and np.isfinite(want).any()  # both cases are exercised
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    fin = np.isfinite(want)
    np.testing.assert_allclose(got[fin], want[fin], rtol=1e-5, atol=1e-6)
    # Another temperature through the same object, and torch queries.
    want2 = brute_force_knn_logprob(keys, values, queries, targets, k, 0.5)
    got2 = knn.knn_logprob_of(torch.from_numpy(queries), targets, temperature=0.5)
    np.testing.assert_allclose(got2[fin], want2[fin], rtol=1e-5, atol=1e-6)

    full = knn.knn_logprobs_full(queries)
    assert full.shape == (25, vocab) and full.dtype == np.float32
    np.testing.assert_allclose(np.exp(full).sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(full[np.arange(25), targets][fin], got[fin], rtol=1e-5)
    assert knn.fingerprint == KNNLM(index, values, k=k).fingerprint
    with pytest.raises(MLPMemError, match="queries must be"):
        knn.knn_logprob_of(queries[:, :3], targets)


def test_knnlm_from_dirs(tmp_path):
    from mlpmemory.datastore import write_datastore_arrays
    from mlpmemory.index import build_index

    rng = np.random.default_rng(2)
    keys = rng.normal(size=(200, 8)).astype(np.float16)
    values = rng.integers(0, 30, 200).astype(np.int32)
    write_datastore_arrays(tmp_path / "ds", keys, values)
    build_index(tmp_path / "ds", tmp_path / "idx", recall_queries=16, recall_k=8)
    knn = KNNLM.from_dirs(tmp_path / "idx", tmp_path / "ds", k=10, temperature=2.0, lam=0.2)
    q = rng.normal(size=(5, 8)).astype(np.float32)
    tg = rng.integers(0, 30, 5)
    want = brute_force_knn_logprob(keys.astype(np.float32), values, q, tg, 10, 2.0)
    got = knn.knn_logprob_of(q, tg)
    fin = np.isfinite(want)
    np.testing.assert_array_equal(np.isneginf(got), ~fin)
    np.testing.assert_allclose(got[fin], want[fin], rtol=1e-5, atol=1e-6)
    assert knn.datastore_manifest["n"] == 200 and len(knn.fingerprint) == 16


def test_with_the_real_mlp_memory(tiny_llama, tmp_path):
    """The project's MLPMemory plugs in through config.input_site / lambda_default alone."""
    from mlpmemory.memory import MLPMemory, build_memory, memory_config_for

    cfg = memory_config_for(tiny_llama, "0.5", n_blocks=1, lambda_default=0.4, head_init="random")
    build_memory(tiny_llama, cfg).save_pretrained(tmp_path / "mem")
    mem = MLPMemory.from_pretrained(tmp_path / "mem", base=tiny_llama)
    aug = MemoryAugmentedLM(tiny_llama, mem)
    assert aug.lam == 0.4 and aug.site.module_path == cfg.input_site["module"]
    ids = torch.randint(0, cfg.vocab_size, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        seen = {}
        module = dict(tiny_llama.model.named_modules())[cfg.input_site["module"]]
        handle = module.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0].clone()))
        base = torch.log_softmax(tiny_llama.model(ids).logits.float(), -1)
        handle.remove()
        q = torch.log_softmax(mem(seen["x"]).float(), -1)
        torch.testing.assert_close(aug(ids), torch.log(0.6 * base.exp() + 0.4 * q.exp()), rtol=1e-5, atol=1e-5)


# --- vocabulary-sized buffers, bounded by bytes (issue 16) ---------------------------------------

def _record_chunks(monkeypatch, budget: int) -> list:
    """A small byte budget, and the (rows, V) shape of every chunk scored, recorded."""
    import mlpmemory.inference as inf

    shapes, real = [], inf.target_logprobs
    monkeypatch.setattr(inf, "LOGPROB_CHUNK_BYTES", budget)
    monkeypatch.setattr(inf, "target_logprobs", lambda x, t: (shapes.append(tuple(x.shape)), real(x, t))[1])
    return shapes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [7, 1000, 50_000])
def test_chunked_target_logprobs_equal_log_softmax(dtype, vocab):
    from mlpmemory.inference import chunked_target_logprobs, rows_per_chunk

    g = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(37, vocab, generator=g) * 4).to(dtype)
    targets = torch.randint(0, vocab, (37,), generator=g)
    want = torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None])[:, 0]
    for budget in (1, 8 * vocab * 5, 8 * vocab * 36, 1 << 30):  # 1 row, 5 rows, 36 rows, all rows per chunk
        got = chunked_target_logprobs(lambda s, e: logits[s:e], targets, vocab, budget)
        assert got.dtype == torch.float32 and got.shape == (37,)
        assert float((got - want).abs().max()) < 1e-5
        assert torch.equal(got, want)  # the chunking never changes a bit
    assert rows_per_chunk(262_144) == 128 and rows_per_chunk(49_152) == 682 and rows_per_chunk(10**9, 1) == 1
    assert chunked_target_logprobs(lambda s, e: logits[s:e], targets[:0], vocab).shape == (0,)


def test_chunk_size_bounds_the_vocabulary_buffers(monkeypatch):
    from mlpmemory.inference import memory_token_logprobs, rows_per_chunk

    torch.manual_seed(0)
    memory = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 300)).eval()
    hidden, targets = torch.randn(50, 16), torch.randint(0, 300, (50,))
    with torch.no_grad():
        want = torch.log_softmax(memory(hidden), -1).gather(-1, targets[:, None])[:, 0]
        shapes = _record_chunks(monkeypatch, 8 * 300 * 6)  # 6 rows per chunk
        got = memory_token_logprobs(memory, hidden, targets)
    assert rows_per_chunk(300) == 6
    assert shapes == [(6, 300)] * 8 + [(2, 300)]  # (no config.vocab_size: probed on one row, not scored)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def _tiny_family(kind: str, vocab: int = 300):
    from transformers import AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig

    torch.manual_seed(1)
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=128, final_logit_softcapping=2.0)
    cfg = {"gemma2": Gemma2Config, "gemma3_text": Gemma3TextConfig}[kind](**common)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "gemma3_text", "fallback"])
def test_lm_scoring_forward_equals_the_models_own_logits(family, tiny_llama, tiny_gpt2, monkeypatch):
    import mlpmemory.inference as inf

    model = {"llama": tiny_llama.model, "gpt2": tiny_gpt2.model, "fallback": tiny_llama.model}.get(family)
    model = model if model is not None else _tiny_family(family)
    if family == "fallback":  # a family whose head cannot be reproduced: the model's own logits are scored
        monkeypatch.setattr(inf, "PLAIN_HEAD_TYPES", frozenset())
    assert (inf.output_head(model) is None) == (family == "fallback")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (3, 20), generator=g)
    rows, pos = torch.tensor([0, 0, 1, 2, 2, 2]), torch.tensor([0, 5, 18, 3, 4, 10])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        want = torch.log_softmax(logits.float(), -1)[rows, pos, ids[rows, pos + 1]]
        shapes = _record_chunks(monkeypatch, 8 * model.config.vocab_size * 4)
        states, score = inf.lm_scoring_forward(model, input_ids=ids)
        got = score(states[rows, pos], ids[rows, pos + 1])
        kept, _ = inf.lm_scoring_forward(model, input_ids=ids, logits_to_keep=4)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert shapes == [(4, model.config.vocab_size), (2, model.config.vocab_size)]
    assert kept.shape[:2] == (3, 4)
    torch.testing.assert_close(kept, states[:, -4:], rtol=0, atol=1e-6)
    if family.startswith("gemma"):  # the soft-cap is applied: no logit beyond it
        assert float(logits.abs().max()) <= 2.0


def test_prefill_mixing_in_chunks_equals_the_dense_mixture(tiny_llama, monkeypatch):
    from mlpmemory.inference import MemoryAugmentedLM, memory_dense_logprobs, mixing_hook

    torch.manual_seed(0)
    d, vocab = tiny_llama.model.config.hidden_size, tiny_llama.model.config.vocab_size
    memory = torch.nn.Sequential(torch.nn.Linear(d, vocab)).eval()
    ids = torch.randint(0, vocab, (2, 15))
    with torch.no_grad():
        want = MemoryAugmentedLM(tiny_llama.model, memory, lam=0.3, input_site="model.layers.2.mlp")(ids)
        seen = []

        def component(h, v, timer):
            seen.append(h.shape[0])
            return memory_dense_logprobs(memory, h, v, timer)

        monkeypatch.setattr("mlpmemory.inference.LOGPROB_CHUNK_BYTES", 8 * vocab * 28)  # 28 // 4 = 7 rows
        with mixing_hook(tiny_llama.model, "model.layers.2.mlp", component, 0.3):
            got = tiny_llama.model(input_ids=ids).logits
    assert seen == [7, 7, 7, 7, 2]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tile_rows", [1, 3, 37, 100])
def test_target_logprobs_tiles_are_bit_identical(monkeypatch, dtype, tile_rows):
    """On the CPU, target_logprobs runs the log-softmax a few L2-sized rows at a time: never a different bit."""
    from mlpmemory import inference as inf

    g = torch.Generator().manual_seed(tile_rows)
    logits = (torch.randn(37, 1000, generator=g) * 4).to(dtype)
    targets = torch.randint(0, 1000, (37,), generator=g)
    want = torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None])[:, 0]
    monkeypatch.setattr(inf, "LOGSOFTMAX_TILE_BYTES", 4 * 1000 * tile_rows)
    assert torch.equal(inf.target_logprobs(logits, targets), want)
