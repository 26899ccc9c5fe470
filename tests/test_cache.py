"""Registry downloads go through the simple index (PEP 503) with sha256 checks, once."""

import hashlib

import pytest

from mlpmemory.cache import _download_from_simple_index, fetch_pypi_distribution


def make_index(root, payload: bytes, digest: str | None = None):
    files = root / "files"
    files.mkdir(parents=True)
    (files / "some_pkg-1.0.tar.gz").write_bytes(payload)
    (files / "some_pkg-1.0.1.tar.gz").write_bytes(b"another version")
    digest = digest or hashlib.sha256(payload).hexdigest()
    page = root / "simple" / "some-pkg"
    page.mkdir(parents=True)
    (page / "index.html").write_text(
        f'<html><body><a href="{files.as_uri()}/some_pkg-1.0.1.tar.gz">some_pkg-1.0.1.tar.gz</a>'
        f'<a href="{files.as_uri()}/some_pkg-1.0.tar.gz#sha256={digest}">some_pkg-1.0.tar.gz</a></body></html>')
    return (root / "simple").as_uri()


def test_download_once_with_checked_digest(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_INDEX_URL", make_index(tmp_path / "idx", b"the archive"))
    monkeypatch.setenv("MLPMEM_CACHE", str(tmp_path / "cache"))
    path = fetch_pypi_distribution("some-pkg", "1.0")
    assert path.name == "some_pkg-1.0.tar.gz" and path.read_bytes() == b"the archive"
    (tmp_path / "idx").rename(tmp_path / "gone")  # the second call must not touch the index
    assert fetch_pypi_distribution("some-pkg", "1.0") == path


def test_digest_mismatch_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_INDEX_URL", make_index(tmp_path / "idx", b"the archive", digest="0" * 64))
    (tmp_path / "dl").mkdir()
    with pytest.raises(OSError, match="sha256 mismatch"):
        _download_from_simple_index("some-pkg", "1.0", tmp_path / "dl")
    assert not list((tmp_path / "dl").iterdir())
