"""The base LM after continued pretraining (all weights) on the memory's corpus, with the memory's token budget."""

from __future__ import annotations

from .finetuned import FinetunedSystem


class CPTSystem(FinetunedSystem):
    name = "cpt"
    label = "+ CPT (continued pretraining)"
    component = "cpt"
    method = "cpt"
