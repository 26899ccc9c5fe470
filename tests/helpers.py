"""Test helpers (imported by test modules and conftest): synthetic text, tiny real tokenizers and
models built offline (no hub), and the CLI flags of a tiny whole-pipeline run."""

from __future__ import annotations

WORDS = ("the of and to in a is was for on as by with he at from his an were are which this be "
         "river city king war army music film team game school north south church station album "
         "paris london france river born died played wrote built won located capital island").split()


def synthetic_text(n_words: int, seed: int = 0) -> str:
    import random

    rng = random.Random(seed)
    out = []
    for i in range(n_words):
        out.append(rng.choice(WORDS))
        if i % 12 == 11:
            out.append(".")
    return " ".join(out)


def write_docs(path, n_docs: int, n_words: int = 60, seed0: int = 0) -> list[str]:
    """A JSONL corpus of ``n_docs`` synthetic documents (``text`` + ``title``); returns the texts."""
    import json

    texts = [synthetic_text(n_words, seed=seed0 + i) for i in range(n_docs)]
    with open(path, "w") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"text": t, "title": f"doc{i}"}) + "\n")
    return texts


def tiny_run_args(run_dir, model_path, corpus, *extra) -> list[str]:
    """CLI flags for a whole pipeline run on a tiny model in seconds (later flags override earlier ones)."""
    return ["--run-dir", str(run_dir), "--model", str(model_path), "--corpus", str(corpus), "--dtype", "float32",
            "--device", "cpu", "--block", "32", "--stride", "16", "--batch-size", "4", "--tune-tokens", "128",
            "--heldout-fraction", "0.3", "--k", "8", *extra]


def make_tiny_tokenizer(path, bos: bool = False) -> PreTrainedTokenizerFast:  # noqa: F821
    """A byte-level BPE tokenizer (vocab ~300) trained on synthetic text, saved to `path`.

    ``bos``: it also has a ``<bos>`` token that it puts before every text by default (a
    TemplateProcessing post-processor), as Llama-3's and Gemma's tokenizers do.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<pad>"] + (["<bos>"] if bos else [])
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([synthetic_text(2000, s) for s in range(5)], trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B:1",
                                                           special_tokens=[("<bos>", tok.token_to_id("<bos>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>",
                                   **({"bos_token": "<bos>"} if bos else {}))
    fast.save_pretrained(str(path))
    return fast


def make_tiny_model(kind: str, tokenizer, seed: int = 0, save_to=None):
    """A randomly initialised tiny causal LM ("llama" or "gpt2"), wrapped like a loaded model."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from mlpmemory.models import LoadedModel, model_fingerprint, tokenizer_fingerprint

    torch.manual_seed(seed)
    vocab = len(tokenizer)
    bos = tokenizer.eos_token_id if tokenizer.bos_token_id is None else tokenizer.bos_token_id
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                          bos_token_id=bos, tie_word_embeddings=True)
        model = LlamaForCausalLM(cfg)
    elif kind == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=3, n_head=4, n_positions=256,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(kind)
    model.eval().requires_grad_(False)
    path = ""
    if save_to is not None:
        model.save_pretrained(str(save_to))
        tokenizer.save_pretrained(str(save_to))
        path = str(save_to)
    return LoadedModel(model=model, tokenizer=tokenizer, name=path or f"tiny-{kind}", path=path,
                       fingerprint=model_fingerprint(model), tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
                       device=torch.device("cpu"), dtype=torch.float32)
