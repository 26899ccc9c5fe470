"""The base LM with a LoRA adapter trained on the memory's corpus, sized like the memory's non-head parameters."""

from __future__ import annotations

from .finetuned import FinetunedSystem


class LoRASystem(FinetunedSystem):
    name = "lora"
    label = "+ LoRA"
    component = "lora"
    method = "lora"

    @classmethod
    def table_name(cls, row: dict) -> str:
        parts = [f"{row['tokens_trained']:,} tokens" if row.get("tokens_trained") is not None else None,
                 f"rank {row['lora_rank']}" if row.get("lora_rank") is not None else None]
        parts = [p for p in parts if p]
        return cls.name + (f" ({', '.join(parts)})" if parts else "")
