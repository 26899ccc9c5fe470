"""Corpus: documents in, one EOS-joined token stream per split out, and the windows over it.

Why things are as they are:

- **Documents, not lines.** Everything is read as :class:`Document` s (text, id, group). Users'
  corpora are streamed one file / line / record batch at a time, so a corpus never has to fit in
  RAM. A single ``.txt`` file is one document; when tokenizing, a long one is read in chunks and
  any long document is tokenized in pieces cut where byte-level BPE tokenizers give the same ids
  as for the whole text, only until the split's cap, so memory does not grow with a document's
  length (a JSONL line or parquet value is still held whole while it is read).
- **Only regular files, and only while unchanged.** A FIFO or a device named ``*.txt`` is an
  error, never read. The size and mtime of every source file are recorded; when they change the
  corpus is tokenized again (same text, same fingerprint: later stages are kept).
- **The default corpus ships inside a PyPI package.** No dataset hub is reachable from where
  this project runs, but the ``bigbench==1.0.0`` source archive is, and it carries Wikipedia
  passages (docs/data.md): the Natural Questions passages of
  ``contextual_parametric_knowledge_conflicts`` and the SQuAD v1.1 dev paragraphs of
  ``squad_shifts``. Only those two JSON files are extracted, once, into the cache.
- **NQ passages must be repaired.** That task swapped each gold answer for another entity; the
  key of ``target_scores`` scored 0 is the original answer, so swapping it back restores the
  real passage; identical restored passages (several questions, one passage) are kept once.
  Where a question had several answer spans that were all replaced, only one original answer
  is known, so some restored passages repeat it (a limitation of the data). NQ passages keep
  NQ's tokenised spacing (``Phineas 's fifteen - year - old``); SQuAD paragraphs are plain text.
- **Held-out by group, not by document.** One Wikipedia page backs several NQ questions, so
  near-identical passages (same first or last words) are clustered and a cluster, like a SQuAD
  article, is one *group*. ``split_of`` hashes the group name, so the split depends neither on
  document order nor on what else is in the corpus, and a page never straddles train/held-out
  (which would leak held-out text into the datastore and flatter every memory).
- **One stream, EOS between documents.** Each kept document is followed by exactly one EOS
  token and the split's documents are concatenated into a raw little-endian int32 file; the
  datastore cuts sliding windows across document boundaries, as kNN-LM does. Files are written
  under temporary names, renamed, and the manifest comes last (:mod:`mlpmemory.stage`), so a
  crash never leaves a stream that looks complete; a second run with the same settings does nothing.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import re
import shutil
import stat
import sys
import tarfile
import warnings
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import CorpusSettings
from .errors import MLPMemError
from .io import atomic_path, check_file_size, file_lock, lock_path, read_manifest, remove_path
from .log import log, logger
from .stage import Stage, run_stage

__all__ = [
    "Document", "Window", "sliding_windows", "iter_documents", "load_nq_questions", "split_of",
    "tokenize_corpus", "open_token_stream", "read_document_index", "DEFAULT_CORPUS", "SPLITS",
]

DEFAULT_CORPUS = "wiki"
SPLITS = ("train", "heldout")
TOKEN_DTYPE = np.dtype("<i4")
TOKEN_FILES = {"train": "train.i32", "heldout": "heldout.i32"}
DOCUMENTS = "documents.jsonl"
SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".parquet")
DATASETS_MARKERS = ("dataset_info.json", "state.json")


@dataclass(frozen=True)
class Window:
    """One forward pass: tokens[begin:end] go in; rows for targets first_target..end-1 come out.

    The row of target position j (1 <= j < n_tokens) uses the hidden state at position j-1,
    which sits at offset j-1-begin inside the window. When the tokenizer adds a BOS
    (:func:`mlpmemory.models.bos_prefix`), it goes in before the window, is never scored and
    shifts those offsets by its length (:func:`mlpmemory.datastore.window_ids`).
    """

    begin: int
    end: int
    first_target: int

    @property
    def n_rows(self) -> int:
        return self.end - self.first_target


def sliding_windows(n_tokens: int, block: int, stride: int) -> list[Window]:
    """Windows of `block` tokens whose scored tails move by `stride` (docs/method.md#windows).

    Every token after the first is predicted exactly once and in corpus order. The first window
    scores all its positions; each later one scores only its last `stride` targets, so every
    prediction after the first window sees at least ``block - stride`` tokens of context. The
    last window is shifted back to end at the stream's end, so all windows have the same length
    (``min(block, n_tokens)``) and batch without padding.
    """
    if block < 2:
        raise ValueError(f"block must be >= 2, got {block}")
    if not 1 <= stride < block:
        raise ValueError(f"stride must be in [1, block-1={block - 1}] so each scored token keeps context, got {stride}")
    if n_tokens < 2:
        return []
    end = min(block, n_tokens)
    windows = [Window(0, end, 1)]
    while end < n_tokens:
        new_end = min(end + stride, n_tokens)
        windows.append(Window(new_end - block, new_end, end))
        end = new_end
    return windows


@dataclass(frozen=True)
class Document:
    """One document of a corpus.

    ``group`` is the unit of the train/held-out split: documents of one group always land on the
    same side (an article title; for NQ passages a cluster of near-identical passages).
    """

    text: str
    doc_id: str
    group: str
    # a long .txt file being tokenized: its text is read from here in chunks (``text`` is then empty)
    path: Path | None = field(default=None, repr=False, compare=False)


# ---------------------------------------------------------------------------------------------
# The default corpus: Wikipedia passages from the bigbench==1.0.0 source archive.
# ---------------------------------------------------------------------------------------------

BIGBENCH = ("bigbench", "1.0.0")
NQ_MEMBER = "bigbench/benchmark_tasks/contextual_parametric_knowledge_conflicts/task.json"
SQUAD_MEMBER = "bigbench/benchmark_tasks/squad_shifts/squaddev_v1.1.json"
_NQ_PREFIX = "\nQuestion: "
_NQ_CONTEXT = "\nContext: "
_NEAR_DUP_WORDS = 10  # passages sharing their first or last this many words are one group


def _bigbench_files(cache_dir=None) -> dict[str, Path]:
    """The two JSON files of the default corpus, extracted once from the cached sdist (under a lock)."""
    from .cache import cache_root

    name, version = BIGBENCH
    final = cache_root(cache_dir) / "corpora" / f"{name}-{version}"
    paths = {m: final / m for m in (NQ_MEMBER, SQUAD_MEMBER)}
    if all(p.is_file() for p in paths.values()):
        return paths
    with file_lock(lock_path(final), f"extracting {name}=={version}"):
        if not all(p.is_file() for p in paths.values()):  # else another process extracted them meanwhile
            _extract_members(final, set(paths), cache_dir)
    return paths


def bigbench_member(member: str, cache_dir=None) -> Path:
    """One file of the cached bigbench archive (``member``: its path under ``bigbench/``, e.g.
    ``bigbench/benchmark_tasks/truthful_qa/questions.json``), extracted once into
    ``<cache>/corpora/bigbench-1.0.0-files/`` (under a lock) for the QA, harness and out-of-domain data."""
    from .cache import cache_root, fetch_pypi_distribution

    name, version = BIGBENCH
    final = cache_root(cache_dir) / "corpora" / f"{name}-{version}-files" / member.replace("/", "__")
    if final.is_file():
        return final
    with file_lock(lock_path(final), f"extracting {member} from {name}=={version}"):
        if not final.is_file():
            archive = fetch_pypi_distribution(name, version, cache_dir)
            try:
                with atomic_path(final) as tmp, tarfile.open(archive, "r|gz") as tf:  # one streaming pass
                    for info in tf:
                        if info.name.split("/", 1)[-1] == member and info.isfile():
                            with open(tmp, "wb") as out:
                                shutil.copyfileobj(tf.extractfile(info), out)
                            break
                    else:
                        raise MLPMemError(f"{archive} lacks {member}; delete it so that it is downloaded again")
            except (tarfile.TarError, EOFError) as e:
                raise MLPMemError(f"could not read {archive} ({e}); delete it so that it is downloaded again") from None
    return final


def _extract_members(final: Path, members: set[str], cache_dir) -> None:
    from .cache import fetch_pypi_distribution

    name, version = BIGBENCH
    archive = fetch_pypi_distribution(name, version, cache_dir)
    remove_path(final)  # a partial leftover (the rename below never produces one)
    found: set[str] = set()
    with atomic_path(final) as tmp:
        try:
            # Stream mode ("r|gz"): one pass over the 358 MB archive, stopping once both are out.
            with tarfile.open(archive, "r|gz") as tf:
                for info in tf:
                    inner = info.name.split("/", 1)[-1]  # drop the "bigbench-1.0.0/" prefix
                    if inner in members and info.isfile():
                        dest = tmp / inner
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        with open(dest, "wb") as out:
                            shutil.copyfileobj(tf.extractfile(info), out)
                        found.add(inner)
                        if found == members:
                            break
        except (tarfile.TarError, EOFError, OSError) as e:
            raise MLPMemError(f"could not read {archive} ({e}); delete it so that it is downloaded again") from None
        if found != members:
            missing = ", ".join(sorted(members - found))
            raise MLPMemError(f"{archive} lacks {missing}; delete it so that it is downloaded again")
    log(f"extracted the default corpus (Wikipedia passages of {name}=={version}) into {final}")


def _load_json(path: Path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise MLPMemError(f"{path} is unreadable ({e}); delete {path.parent} to extract it again") from None


def _norm_words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:  # keep the smaller index as root, so group names follow corpus order
            self.parent[max(ra, rb)] = min(ra, rb)


def _restore_nq(example: dict, index: int, path: Path) -> tuple[str, str, str]:
    """(question, original answer, restored passage) of one NQ example."""
    inp, sub, scores = example.get("input"), example.get("target"), example.get("target_scores")
    if not (isinstance(inp, str) and inp.startswith(_NQ_PREFIX) and _NQ_CONTEXT in inp
            and isinstance(sub, str) and isinstance(scores, dict)):
        raise MLPMemError(f"{path}: example {index} is not in the expected format; "
                          f"delete {path.parent} to extract it again")
    question, _, passage = inp[len(_NQ_PREFIX):].partition(_NQ_CONTEXT)
    originals = [k for k, v in scores.items() if v == 0]
    original = originals[0] if originals else sub
    # The substitute replaced every occurrence of the answer, so put the answer back everywhere.
    return question.strip(), original, passage.replace(sub, original) if sub else passage


def _wiki(cache_dir=None) -> tuple[list[Document], list[dict]]:
    """All documents of the default corpus (deterministic order) and the NQ questions."""
    files = _bigbench_files(cache_dir)
    nq_path, squad_path = files[NQ_MEMBER], files[SQUAD_MEMBER]
    examples = _load_json(nq_path).get("examples", [])
    squad = _load_json(squad_path).get("data", [])

    passages: list[str] = []  # unique restored passages, in order of first appearance
    passage_index: dict[str, int] = {}
    questions: list[dict] = []
    for i, ex in enumerate(examples):
        question, answer, passage = _restore_nq(ex, i, nq_path)
        if passage not in passage_index:
            passage_index[passage] = len(passages)
            passages.append(passage)
        questions.append({"question": question, "answers": [answer], "passage": passage_index[passage]})

    paragraphs: list[tuple[str, int, str]] = []  # (title, paragraph number, text)
    for article in squad:
        title = str(article.get("title", "")).strip() or "untitled"
        for j, para in enumerate(article.get("paragraphs", [])):
            paragraphs.append((title, j, para.get("context", "")))

    # Union-find over all texts: NQ passages 0..P-1, then SQuAD paragraphs. A SQuAD article is
    # one group; near-identical NQ passages (same first or last words) join each other, and an
    # NQ passage that copies a SQuAD paragraph joins that article.
    n_nq = len(passages)
    uf = _UnionFind(n_nq + len(paragraphs))
    first_of_title: dict[str, int] = {}
    for k, (title, _, _) in enumerate(paragraphs):
        uf.union(first_of_title.setdefault(title, n_nq + k), n_nq + k)
    seen_keys: dict[tuple, int] = {}
    for idx, text in enumerate(passages + [p[2] for p in paragraphs]):
        words = _norm_words(text)
        if not words:
            continue
        for key in (("head", *words[:_NEAR_DUP_WORDS]), ("tail", *words[-_NEAR_DUP_WORDS:])):
            other = seen_keys.setdefault(key, idx)
            if other != idx:
                uf.union(idx, other)

    # A group holding SQuAD paragraphs is named after its (first) article, else after its first passage.
    squad_root_title: dict[int, str] = {}
    for k, (title, _, _) in enumerate(paragraphs):
        squad_root_title.setdefault(uf.find(n_nq + k), title)

    def group_name(idx: int) -> str:
        root = uf.find(idx)
        return f"squad:{squad_root_title[root]}" if root in squad_root_title else f"nq:{root}"

    docs = [Document(text=p, doc_id=f"nq:{i}", group=group_name(i)) for i, p in enumerate(passages)]
    docs += [Document(text=text, doc_id=f"squad:{title}:{j}", group=group_name(n_nq + k))
             for k, (title, j, text) in enumerate(paragraphs)]
    for q in questions:
        d = docs[q.pop("passage")]
        q["doc_id"], q["group"] = d.doc_id, d.group
    return docs, questions


def load_nq_questions(cache_dir=None) -> list[dict]:
    """The 17,528 Natural Questions of the default corpus, in file order.

    Each item: ``question``, ``answers`` (the original NQ answer, as a one-element list),
    ``doc_id`` and ``group`` of its restored passage in the ``wiki`` corpus (so a QA evaluation
    can tell whether the passage is in the memory's training split).
    """
    return _wiki(cache_dir)[1]


# ---------------------------------------------------------------------------------------------
# User corpora: .txt / .jsonl / .parquet files, folders of them, `datasets` folders.
# ---------------------------------------------------------------------------------------------

_SKIP_HINT = "re-encode it as UTF-8, or skip such documents with skip_bad_utf8=True (--skip-bad-utf8)"


class _BadUTF8:
    """What to do with a document that is not valid UTF-8: raise, or warn, skip and count it."""

    def __init__(self, skip: bool):
        self.skip = bool(skip)
        self.skipped = 0

    def __call__(self, where: str, offset: int) -> None:
        if not self.skip:
            raise MLPMemError(f"{where}: not valid UTF-8 at byte offset {offset}; {_SKIP_HINT}")
        self.skipped += 1
        warnings.warn(f"{where}: not valid UTF-8 at byte offset {offset}; skipped", stacklevel=2)


def _record_group(record, doc_id: str) -> str:
    for key in ("group", "title"):
        value = record.get(key)
        if value is not None and value != "":
            return str(value)
    return doc_id


def _open_binary(path: Path):
    try:
        return open(path, "rb")
    except OSError as e:
        raise MLPMemError(f"cannot read corpus file {path} ({e.strerror or e}); "
                          "check that it exists and is readable") from None


def _check_regular(path: Path) -> None:
    """Only regular files are corpora: a FIFO would block forever, a device (/dev/zero) never ends."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise MLPMemError(f"cannot read corpus file {path} ({e.strerror or e}); "
                          "check that it exists and is readable") from None
    if not stat.S_ISREG(mode):
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                else "a socket" if stat.S_ISSOCK(mode) else "not a file")
        raise MLPMemError(f"corpus file {path} is {kind}, not a regular file; only regular files are read as corpora")


def _file_chunks(path: Path, bad: _BadUTF8) -> Iterator[str]:
    """The UTF-8 text of a file (BOM dropped) in chunks of at most _CHUNK_BYTES bytes' worth; a bad byte: ``bad``."""
    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with _open_binary(path) as f:
        while True:
            try:
                block = f.read(_CHUNK_BYTES)
            except OSError as e:
                raise MLPMemError(f"cannot read corpus file {path} ({e.strerror or e})") from None
            pending = len(decoder.getstate()[0])  # bytes of a character split by the previous block
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                bad(str(path), offset - pending + e.start)
                return
            yield text.removeprefix("\ufeff") if offset == 0 else text
            if not block:
                return
            offset += len(block)


def _iter_txt(path: Path, rel: str, bad: _BadUTF8, lazy: bool = False) -> Iterator[Document]:
    if lazy and path.stat().st_size > _CHUNK_BYTES:  # read in chunks while tokenized (_StreamWriter.add_long)
        yield Document(text="", doc_id=rel, group=rel, path=path)
        return
    with _open_binary(path) as f:
        try:
            data = f.read()
        except OSError as e:
            raise MLPMemError(f"cannot read corpus file {path} ({e.strerror or e})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        bad(str(path), e.start)
        return
    text = text.removeprefix("\ufeff")
    if text.strip():
        yield Document(text=text, doc_id=rel, group=rel)


def _text_document(text, where: str, doc_id: str) -> Document | None:
    """A record's text as a document (its group: the doc id); None when empty; an error when not a string."""
    if text is None:
        return None
    if not isinstance(text, str):
        raise MLPMemError(f"{where} is a {type(text).__name__}, not a string")
    return Document(text=text, doc_id=doc_id, group=doc_id) if text.strip() else None


def _iter_jsonl(path: Path, rel: str, text_field: str, bad: _BadUTF8) -> Iterator[Document]:
    with _open_binary(path) as f:
        offset = 0
        for lineno, raw in enumerate(f, start=1):
            line_offset, offset = offset, offset + len(raw)
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw, line_offset = raw[3:], 3
            where = f"{path} line {lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad(where, line_offset + e.start)
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise MLPMemError(f"{where} is not valid JSON ({e}); "
                                  "fix the line (JSONL needs one JSON object per line)") from None
            if not isinstance(record, dict):
                raise MLPMemError(f"{where} is a JSON {type(record).__name__}, "
                                  f"not an object with a {text_field!r} field")
            if text_field not in record:
                fields = ", ".join(map(repr, list(record)[:10])) or "none"
                raise MLPMemError(f"{where} has no field {text_field!r} (fields: {fields}); "
                                  f"name the text field with text_field (--text-field)")
            doc = _text_document(record[text_field], f"{where}: field {text_field!r}", f"{rel}:{lineno}")
            if doc is not None:
                yield Document(doc.text, doc.doc_id, _record_group(record, doc.doc_id))


def _iter_parquet(path: Path, rel: str, text_field: str, bad: _BadUTF8) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except OSError as e:
        raise MLPMemError(f"cannot read corpus file {path} ({e}); check that it exists and is readable") from None
    except (pa.ArrowException, ValueError) as e:
        raise MLPMemError(f"{path} is not a readable parquet file ({e})") from None
    schema = pf.schema_arrow
    if text_field not in schema.names:
        cols = ", ".join(map(repr, schema.names[:20]))
        raise MLPMemError(f"{path} has no column {text_field!r} (columns: {cols}); "
                          "name the text column with text_field (--text-field)")
    ttype = schema.field(text_field).type
    if not (pa.types.is_string(ttype) or pa.types.is_large_string(ttype)
            or pa.types.is_binary(ttype) or pa.types.is_large_binary(ttype)):
        raise MLPMemError(f"{path}: column {text_field!r} has type {ttype}, not text")
    group_col = next((c for c in ("group", "title") if c in schema.names and c != text_field), None)
    columns = [text_field] + ([group_col] if group_col else [])
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=1024, columns=columns):
            # Parquet does not validate UTF-8 on read: take raw bytes and decode strictly here.
            col = batch.column(0)
            values = col.cast(pa.large_binary()).to_pylist()
            groups = batch.column(1).to_pylist() if group_col else [None] * len(values)
            for raw, grp in zip(values, groups):
                r, row = row, row + 1
                if raw is None:
                    continue
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    bad(f"{path} row {r} (offset within that value)", e.start)
                    continue
                if text.strip():
                    doc_id = f"{rel}:{r}"
                    group = str(grp) if grp not in (None, "") else doc_id
                    yield Document(text=text, doc_id=doc_id, group=group)
    except (pa.ArrowException, OSError) as e:
        raise MLPMemError(f"{path}: cannot read row batch after row {row} ({e}); the parquet file is damaged") from None


def _iter_datasets_dir(path: Path, rel: str, text_field: str) -> Iterator[Document]:
    try:
        import datasets
    except ImportError:
        raise MLPMemError(f"{path} is a Hugging Face `datasets` folder (save_to_disk) but `datasets` is not installed; "
                          "install it with `pip install 'mlpmemory[datasets]'`, "
                          "or export the text to JSONL/parquet") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises many types for damaged folders
        raise MLPMemError(f"cannot load the `datasets` folder {path} ({type(e).__name__}: {e})") from None
    if isinstance(ds, datasets.DatasetDict):
        raise MLPMemError(f"{path} holds several splits ({', '.join(ds)}); "
                          f"pass one split's folder, e.g. {path / next(iter(ds))}")
    if text_field not in ds.column_names:
        cols = ", ".join(map(repr, ds.column_names[:20]))
        raise MLPMemError(f"{path} has no column {text_field!r} (columns: {cols}); "
                          "name the text column with text_field (--text-field)")
    group_col = next((c for c in ("group", "title") if c in ds.column_names and c != text_field), None)
    ds = ds.select_columns([text_field] + ([group_col] if group_col else []))
    row = 0
    for batch in ds.iter(batch_size=1000):
        texts = batch[text_field]
        groups = batch[group_col] if group_col else [None] * len(texts)
        for text, grp in zip(texts, groups):
            r, row = row, row + 1
            doc = _text_document(text, f"{path} row {r}: column {text_field!r}", f"{rel}:{r}")
            if doc is not None:
                yield Document(doc.text, doc.doc_id, str(grp) if grp not in (None, "") else doc.doc_id)


def _is_datasets_dir(path: Path) -> bool:
    return any((path / m).is_file() for m in DATASETS_MARKERS + ("dataset_dict.json",))


def _folder_entries(root: Path) -> list[tuple[str, Path, str]]:
    """(relative posix path, path, kind) of every usable entry below root, sorted by path.

    Hidden files and folders are ignored; a sub-folder saved by ``datasets`` is one entry.
    """
    entries = []
    n_files = 0
    for dirpath, dirnames, filenames in os.walk(root, onerror=None):
        d = Path(dirpath)
        if d != root and _is_datasets_dir(d):
            entries.append((d.relative_to(root).as_posix(), d, "datasets"))
            dirnames[:] = []
            continue
        dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))
        for name in filenames:
            if name.startswith("."):
                continue
            n_files += 1
            p = d / name
            if p.suffix.lower() in SUPPORTED_SUFFIXES:
                entries.append((p.relative_to(root).as_posix(), p, p.suffix.lower()))
    if not entries:
        raise MLPMemError(f"corpus folder {root} has no usable files ({n_files} other file(s)); "
                          f"put .txt, .jsonl or .parquet files in it")
    return sorted(entries)


def _iter_entry(path: Path, rel: str, kind: str, text_field: str, bad: _BadUTF8,
                lazy: bool = False) -> Iterator[Document]:
    if kind == "datasets":
        return _iter_datasets_dir(path, rel, text_field)
    _check_regular(path)
    if kind == ".txt":
        return _iter_txt(path, rel, bad, lazy)
    if kind == ".jsonl":
        return _iter_jsonl(path, rel, text_field, bad)
    if kind == ".parquet":
        return _iter_parquet(path, rel, text_field, bad)
    raise MLPMemError(f"{path}: unsupported corpus file type {kind!r}; use .txt (one document), "
                      ".jsonl (one JSON object per line), .parquet, or a folder of these")


def _resolve_spec(spec: str | os.PathLike) -> str:
    """The canonical spec: "wiki", or the absolute path of a user corpus."""
    if str(spec) == DEFAULT_CORPUS:
        return DEFAULT_CORPUS
    return str(Path(spec).expanduser().resolve())


def iter_documents(spec: str | os.PathLike = DEFAULT_CORPUS, *, cache_dir=None, text_field: str = "text",
                   skip_bad_utf8: bool = False) -> Iterator[Document]:
    """Stream the documents of a corpus, in a deterministic order.

    ``spec`` is ``"wiki"`` (the default corpus: ~13.8k restored NQ passages, then the 2,067
    SQuAD v1.1 dev paragraphs) or a path (a local folder called ``wiki`` needs ``./wiki``):

    - ``.txt``: the whole file is one document (id: its name);
    - ``.jsonl``: one JSON object per line, text in ``text_field`` (id ``file:line``, 1-based);
    - ``.parquet``: column ``text_field``, read in record batches (id ``file:row``, 0-based);
    - a folder: all of the above below it, recursively, sorted by relative path (hidden entries
      ignored); a folder with ``dataset_info.json``/``state.json`` is a Hugging Face ``datasets``
      dataset saved with ``save_to_disk`` (needs ``datasets``), ids ``folder:row``.

    A user document's group is its id unless its record has a ``group`` (else ``title``) field.
    Whitespace-only documents are skipped. Text must be UTF-8: the error names the file and the
    byte offset of the first bad byte (for parquet/JSONL also the row/line); with
    ``skip_bad_utf8`` such a document is skipped with a warning instead.
    """
    return _iter_documents(spec, cache_dir, text_field, _BadUTF8(skip_bad_utf8))


def _iter_documents(spec, cache_dir, text_field: str, bad: _BadUTF8, lazy: bool = False) -> Iterator[Document]:
    """:func:`iter_documents`; ``lazy``: a long .txt file comes as a :class:`Document` with a ``path`` to read."""
    if str(spec) == DEFAULT_CORPUS:
        yield from _wiki(cache_dir)[0]
        return
    path = Path(spec).expanduser()
    if not path.exists():
        raise MLPMemError(f"corpus path {path} does not exist; pass an existing .txt/.jsonl/.parquet file or "
                          f"folder, or {DEFAULT_CORPUS!r} for the default corpus")
    if path.is_dir():
        if _is_datasets_dir(path):
            entries = [(path.name, path, "datasets")]
        else:
            entries = _folder_entries(path)
    else:
        entries = [(path.name, path, path.suffix.lower())]
    for rel, p, kind in entries:
        yield from _iter_entry(p, rel, kind, text_field, bad, lazy)


# ---------------------------------------------------------------------------------------------
# Held-out split and tokenisation.
# ---------------------------------------------------------------------------------------------


def split_of(group: str, heldout_fraction: float) -> str:
    """``"heldout"`` for about ``heldout_fraction`` of all groups, else ``"train"``.

    A pure function of the group name (sha256), so it is the same in every run, on every
    machine, whatever the order or the rest of the corpus.
    """
    if not 0.0 <= heldout_fraction <= 1.0:
        raise MLPMemError(f"heldout_fraction must be between 0 and 1, got {heldout_fraction}")
    digest = hashlib.sha256(b"mlpmemory-split:" + group.encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    return "heldout" if u < heldout_fraction else "train"


def _check_cap(name: str, value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise MLPMemError(f"{name} must be a positive number of tokens or None, got {value!r}")
    return int(value)


def _update_hash(h, *parts: str) -> None:
    for part in parts:
        b = part.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)


_BATCH_CHARS = 8_000_000  # also flush a tokenizer batch at this many characters (long documents)
_CHUNK_BYTES = 1 << 20  # a .txt file over this many bytes is read in chunks of this size
_PIECE_CHARS = 1 << 18  # a document over this many characters is tokenized in pieces of about this size
# Where a long document is cut: before a space, or after a line break, between two non-whitespace
# characters. Byte-level BPE pre-tokenizers (GPT-2, Llama 3, SmolLM2 ...) never join text across
# such a point into one pre-token, so the pieces tokenize to the same ids as the whole text; a
# tokenizer that adds something at the start of every text (SentencePiece's dummy prefix) does not,
# which _cuts_exact detects (a warning). A stretch of half a piece without such a point is cut anyway.
_CUT = re.compile(r"\S(?= \S)|\S\n(?=\S)")
_CUT_PROBES = (("Hello, world.", " It is 3 o'clock"), ("line one.\n", "Line two"), ("x = 12", " + 345;"),
               ("naïve", " café"), ("Paris", " (France)\n"), ("日本語\n", "テキスト"))


def _safe_cut(text: str, size: int) -> int:
    """The last cut point at or before ``size`` (see _CUT), searched back to ``size // 2``; else ``size``."""
    hi = size
    while hi > size // 2:
        lo = max(size // 2, hi - 4096)
        ends = [m.end() for m in _CUT.finditer(text, lo, hi + 2) if m.end() <= size]
        if ends:
            return ends[-1]
        hi = lo
    return size


def _pieces(chunks: Iterator[str], size: int) -> Iterator[str]:
    """The concatenated ``chunks`` in pieces of at most ``size`` characters, cut at _safe_cut."""
    buf = ""
    for chunk in chunks:
        buf += chunk
        while len(buf) > size:
            cut = _safe_cut(buf, size)
            yield buf[:cut]
            buf = buf[cut:]
    if buf:
        yield buf


def _doc_chunks(doc: Document, bad: _BadUTF8) -> Iterator[str]:
    if doc.path is not None:
        yield from _file_chunks(doc.path, bad)
    else:
        yield from (doc.text[i:i + _PIECE_CHARS] for i in range(0, len(doc.text), _PIECE_CHARS))


def _cuts_exact(tokenizer) -> bool:
    """Whether the tokenizer encodes text cut at a _CUT point piece by piece as it encodes it whole."""
    def enc(t):
        return list(tokenizer(t, add_special_tokens=False, verbose=False)["input_ids"])
    return all(enc(a + b) == enc(a) + enc(b) for a, b in _CUT_PROBES)


def _source_stats(corpus: str) -> list | None:
    """[relative path, size, mtime_ns] of every file a user corpus is read from; None when it is gone.

    The fast check that the corpus files are those tokenized. When it differs the corpus is
    tokenized again, which recomputes ``corpus_fingerprint`` (a hash of the text read): the same
    text (a file only touched) gives the same fingerprint and later stages are reused, other text
    a new one, which later stages refuse. The default corpus is checked when it is extracted.
    """
    if corpus == DEFAULT_CORPUS:
        return []
    root = Path(corpus)
    try:
        if root.is_dir():
            entries = [(rel, p) for rel, p, _ in
                       ([(root.name, root, "datasets")] if _is_datasets_dir(root) else _folder_entries(root))]
        else:
            entries = [(root.name, root)]
        files = []
        for rel, p in entries:  # a `datasets` folder: every file in it
            files += ([(f"{rel}/{f.relative_to(p).as_posix()}", f) for f in sorted(p.rglob("*")) if f.is_file()]
                      if p.is_dir() else [(rel, p)])
        return [[rel, (st := os.stat(f)).st_size, st.st_mtime_ns] for rel, f in files]
    except (OSError, MLPMemError):
        return None


def _sources_unchanged(out: Path, found: dict) -> bool:
    """Whether the corpus files still have the size and mtime they had when tokenized (else: tokenize again)."""
    if found.get("corpus") == DEFAULT_CORPUS:
        return True
    now = _source_stats(found.get("corpus"))
    if now is None:
        logger.warning(f"{out}: the corpus files {found.get('corpus')} cannot be read now; using the corpus "
                       "tokenized from them")
        return True
    if found.get("sources") == now:
        return True
    old = {r: (size, mtime) for r, size, mtime in found.get("sources") or []}
    new = {r: (size, mtime) for r, size, mtime in now}
    changed = sorted(r for r in old.keys() | new.keys() if old.get(r) != new.get(r)) or ["(not recorded)"]
    logger.warning(f"{out}: corpus file(s) {', '.join(changed[:3])}{' ...' if len(changed) > 3 else ''} changed "
                   "(size or modification time) since they were tokenized; tokenizing the corpus again "
                   "(later stages built on other text will then be refused)")
    return False


def _existing_is_valid(out: Path, found: dict, skip_bad_utf8: bool) -> bool:
    """Whether a complete, matching corpus stage still has all its files and sources (else it is rebuilt)."""
    if found.get("n_skipped_bad_utf8", 0) and not skip_bad_utf8:
        raise MLPMemError(f"tokenized corpus at {out} was built skipping {found['n_skipped_bad_utf8']} non-UTF-8 "
                          f"document(s) but now skip_bad_utf8=False; use a different --run-dir or delete {out} "
                          "to rebuild it")
    try:
        for split in SPLITS:
            check_file_size(out / TOKEN_FILES[split], int(found["n_tokens"][split]) * TOKEN_DTYPE.itemsize,
                            "token stream")
        if not (out / DOCUMENTS).is_file():
            raise MLPMemError(f"{out / DOCUMENTS} is missing")
    except (MLPMemError, KeyError, TypeError, ValueError) as e:
        logger.warning(f"{out}: {e}; tokenizing the corpus again")
        return False
    return _sources_unchanged(out, found)


def _corpus_identity(spec, tokenizer, tokenizer_fingerprint: str, heldout_fraction: float, max_train_tokens,
                     max_heldout_tokens, text_field: str, batch_docs: int) -> dict:
    """What a tokenized corpus must match to be reused (checked before any document is read)."""
    if not 0.0 <= heldout_fraction <= 1.0:
        raise MLPMemError(f"heldout_fraction must be between 0 and 1, got {heldout_fraction}")
    caps = {"train": _check_cap("max_train_tokens", max_train_tokens),
            "heldout": _check_cap("max_heldout_tokens", max_heldout_tokens)}
    if batch_docs < 1:
        raise MLPMemError(f"batch_docs must be >= 1, got {batch_docs}")
    if getattr(tokenizer, "eos_token_id", None) is None:
        raise MLPMemError("the tokenizer has no EOS token, which separates documents in the stream; "
                          "use a tokenizer that defines eos_token")
    return {"kind": "token_streams", "corpus": _resolve_spec(spec), "tokenizer_fingerprint": tokenizer_fingerprint,
            "heldout_fraction": float(heldout_fraction), "max_train_tokens": caps["train"],
            "max_heldout_tokens": caps["heldout"], "text_field": text_field}


class _StreamWriter:
    """Appends tokenized documents to the split streams and ``documents.jsonl``, up to each split's cap."""

    def __init__(self, identity: dict, tokenizer, files: dict, doc_file, bad: _BadUTF8):
        self.tokenizer, self.eos, self.files, self.doc_file = tokenizer, int(tokenizer.eos_token_id), files, doc_file
        self.bad = bad
        self.heldout_fraction = identity["heldout_fraction"]
        self.caps = {"train": identity["max_train_tokens"], "heldout": identity["max_heldout_tokens"]}
        self.n_tok = {s: 0 for s in SPLITS}
        self.n_docs = {s: 0 for s in SPLITS}
        self.n_truncated = {s: 0 for s in SPLITS}
        self.cuts_exact: bool | None = None  # checked at the first long document
        self.hash = hashlib.sha256()
        _update_hash(self.hash, json.dumps({k: identity[k] for k in ("heldout_fraction", "max_train_tokens",
                                                                    "max_heldout_tokens", "text_field")},
                                           sort_keys=True))

    def full(self, split: str) -> bool:
        if split == "heldout" and self.heldout_fraction == 0.0:
            return True
        if split == "train" and self.heldout_fraction == 1.0:
            return True
        return self.caps[split] is not None and self.n_tok[split] >= self.caps[split]

    def flush(self, batch: list[tuple[Document, str]]) -> None:
        batch = [(d, s) for d, s in batch if not self.full(s)]
        if not batch:
            return
        ids_list = self.tokenizer([d.text for d, _ in batch], add_special_tokens=False, verbose=False,
                                  return_attention_mask=False)["input_ids"]
        bufs: dict[str, list[int]] = {s: [] for s in SPLITS}
        for (doc, split), ids in zip(batch, ids_list):
            if not self.full(split):
                bufs[split].extend(self._add(doc, split, list(ids) + [self.eos]))
        for s in SPLITS:
            if bufs[s]:
                np.asarray(bufs[s], dtype=TOKEN_DTYPE).tofile(self.files[s])

    def add_long(self, doc: Document, split: str) -> None:
        """A long document, tokenized piece by piece (_pieces) and read only until its split is full.

        Its fingerprint covers the pieces read (each length-prefixed), not text past the cap. A
        file found not UTF-8 (with skip_bad_utf8) or blank once read is taken back out.
        """
        if self.full(split):
            return
        if self.cuts_exact is None:
            self.cuts_exact = _cuts_exact(self.tokenizer)
            if not self.cuts_exact:
                logger.warning(f"this tokenizer encodes text cut before a space or after a line break differently "
                               f"from whole text; documents over {_PIECE_CHARS:,} characters are tokenized in "
                               "pieces, so their token ids may differ from whole-text tokenization at the cuts")
        start, hash_before, n_bad = self.n_tok[split], self.hash.copy(), self.bad.skipped
        _update_hash(self.hash, doc.doc_id, doc.group, split)
        pieces, truncated, seen = _pieces(_doc_chunks(doc, self.bad), _PIECE_CHARS), False, False
        for piece in pieces:
            seen = seen or not piece.isspace()
            _update_hash(self.hash, piece)
            ids = self.tokenizer(piece, add_special_tokens=False, verbose=False)["input_ids"]
            if truncated := self._append(split, ids):
                seen = seen or any(not p.isspace() for p in pieces)  # blank up to the cap: read on to know
                break
        else:
            truncated = self._append(split, [self.eos])
        if self.bad.skipped != n_bad or not seen:  # skipped (not UTF-8) or whitespace only, as a short one
            self.files[split].flush()
            self.files[split].seek(start * TOKEN_DTYPE.itemsize)
            self.files[split].truncate()
            self.n_tok[split], self.hash = start, hash_before
            return
        rec = {"doc_id": doc.doc_id, "group": doc.group, "split": split, "start": start,
               "n_tokens": self.n_tok[split] - start - (0 if truncated else 1), "truncated": truncated}
        self.doc_file.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self.n_docs[split] += 1
        self.n_truncated[split] += truncated

    def _append(self, split: str, ids: list[int]) -> bool:
        """Write ``ids`` to the split's stream, cut at its cap; whether they were cut."""
        cap = self.caps[split]
        room = len(ids) if cap is None else min(len(ids), cap - self.n_tok[split])
        np.asarray(ids[:room], dtype=TOKEN_DTYPE).tofile(self.files[split])
        self.n_tok[split] += room
        return room < len(ids)

    def _add(self, doc: Document, split: str, ids: list[int]) -> list[int]:
        """One document's tokens (cut at the split's cap), its record written and hashed."""
        cap, truncated = self.caps[split], False
        if cap is not None and self.n_tok[split] + len(ids) > cap:
            ids, truncated = ids[:cap - self.n_tok[split]], True
        rec = {"doc_id": doc.doc_id, "group": doc.group, "split": split, "start": self.n_tok[split],
               "n_tokens": len(ids) - (0 if truncated else 1), "truncated": truncated}
        self.doc_file.write(json.dumps(rec, ensure_ascii=False) + "\n")
        _update_hash(self.hash, doc.doc_id, doc.group, split, doc.text)
        self.n_tok[split] += len(ids)
        self.n_docs[split] += 1
        self.n_truncated[split] += truncated
        return ids


def _tokenize_into(writer: _StreamWriter, docs, batch_docs: int, bar) -> int:
    """Feed documents to ``writer`` in tokenizer batches until every split is full; the number read."""
    n_read, chars, batch = 0, 0, []
    for doc in docs:
        n_read += 1
        bar.update(1)
        split = split_of(doc.group, writer.heldout_fraction)
        if doc.path is not None or len(doc.text) > _PIECE_CHARS:  # in pieces, in corpus order
            writer.flush(batch)
            batch, chars = [], 0
            writer.add_long(doc, split)
        else:
            batch.append((doc, split))
            chars += len(doc.text)
        if len(batch) >= batch_docs or chars >= _BATCH_CHARS or not batch:
            writer.flush(batch)
            batch, chars = [], 0
            if all(writer.full(s) for s in SPLITS):
                break
    writer.flush(batch)
    return n_read


def _build_streams(spec, tokenizer, out: Path, identity: dict, skip_bad_utf8: bool, cache_dir, batch_docs: int,
                   progress: bool) -> dict:
    """Write the split streams and ``documents.jsonl`` (atomically); returns the manifest fields."""
    from tqdm.auto import tqdm

    corpus = identity["corpus"]
    sources = _source_stats(corpus)  # before reading: a file changed meanwhile is tokenized again next time
    bad = _BadUTF8(skip_bad_utf8)
    docs = _iter_documents(spec, cache_dir, identity["text_field"], bad, lazy=True)
    bar = tqdm(desc=f"tokenizing {Path(corpus).name if corpus != DEFAULT_CORPUS else corpus}", unit="doc",
               disable=None if progress else True, file=sys.stderr, smoothing=0.05)
    with ExitStack() as stack:  # on any error every temporary is removed; on success each is renamed
        files = {s: stack.enter_context(open(stack.enter_context(atomic_path(out / TOKEN_FILES[s])), "wb"))
                 for s in SPLITS}
        doc_file = stack.enter_context(open(stack.enter_context(atomic_path(out / DOCUMENTS)), "w", encoding="utf-8"))
        writer = _StreamWriter(identity, tokenizer, files, doc_file, bad)
        try:
            n_read = _tokenize_into(writer, docs, batch_docs, bar)
        finally:
            docs.close()
            bar.close()
        if n_read == 0:
            raise MLPMemError(f"corpus {corpus} is empty: no document has any text; check the path and text_field")
    w = writer
    log(f"tokenized {w.n_docs['train'] + w.n_docs['heldout']} documents of {corpus} into {out}: "
          f"train {w.n_tok['train']:,} tokens ({w.n_docs['train']} docs), heldout {w.n_tok['heldout']:,} tokens "
          f"({w.n_docs['heldout']} docs)")
    return dict(identity, corpus_fingerprint=w.hash.hexdigest()[:16], sources=sources, eos_token_id=w.eos,
                dtype="int32", byte_order="little", n_tokens=dict(w.n_tok), n_docs=dict(w.n_docs),
                n_truncated_docs=dict(w.n_truncated), n_docs_read=n_read, n_skipped_bad_utf8=bad.skipped,
                skip_bad_utf8=bool(skip_bad_utf8), files={s: TOKEN_FILES[s] for s in SPLITS}, documents=DOCUMENTS)


def tokenize_corpus(spec: str | os.PathLike, tokenizer, out_dir: str | os.PathLike, *, tokenizer_fingerprint: str,
                    heldout_fraction: float = CorpusSettings.heldout_fraction,
                    max_train_tokens: int | None = CorpusSettings.max_train_tokens,
                    max_heldout_tokens: int | None = CorpusSettings.max_heldout_tokens,
                    text_field: str = CorpusSettings.text_field, skip_bad_utf8: bool = CorpusSettings.skip_bad_utf8,
                    cache_dir=None, batch_docs: int = 256, progress: bool = True) -> dict:
    """Tokenize a corpus into one EOS-joined int32 stream per split; returns the manifest.

    Writes to ``out_dir``: ``train.i32`` and ``heldout.i32`` (raw little-endian int32, each
    document's tokens followed by one EOS), ``documents.jsonl`` (per kept document: ``doc_id``,
    ``group``, ``split``, ``start`` = offset of its first token in its split's stream,
    ``n_tokens`` = its text tokens in the stream, EOS not counted, and ``truncated``), and
    ``manifest.json`` last.

    Caps: ``max_train_tokens``/``max_heldout_tokens`` cut a split's stream at *exactly* that
    many tokens (the last document is cut mid-way and flagged ``truncated``, its EOS dropped), so
    a capped split has a predictable size; reading stops once every split is full.

    A complete ``out_dir`` built with the same spec, tokenizer, split settings, caps and text
    field is returned as is while the corpus files keep the size and modification time recorded
    in ``sources``; a changed file is tokenized again (the same text gives the same
    ``corpus_fingerprint``, so later stages are reused; other text a new one, which they refuse).
    Different settings raise :class:`MLPMemError`.

    Reading is bounded: only regular files are read (a FIFO or a device is an error); a .txt
    file over 1 MiB is read in chunks and any document over ~262k characters is tokenized in
    pieces (cut before a space or after a line break, see ``_CUT``), only until its split's cap
    (text past the cap is not read: a bad UTF-8 byte there goes unnoticed, as it does not matter).
    """
    out = Path(out_dir)
    identity = _corpus_identity(spec, tokenizer, tokenizer_fingerprint, heldout_fraction, max_train_tokens,
                                max_heldout_tokens, text_field, batch_docs)
    stage = Stage(out, identity, "tokenized corpus", files=lambda m: [*m["files"].values(), m["documents"]])
    return run_stage(stage, lambda: _build_streams(spec, tokenizer, out, identity, skip_bad_utf8, cache_dir,
                                                   batch_docs, progress),
                     verify=lambda found: _existing_is_valid(out, found, skip_bad_utf8))


def open_token_stream(out_dir: str | os.PathLike, split: str) -> np.ndarray:
    """The token stream of one split as a read-only int32 memmap (size checked against the manifest)."""
    if split not in SPLITS:
        raise MLPMemError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    out = Path(out_dir)
    manifest = read_manifest(out, "tokenized corpus")
    try:
        n = int(manifest["n_tokens"][split])
    except (KeyError, TypeError, ValueError):
        raise MLPMemError(f"{out} is not a tokenized corpus (its manifest has no n_tokens.{split}); "
                          "point at the corpus stage's directory") from None
    path = out / TOKEN_FILES[split]
    check_file_size(path, n * TOKEN_DTYPE.itemsize, f"{split} token stream")
    if n == 0:
        return np.zeros(0, dtype=TOKEN_DTYPE)
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", shape=(n,))


def read_document_index(out_dir: str | os.PathLike) -> Iterator[dict]:
    """Stream the records of ``documents.jsonl`` of a tokenized corpus (one per kept document)."""
    out = Path(out_dir)
    read_manifest(out, "tokenized corpus")
    try:
        with open(out / DOCUMENTS, encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)
    except OSError as e:
        raise MLPMemError(f"cannot read {out / DOCUMENTS} ({e.strerror or e}); rebuild the corpus stage") from None
