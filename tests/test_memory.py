"""MLP Memory network: sparse loss = dense loss, shapes per family, head init, checkpoints, sizing, overfitting."""

import json

import pytest
import torch
import torch.nn.functional as F

from mlpmemory.capture import resolve_site
from mlpmemory.errors import MLPMemError
from mlpmemory.memory import (
    PRESETS,
    GeluMLP,
    MLPMemory,
    MLPMemoryConfig,
    RMSNorm,
    SwiGLU,
    build_memory,
    count_parameters,
    detect_family,
    fused_memory_loss,
    memory_config_for,
    memory_loss,
    sparse_kl,
)


def random_csr(b, v, seed, with_zero=True, max_len=None):
    """CSR targets with row lengths 1..max_len (default v/3), row 0 a single certain token,
    optionally an explicit zero."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, (max_len or v // 3) + 1, (b,), generator=g)
    lens[0] = 1
    offsets = torch.zeros(b + 1, dtype=torch.long)
    offsets[1:] = lens.cumsum(0)
    ids = torch.cat([torch.randperm(v, generator=g)[:n] for n in lens.tolist()])
    raw = torch.rand(int(offsets[-1]), generator=g) ** 3
    if with_zero:
        raw[int(offsets[1])] = 0.0  # row 1 holds a stored zero probability
    probs = torch.cat([raw[offsets[i]:offsets[i + 1]] / raw[offsets[i]:offsets[i + 1]].sum() for i in range(b)])
    return offsets, ids.to(torch.int32), probs


def dense_target(offsets, ids, probs, b, v):
    t = torch.zeros(b, v, dtype=torch.float64)
    rows = torch.repeat_interleave(torch.arange(b), offsets.diff())
    t[rows, ids.long()] = probs.double()
    return t


def test_sparse_kl_matches_dense_value_and_gradient():
    b, v = 9, 60
    offsets, ids, probs = random_csr(b, v, seed=0)
    assert int(offsets[1] - offsets[0]) == 1 and probs[0] == 1.0
    logits = (3 * torch.randn(b, v, generator=torch.Generator().manual_seed(1))).requires_grad_(True)
    target = dense_target(offsets, ids, probs, b, v)
    dense = F.kl_div(torch.log_softmax(logits.double(), -1), target, reduction="none").sum(-1)
    sparse = sparse_kl(logits, offsets, ids, probs)
    assert sparse.shape == (b,) and sparse.dtype == torch.float32
    torch.testing.assert_close(sparse.double(), dense, rtol=1e-5, atol=1e-6)
    assert torch.isclose(sparse[0], -torch.log_softmax(logits[0], -1)[ids[0].long()])  # single non-zero row = NLL
    w = torch.rand(b, generator=torch.Generator().manual_seed(2))
    (g_sparse,) = torch.autograd.grad((sparse * w).sum(), logits)
    (g_dense,) = torch.autograd.grad((dense * w.double()).sum(), logits)
    assert torch.isfinite(g_sparse).all()
    torch.testing.assert_close(g_sparse, g_dense.float(), rtol=1e-4, atol=1e-6)


def test_sparse_kl_is_float32_on_bf16_logits():
    b, v = 5, 40
    offsets, ids, probs = random_csr(b, v, seed=3)
    logits = torch.randn(b, v, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    got = sparse_kl(logits, offsets, ids, probs.half())
    want = F.kl_div(torch.log_softmax(logits.double(), -1), dense_target(offsets, ids, probs.half(), b, v),
                    reduction="none").sum(-1)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_memory_loss_mixes_kl_and_cross_entropy():
    b, v = 7, 50
    offsets, ids, probs = random_csr(b, v, seed=5)
    logits = torch.randn(b, v, generator=torch.Generator().manual_seed(6), requires_grad=True)
    nxt = torch.randint(0, v, (b,), generator=torch.Generator().manual_seed(7)).to(torch.int32)
    ce = F.cross_entropy(logits, nxt.long())
    kl = sparse_kl(logits, offsets, ids, probs).mean()
    loss0, kl0, ce0 = memory_loss(logits, offsets, ids, probs, nxt, alpha=0.0)
    loss1, kl1, ce1 = memory_loss(logits, offsets, ids, probs, nxt, alpha=1.0)
    loss4, _, _ = memory_loss(logits, offsets, ids, probs, nxt)
    torch.testing.assert_close(loss0, ce)
    torch.testing.assert_close(loss1, kl)
    torch.testing.assert_close(loss4, 0.4 * kl + 0.6 * ce)
    torch.testing.assert_close((kl0, ce0), (kl, ce))
    assert not kl1.requires_grad and loss1.requires_grad
    torch.testing.assert_close(torch.autograd.grad(loss0, logits)[0], torch.autograd.grad(ce, logits)[0])


def without_row(offsets, ids, probs, row):
    """The same CSR targets with ``row`` emptied (no neighbour found)."""
    a, b = int(offsets[row]), int(offsets[row + 1])
    offsets = offsets.clone()
    offsets[row + 1:] -= b - a
    return offsets, torch.cat([ids[:a], ids[b:]]), torch.cat([probs[:a], probs[b:]])


def fused_case(b, d, v, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    offsets, ids, probs = without_row(*random_csr(b, v, seed=seed), row=3)  # row 1: a stored zero; row 3: empty
    hidden = (torch.randn(b, d, generator=g)).to(dtype).requires_grad_(True)
    weight = (torch.randn(v, d, generator=g) / d ** 0.5).to(dtype).requires_grad_(True)
    nxt = torch.randint(0, v, (b,), generator=g).to(torch.int32)
    return hidden, weight, offsets, ids, probs, nxt


@pytest.mark.parametrize("chunk_rows", [1, 4, 7, None, 1000])
@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_fused_loss_equals_memory_loss(chunk_rows, alpha):
    """Golden: the chunked head + loss equals memory_loss(hidden @ W.T) in value and in the
    gradients w.r.t. hidden and the head weight (float32, every chunking, empty/zero-prob rows)."""
    hidden, weight, offsets, ids, probs, nxt = fused_case(11, 8, 70, seed=21)
    assert int(offsets[4] - offsets[3]) == 0
    want = memory_loss(hidden @ weight.t(), offsets, ids, probs, nxt, alpha=alpha)
    got = fused_memory_loss(hidden, weight, offsets, ids, probs, nxt, alpha=alpha, chunk_rows=chunk_rows)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert got[0].requires_grad and not got[1].requires_grad and not got[2].requires_grad
    scale = 0.37  # a non-unit upstream gradient must scale both gradients
    g_want = torch.autograd.grad(want[0] * scale, (hidden, weight))
    g_got = torch.autograd.grad(got[0] * scale, (hidden, weight))
    for a, b in zip(g_got, g_want):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_fused_loss_in_bf16_matches_the_autocast_path():
    """Training's bf16 case: head matmuls in bf16, loss in float32, like memory_loss on autocast logits."""
    hidden, weight, offsets, ids, probs, nxt = fused_case(16, 32, 200, seed=22)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = torch.nn.functional.linear(hidden, weight)
    assert logits.dtype == torch.bfloat16
    want = memory_loss(logits, offsets, ids, probs.half(), nxt)
    got = fused_memory_loss(hidden, weight, offsets, ids, probs.half(), nxt, compute_dtype=torch.bfloat16,
                            chunk_rows=5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # same bf16 logits, float32 loss
    g_want = torch.autograd.grad(want[0], (hidden, weight))
    g_got = torch.autograd.grad(got[0], (hidden, weight))
    for a, b in zip(g_got, g_want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-4)  # bf16 rounding of the logit gradient


def test_fused_loss_without_grad_and_bad_shapes():
    hidden, weight, offsets, ids, probs, nxt = fused_case(6, 8, 40, seed=23)
    with torch.no_grad():
        got = fused_memory_loss(hidden, weight, offsets, ids, probs, nxt)
        want = memory_loss(hidden @ weight.t(), offsets, ids, probs, nxt)
    assert not got[0].requires_grad
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="CSR shapes"):
        fused_memory_loss(hidden, weight, offsets[:-1], ids, probs, nxt)


def test_detect_family():
    for t in ("llama", "mistral", "qwen2", "qwen3", "gemma2", "smollm3"):
        assert detect_family(t) == "llama", t
    for t in ("gpt2", "gpt_neox", "gptj"):
        assert detect_family(t) == "gpt2", t
    assert detect_family("opt") == detect_family("") == "generic"


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_forward_shapes_and_family_blocks(kind, tiny_llama, tiny_gpt2):
    lm = tiny_llama if kind == "llama" else tiny_gpt2
    site = resolve_site(lm.model, 0.7)
    config = memory_config_for(lm, site, n_blocks=2)
    assert config.family == kind and config.n_blocks == 2
    assert config.input_site == site.to_dict() and config.base_fingerprint == lm.fingerprint
    assert config.hidden_size == 32 and config.vocab_size == lm.model.get_output_embeddings().weight.shape[0]
    assert config.intermediate_size == (64 if kind == "llama" else 128)
    memory = build_memory(lm, config)
    ffn_type, norm_type = (SwiGLU, RMSNorm) if kind == "llama" else (GeluMLP, torch.nn.LayerNorm)
    assert all(isinstance(blk.ffn, ffn_type) and isinstance(blk.norm, norm_type) for blk in memory.blocks)
    assert isinstance(memory.norm, norm_type) and memory.lm_head.bias is None
    assert memory.num_parameters() == count_parameters(config)
    hidden = torch.randn(2, 5, 32)
    assert memory(hidden).shape == (2, 5, config.vocab_size)
    assert memory.hidden_forward(hidden).shape == (2, 5, 32)
    torch.testing.assert_close(memory.lm_head(memory.hidden_forward(hidden)), memory(hidden))
    assert memory(hidden.to(torch.bfloat16)).dtype == torch.float32  # input cast to the memory's dtype


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_head_and_final_norm_come_from_the_base(kind, tiny_llama, tiny_gpt2):
    lm = tiny_llama if kind == "llama" else tiny_gpt2
    with torch.no_grad():  # make the base's final norm distinguishable from a fresh one
        base_norm = lm.model.model.norm if kind == "llama" else lm.model.transformer.ln_f
        saved = {k: v.clone() for k, v in base_norm.state_dict().items()}
        for p in base_norm.parameters():
            p.add_(torch.linspace(0.1, 0.5, p.numel()))
    try:
        memory = build_memory(lm, memory_config_for(lm, "last", preset="tiny"))
        assert torch.equal(memory.lm_head.weight, lm.model.get_output_embeddings().weight.float())
        for name, p in base_norm.state_dict().items():
            assert torch.equal(memory.norm.state_dict()[name], p.float()), name
    finally:
        base_norm.load_state_dict(saved)
    random_head = build_memory(lm, memory_config_for(lm, "last", preset="tiny", head_init="random"))
    w = random_head.lm_head.weight
    assert not torch.equal(w, memory.lm_head.weight) and 0.015 < float(w.detach().std()) < 0.025


def test_save_load_round_trip_and_base_check(tiny_llama, tiny_gpt2, tmp_path):
    config = memory_config_for(tiny_llama, 0.7, n_blocks=2, lambda_default=0.3)
    memory = build_memory(tiny_llama, config)
    memory.save_pretrained(tmp_path / "mem")
    memory.save_pretrained(tmp_path / "mem")  # overwriting is fine and leaves no temp files
    assert sorted(p.name for p in (tmp_path / "mem").iterdir()) == ["config.json", "model.safetensors"]
    loaded = MLPMemory.from_pretrained(tmp_path / "mem", base=tiny_llama)
    assert loaded.config == config
    assert MLPMemoryConfig.from_dict(json.loads((tmp_path / "mem" / "config.json").read_text())) == config
    hidden = torch.randn(4, 32)
    with torch.no_grad():
        assert torch.equal(loaded(hidden), memory(hidden))
    assert MLPMemory.from_pretrained(tmp_path / "mem", dtype="bfloat16").lm_head.weight.dtype == torch.bfloat16
    with pytest.raises(MLPMemError, match="trained for base model .* the given base is"):
        MLPMemory.from_pretrained(tmp_path / "mem", base=tiny_gpt2)
    with pytest.raises(MLPMemError, match="trained for base model"):
        build_memory(tiny_gpt2, config)


def test_tokenizer_mismatch_and_broken_checkpoints(tiny_llama, tmp_path):
    config = memory_config_for(tiny_llama, "last", preset="tiny")
    memory = build_memory(tiny_llama, config)
    d = tmp_path / "mem"
    memory.save_pretrained(d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "tokenizer_fingerprint": "0" * 16}))
    with pytest.raises(MLPMemError, match="tokenizer"):
        MLPMemory.from_pretrained(d, base=tiny_llama)
    with pytest.raises(MLPMemError, match="different saves"):  # config no longer matches the weights' copy
        MLPMemory.from_pretrained(d)
    (d / "config.json").write_text(json.dumps(cfg))
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(MLPMemError, match="unreadable"):
        MLPMemory.from_pretrained(d)
    (d / "model.safetensors").unlink()
    with pytest.raises(MLPMemError, match="not a saved MLP memory"):
        MLPMemory.from_pretrained(d)
    (d / "config.json").write_text("{not json")
    (d / "model.safetensors").write_bytes(data)
    with pytest.raises(MLPMemError, match="not valid JSON"):
        MLPMemory.from_pretrained(d)


def test_config_validation():
    with pytest.raises(MLPMemError, match="family"):
        MLPMemoryConfig(hidden_size=8, vocab_size=10, n_blocks=1, intermediate_size=8, family="rnn")
    with pytest.raises(MLPMemError, match="n_blocks"):
        MLPMemoryConfig(hidden_size=8, vocab_size=10, n_blocks=0, intermediate_size=8)
    with pytest.raises(MLPMemError, match="invalid memory config"):
        MLPMemoryConfig.from_dict({"hidden_size": 8})


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_param_ratio_picks_the_closest_block_count(kind, tiny_llama, tiny_gpt2):
    lm = tiny_llama if kind == "llama" else tiny_gpt2
    base_params = sum(p.numel() for p in lm.model.parameters())
    seen = set()
    for ratio in (0.5, 1.0, 1.7, 3.0, 6.0):
        config = memory_config_for(lm, "last", param_ratio=ratio)
        n, target = config.n_blocks, ratio * base_params
        err = abs(count_parameters(config) - target)
        for other in range(1, n + 20):
            assert err <= abs(count_parameters(config, other) - target), (ratio, n, other)
        seen.add(n)
    assert len(seen) >= 4  # the ratio really drives the size
    assert (memory_config_for(lm, "last", preset="parity").n_blocks
            == memory_config_for(lm, "last", param_ratio=1.0).n_blocks)
    assert memory_config_for(lm, "last", param_ratio=1e-6).n_blocks == 1
    assert memory_config_for(lm, "last").n_blocks == PRESETS["small"]["n_blocks"]
    with pytest.raises(MLPMemError, match="unknown memory preset"):
        memory_config_for(lm, "last", preset="huge")
    with pytest.raises(MLPMemError, match="one of"):
        memory_config_for(lm, "last", n_blocks=2, param_ratio=1.0)


def test_memory_overfits_a_small_target_set():
    """64 hidden vectors with random sparse kNN targets: KL must fall from ~4.5 to well under 0.05."""
    torch.manual_seed(0)
    b, d, v = 64, 32, 300
    offsets, ids, probs = random_csr(b, v, seed=11, with_zero=False, max_len=16)
    hidden = torch.randn(b, d, generator=torch.Generator().manual_seed(12))
    nxt = ids[offsets[:-1]]
    memory = MLPMemory(MLPMemoryConfig(hidden_size=d, vocab_size=v, n_blocks=2, intermediate_size=64,
                                       head_init="random"))
    opt = torch.optim.Adam(memory.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is faster and immune to a busy machine
    try:
        for step in range(250):
            loss, kl, _ = memory_loss(memory(hidden), offsets, ids, probs, nxt, alpha=1.0)
            if step == 0:
                kl_start = float(kl)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        kl_end = float(sparse_kl(memory(hidden), offsets, ids, probs).mean())
    assert kl_start > 2.0
    assert kl_end < 0.05, kl_end


def test_parity_preset_reproduces_the_papers_gpt2_memories():
    """The paper's GPT-2 memories: parity with GPT-2 small/medium/large means 18/36/54 blocks
    (shapes only, meta device)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from mlpmemory.models import LoadedModel

    for (d, layers, heads), blocks in (((768, 12, 12), 18), ((1024, 24, 16), 36), ((1280, 36, 20), 54)):
        with torch.device("meta"):
            model = GPT2LMHeadModel(GPT2Config(n_embd=d, n_layer=layers, n_head=heads))
        lm = LoadedModel(model, None, f"gpt2-{d}", "", "fp", "tok", torch.device("cpu"), torch.float32)
        config = memory_config_for(lm, "last", preset="parity")
        assert (config.family, config.intermediate_size, config.n_blocks) == ("gpt2", 4 * d, blocks)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_final_norm_calibration_is_the_best_candidate_and_never_worse_than_uniform(kind, tiny_llama, tiny_gpt2):
    """Oracle: each candidate's cross-entropy recomputed through the memory's own forward; a Gemma-like
    inflated gain (~26) is not kept; the chosen init is recorded in the config."""
    import math

    import numpy as np

    from mlpmemory.capture import capture_inputs, resolve_site
    from mlpmemory.memory import CALIBRATION_SCALES, calibrate_final_norm

    lm = {"llama": tiny_llama, "gpt2": tiny_gpt2}[kind]
    site = resolve_site(lm.model, "last")
    ids = torch.randint(0, lm.model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), capture_inputs(lm.model, [site]) as cap:
        logits = lm.model(input_ids=ids).logits
    x = cap[site.module_path][:, :-1].reshape(-1, cap[site.module_path].shape[-1]).float().numpy()
    y = ids[:, 1:].reshape(-1).numpy()
    base_lp = torch.log_softmax(logits[:, :-1].float(), -1).reshape(-1, logits.shape[-1])[np.arange(len(y)), y]
    torch.manual_seed(0)
    memory = build_memory(lm, memory_config_for(lm, site, preset="tiny"))
    with torch.no_grad():
        memory.norm.weight.mul_(26.0)  # like Gemma's (1 + w) final-norm gains
    check = calibrate_final_norm(memory, x, y, base_lp.numpy(), rows=64)

    def ce(mem) -> float:
        with torch.no_grad():
            lp = torch.log_softmax(mem(torch.from_numpy(x[check_rows])).float(), -1)
        return float(-lp[np.arange(len(check_rows)), torch.from_numpy(y[check_rows])].mean())

    check_rows = np.unique(np.linspace(0, len(y) - 1, 64).astype(np.int64))
    assert ce(memory) == pytest.approx(check["ce"], rel=1e-4)  # the memory holds the chosen init
    assert check["ce"] <= min(min(v.values()) for v in check["candidates"].values()) + 1e-9
    assert check["ce"] <= check["uniform_ce"] + 0.01
    assert check["uniform_ce"] == pytest.approx(math.log(lm.model.config.vocab_size))
    assert check["ce"] <= check["ce_copied_as_is"] and check["rows"] == len(check_rows)
    assert memory.config.init_norm == check["chosen"] and check["chosen"]["scale"] in CALIBRATION_SCALES
    assert math.isfinite(check["base_lm_ce"])


def test_fused_loss_without_grad_mode_does_no_gradient_work_and_a_second_backward_works():
    from mlpmemory.memory import fused_memory_loss

    torch.manual_seed(0)
    h, w = torch.randn(6, 8, requires_grad=True), torch.randn(50, 8, requires_grad=True)
    offsets, ids = torch.tensor([0, 2, 3, 3, 5, 6, 8]), torch.randint(0, 50, (8,))
    probs, nxt = torch.rand(8), torch.randint(0, 50, (6,))
    with torch.no_grad():
        plain = fused_memory_loss(h, w, offsets, ids, probs, nxt)
    loss = fused_memory_loss(h, w, offsets, ids, probs, nxt)
    assert torch.equal(plain[0], loss[0].detach()) and not plain[0].requires_grad
    (2.0 * loss[0]).backward(retain_graph=True)
    first = w.grad.clone()
    w.grad = None
    (2.0 * loss[0]).backward()  # the saved gradients were not scaled in place by the first backward
    assert torch.equal(first, w.grad)
