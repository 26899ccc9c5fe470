"""`mlpmem finetune`: the fine-tuning baselines (+CPT, +LoRA) of a finished run, trained with the memory's budget.

The training is :func:`mlpmemory.finetune.finetune` (resumable: re-running the same command continues
an interrupted one); its output goes to ``<run>/finetune_cpt/`` or ``<run>/finetune_lora/``, after which
eval-ppl reports the ``cpt`` / ``lora`` rows and generate, eval-qa and serve accept them as systems.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import opt


@dataclass
class Options:
    """Which fine-tune, and how it is trained (defaults: the memory's budget and size)."""

    method: str = opt("lora", "cpt: all weights of the base LM (AdamW, causal-LM loss); lora: peft adapters on the "
                              "attention and MLP projections", choices=["cpt", "lora"])
    ft_tokens: int | None = opt(None, "target tokens to train on (default: as many as the memory was trained on, its "
                                      "steps x rows per step)", minimum=1)
    ft_lr: float | None = opt(None, "peak AdamW learning rate, linear warmup then decay (default: 5e-05 for cpt, "
                                    "5e-04 for lora)")
    ft_windows_per_step: int = opt(8, "datastore windows per optimizer step", minimum=1)
    ft_micro_windows: int = opt(2, "windows per forward/backward pass, gradients accumulated over the step (bounds "
                                    "the activations' memory)", minimum=1)
    ft_warmup: float = opt(0.03, "fraction of steps spent warming up the learning rate")
    ft_weight_decay: float = opt(0.0, "AdamW weight decay", minimum=0.0)
    ft_grad_clip: float = opt(1.0, "gradient norm clip")
    ft_seed: int = opt(0, "seed of the window order and the adapters' initialisation", minimum=0)
    ft_checkpoint_every: int = opt(50, "steps between resumable checkpoints", minimum=1)
    lora_rank: int | None = opt(None, "LoRA rank (default: the adapter closest in size to the memory's non-head "
                                      "parameters)", minimum=1)
    lora_alpha: float | None = opt(None, "LoRA alpha (default: 2 x rank)")
    ft_autocast: str = opt("auto", "training precision: auto (bf16 autocast where bf16 is fast), off, bfloat16",
                           choices=["auto", "off", "bfloat16"])

    def settings(self):
        from ..finetune import FinetuneSettings

        return FinetuneSettings(lr=self.ft_lr, tokens=self.ft_tokens, windows_per_step=self.ft_windows_per_step,
                                micro_windows=self.ft_micro_windows,
                                warmup=self.ft_warmup, weight_decay=self.ft_weight_decay, grad_clip=self.ft_grad_clip,
                                seed=self.ft_seed, checkpoint_every=self.ft_checkpoint_every,
                                lora_rank=self.lora_rank, lora_alpha=self.lora_alpha, autocast=self.ft_autocast)

    def validate(self) -> None:
        from ..errors import MLPMemError

        for name in ("ft_lr", "lora_alpha", "ft_grad_clip"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise MLPMemError(f"--{name.replace('_', '-')} must be > 0, got {value}")
        if not 0.0 <= self.ft_warmup < 1.0:
            raise MLPMemError(f"--ft-warmup must be in [0, 1), got {self.ft_warmup}")
        self.settings().validate()


def main(run, opts: Options) -> None:
    from ..finetune import DIRS, finetune

    m = finetune(run, opts.method, opts.settings())
    lora = m.get("lora") or {}
    print(f"finetune {opts.method}: complete in {run.path(DIRS[opts.method])}")
    print(f"  steps: {m['steps']}, target tokens trained: {m['tokens_trained']:,} (budget {m['budget']['tokens']:,}: "
          f"{m['budget']['rule']})")
    print(f"  trainable params: {m['trainable_params']:,}" + (
        f" (LoRA rank {lora['rank']}, memory non-head params {lora['memory_non_head_params']:,})" if lora else ""))
    print(f"  final loss: {m['final_loss']}, seconds: {m['seconds']}")
