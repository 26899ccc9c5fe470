"""Shared fixtures: tiny real tokenizers and models built offline (no hub), and one tiny finished run.

Helpers live in ``helpers.py`` (test modules import them from there, never from this file).
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from helpers import make_tiny_model, make_tiny_tokenizer, tiny_run_args, write_docs  # noqa: E402


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))


@pytest.fixture(scope="session")
def tiny_llama(tiny_tokenizer, tmp_path_factory):
    return make_tiny_model("llama", tiny_tokenizer, save_to=tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_bos_tokenizer(tmp_path_factory):
    """The tiny tokenizer with a ``<bos>`` it puts before every text by default (as Gemma's does)."""
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tiny_bos_tokenizer"), bos=True)


@pytest.fixture(scope="session")
def tiny_llama_bos(tiny_bos_tokenizer, tmp_path_factory):
    return make_tiny_model("llama", tiny_bos_tokenizer, save_to=tmp_path_factory.mktemp("tiny_llama_bos"))


@pytest.fixture(scope="session")
def tiny_gpt2(tiny_tokenizer, tmp_path_factory):
    return make_tiny_model("gpt2", tiny_tokenizer, save_to=tmp_path_factory.mktemp("tiny_gpt2"))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_llama):
    """One finished tiny run (`mlpmem run` on 40 synthetic documents, a 2-block memory), shared by every
    test that only reads a run or adds its own outputs to it (generate, bench)."""
    from mlpmemory.cli import main

    root = tmp_path_factory.mktemp("tiny_run")
    write_docs(root / "docs.jsonl", 40)
    run_dir = root / "run"
    assert main(["run", *tiny_run_args(run_dir, tiny_llama.path, root / "docs.jsonl", "--memory-preset", "tiny")]) == 0
    return run_dir


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: one torch thread is ~10x faster than two on a shared 2-core machine (restored after)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
