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
