"""Out-of-domain text: what the memory (and every other system) costs on text unlike its corpus.

Why these sets: a memory mixed in at one lambda for every token helps where the corpus knows the
text and can hurt everywhere else, so every perplexity report also scores general text that is
*not* the corpus. The shipped sets need nothing but the archive the default corpus already comes
from (the ``bigbench`` 1.0.0 source distribution on PyPI), yet none of them is Wikipedia: the
SQuAD-shifts paragraphs of the **New York Times** (``nyt``), **Reddit** (``reddit``) and **Amazon
product reviews** (``amazon``) (Miller et al. 2020, "The Effect of Natural Distribution Shift on
Question Answering Models", CC BY 4.0).

How overlap with the corpus is excluded: a paragraph is dropped when any 13 consecutive words of it
(lower-cased, punctuation removed) also occur in the default corpus (every NQ passage and SQuAD
paragraph, whatever the split). The kept paragraphs, de-duplicated, in file order, joined by blank
lines, are ``<cache>/ood/<name>.txt``; ``<name>.json`` beside it says how many were kept and
dropped. Any text file can be an out-of-domain set too (``--ood FILE``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .errors import MLPMemError
from .io import atomic_write_json, atomic_write_text, file_lock, lock_path
from .log import log

SETS = {"nyt": "bigbench/benchmark_tasks/squad_shifts/nyt_v1.0.json",
        "reddit": "bigbench/benchmark_tasks/squad_shifts/reddit_v1.0.json",
        "amazon": "bigbench/benchmark_tasks/squad_shifts/amazon_reviews_v1.0.json"}
SHINGLE_WORDS = 13
FORMAT = 1  # bump when the text files are made differently


def _shingles(text: str) -> set[int]:
    words = re.findall(r"\w+", text.lower())
    return {hash(" ".join(words[i:i + SHINGLE_WORDS])) for i in range(len(words) - SHINGLE_WORDS + 1)}


def _paragraphs(path: Path) -> list[str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))["data"]
        return [p["context"] for article in data for p in article["paragraphs"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MLPMemError(f"{path} is not SQuAD-format JSON ({e}); delete it to extract it again") from None


def exclude_overlap(paragraphs: list[str], corpus_texts) -> tuple[list[str], int]:
    """(paragraphs sharing no :data:`SHINGLE_WORDS` consecutive words with any corpus text, de-duplicated
    and stripped, in order; how many were dropped for an overlap)."""
    corpus: set[int] = set()
    for text in corpus_texts:
        corpus |= _shingles(text)
    kept, seen, dropped = [], set(), 0
    for p in (p.strip() for p in paragraphs):
        if not p or p in seen:
            continue
        seen.add(p)
        if _shingles(p) & corpus:
            dropped += 1
        else:
            kept.append(p)
    return kept, dropped


def text_file(name: str, cache_dir=None) -> Path:
    """The shipped out-of-domain set ``name`` (``nyt``, ``reddit``, ``amazon``) as a text file, built once."""
    from .cache import cache_root
    from .corpus import bigbench_member, iter_documents

    if name not in SETS:
        raise MLPMemError(f"unknown out-of-domain set {name!r}; the shipped ones are {', '.join(SETS)} "
                          "(or give a text file)")
    out = cache_root(cache_dir) / "ood" / f"{name}.txt"
    stats_path = out.with_suffix(".json")
    if out.is_file() and stats_path.is_file() and json.loads(stats_path.read_text()).get("format") == FORMAT:
        return out
    with file_lock(lock_path(out), f"building the out-of-domain set {name}"):
        paragraphs = _paragraphs(bigbench_member(SETS[name], cache_dir))
        kept, overlap = exclude_overlap(paragraphs, (d.text for d in iter_documents("wiki", cache_dir=cache_dir)))
        atomic_write_text(out, "\n\n".join(kept) + "\n")
        atomic_write_json(stats_path, {"format": FORMAT, "source": f"bigbench==1.0.0 {SETS[name]}",
                                       "paragraphs": len(paragraphs), "kept": len(kept),
                                       "dropped_overlapping_the_corpus": overlap, "shingle_words": SHINGLE_WORDS,
                                       "words": sum(len(p.split()) for p in kept)})
        log(f"out-of-domain set {name}: {len(kept):,} paragraphs kept, {overlap} dropped for sharing "
            f"{SHINGLE_WORDS} words with the corpus")
    return out


def resolve(spec: str, corpus: str, cache_dir=None) -> dict[str, Path]:
    """{name: text file} of an ``--ood`` setting: ``auto`` (the shipped sets with the default corpus,
    none with any other), ``none``, or comma-separated shipped names and text files."""
    from .corpus import DEFAULT_CORPUS

    spec = (spec or "none").strip()
    if spec == "none":
        return {}
    if spec == "auto":
        return {n: text_file(n, cache_dir) for n in SETS} if corpus == DEFAULT_CORPUS else {}
    found = {}
    for item in (x.strip() for x in spec.split(",") if x.strip()):
        if item in SETS:
            found[item] = text_file(item, cache_dir)
        elif Path(item).is_file():
            found[Path(item).stem] = Path(item)
        else:
            raise MLPMemError(f"--ood {item}: neither a shipped set ({', '.join(SETS)}) nor a text file")
    return found
