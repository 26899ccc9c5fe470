"""Manifest helpers, kept importable under their old name: they live in :mod:`mlpmemory.io`."""

from .io import (MANIFEST, atomic_write_json, check_fields, check_file_size, is_complete,  # noqa: F401
                 read_json, read_manifest, sha256_file, sha256_json, write_manifest)
