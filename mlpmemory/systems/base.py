"""The base LM alone: the reference every other system is compared with."""

from __future__ import annotations

import numpy as np

from . import System


class BaseLM(System):
    name = "base"
    label = "base LM"
    component = "lm"

    @classmethod
    def from_components(cls, **components) -> BaseLM:
        return cls()  # every caller has the base LM

    def eval_logprobs(self, ds, *, choice=None, batch: int = 4096, progress: bool = True):
        return np.asarray(ds.lm_logprob, dtype=np.float64)  # stored by the eval dir's own pass
