"""The systems registry: one interface for base, +MLP memory, +kNN-LM and +RAG (golden against the direct paths)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_generation import PROMPTS, peaky_memory, tiny_knn

from mlpmemory.capture import capture_inputs, resolve_site
from mlpmemory.errors import MLPMemError
from mlpmemory.inference import MemoryAugmentedLM, memory_logprobs, mix_logprobs
from mlpmemory.rag import Passage, rag_prompt
from mlpmemory.systems import (
    REGISTRY,
    BaseLM,
    KNNLMSystem,
    MemorySystem,
    RAGSystem,
    System,
    get_system,
    names,
    systems_for,
    tuned,
)


def test_registry_names_and_interface():
    assert names() == ["base", "memory", "knn_lm", "rag", "cpt", "lora"]
    assert [c.name for c in tuned()] == ["memory", "knn_lm"]
    for name, cls in REGISTRY.items():
        assert issubclass(cls, System) and cls.name == name and cls.label and get_system(name) is cls
    with pytest.raises(MLPMemError, match="unknown system 'warp'"):
        get_system("warp")
    assert [type(s) for s in systems_for()] == [BaseLM]


def test_token_and_dense_logprobs_equal_the_direct_computation(tiny_llama):
    memory, knn = peaky_memory(tiny_llama), tiny_knn(tiny_llama)
    site = resolve_site(tiny_llama.model, "last")
    ids = torch.tensor([tiny_llama.tokenizer(PROMPTS[1]).input_ids])
    with torch.inference_mode(), capture_inputs(tiny_llama.model, [site]) as cap:
        tiny_llama.model(ids)
    h, targets = cap[site.module_path][0, :-1], ids[0, 1:]
    vocab = tiny_llama.model.config.vocab_size
    mem, kn = MemorySystem(memory), KNNLMSystem(knn)
    assert mem.site() == kn.site() == site.module_path
    with torch.inference_mode():
        q = memory_logprobs(memory, h)
        want = q.gather(-1, targets[:, None])[:, 0].double().numpy()
        np.testing.assert_array_equal(mem.token_logprobs(h, targets), want)
        assert torch.equal(mem.dense_logprobs(h, vocab), q)
    np.testing.assert_array_equal(kn.token_logprobs(h, targets), knn.knn_logprob_of(h, targets.numpy()))
    np.testing.assert_allclose(kn.dense_logprobs(h, vocab).exp().numpy(), np.exp(knn.knn_logprobs_full(h)), atol=1e-7)


def test_hooks_mix_like_memory_augmented_lm_and_lambda_zero_is_base(tiny_llama):
    memory = peaky_memory(tiny_llama)
    model = tiny_llama.model
    ids = torch.tensor([tiny_llama.tokenizer(PROMPTS[0]).input_ids])
    with torch.inference_mode():
        base = torch.log_softmax(model(ids).logits.float(), -1)
        for system in systems_for(memory=memory, knn=tiny_knn(tiny_llama)):
            with system.hook(model, 0.0) as m:
                assert m is model and torch.equal(torch.log_softmax(model(ids).logits.float(), -1), base)
        with MemorySystem(memory).hook(model, 0.3):
            hooked = model(ids).logits
        want = MemoryAugmentedLM(model, memory, lam=0.3)(ids)
        torch.testing.assert_close(hooked, want, rtol=1e-6, atol=1e-6)
        q = memory_logprobs(memory, _hidden(model, ids))
        torch.testing.assert_close(hooked, mix_logprobs(base, q, 0.3), rtol=1e-6, atol=1e-6)


def _hidden(model, ids):
    site = resolve_site(model, "last")
    with capture_inputs(model, [site]) as cap:
        model(ids)
    return cap[site.module_path]


def test_rag_prompt_transform_and_lambda_defaults(tmp_path):
    class Retriever:
        def retrieve(self, queries, n):
            return [[Passage("d", f"about {q}", 1.0)][:n] for q in queries]

    rag = RAGSystem(Retriever(), n_passages=1)
    prompts, found = rag.transform_prompts(["the river", "paris"])
    assert prompts == [rag_prompt(f, p) for f, p in zip(found, ["the river", "paris"])]
    assert prompts[0] == "about the river\n\nthe river"
    assert RAGSystem(Retriever(), template="[{passages}] {prompt}").transform_prompts(["x"])[0] == ["[about x] x"]
    assert BaseLM().transform_prompts(["x"]) == (["x"], None) and not BaseLM().transforms_prompt

    class Run:
        def path(self, name):
            return tmp_path / name

    assert BaseLM().default_lambda(Run()) is None and KNNLMSystem.fallback_lambda(None) == 0.25
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "ppl.json").write_text('{"test": {"systems": {"knn_lm": {"lambda": 0.15}}}}')
    assert KNNLMSystem(object()).default_lambda(Run()) == 0.15
