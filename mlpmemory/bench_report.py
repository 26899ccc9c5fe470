"""`mlpmem bench`'s reporting side: the FLOP / overhead model, the markdown table and the charts.

Why these live apart from :mod:`mlpmemory.commands.bench`: they time nothing. The table and the charts are
functions of the ``bench.json`` report alone, and the FLOP model only counts a model's parameters
and shapes, so each can be checked (against a hand count, or on a saved report) without running a
measurement, while ``bench.py`` keeps the options, the timed loops, the index building and the
command. Its docstring says how the measured numbers these compare against are taken.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

# display names of bench.SYSTEMS, and the order stages are stacked in the table and charts
LABELS = {"base": "base LM", "memory": "+ MLP memory", "knn_exact": "+ kNN-LM exact (Flat)",
          "knn_ivfpq": "+ kNN-LM IVF-PQ", "rag": "+ RAG (BM25)"}
STAGE_ORDER = ("base_forward", "capture", "memory_forward", "search", "distribution", "mixing", "retrieval")


# -------- FLOP model ----------------------------------------------------------------------------

def base_flops_per_token(model, context: float) -> dict:
    """Forward FLOPs per token of a HF causal LM at a mean attended ``context`` (in positions).

    ``2 * non-embedding params`` (token/position embeddings and the LM head excluded),
    ``+ 4 * layers * context * d_attn`` (QK^T and attention x V, d_attn = heads x head_dim),
    ``+ 2 * d * V`` (the LM head, counted once even when tied to the input embedding).
    """
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    unique = {p.data_ptr(): p.numel() for p in model.parameters()}
    emb = {m.weight.data_ptr() for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    head = model.get_output_embeddings()
    excluded = emb | {head.weight.data_ptr()} | ({head.bias.data_ptr()} if getattr(head, "bias", None) is not None
                                                 else set())
    non_emb = sum(n for ptr, n in unique.items() if ptr not in excluded)
    vocab, d = head.weight.shape
    heads = int(cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    layers = int(cfg.num_hidden_layers)
    parts = {"params": 2.0 * non_emb, "attention": 4.0 * layers * float(context) * heads * head_dim,
             "lm_head": 2.0 * d * vocab}
    return {**parts, "total": sum(parts.values()), "non_embedding_params": int(non_emb), "context": float(context)}


def memory_flops_per_token(memory) -> float:
    """2 x the memory's parameters (its LM head included): one matmul-add per weight per token."""
    return 2.0 * sum(p.numel() for p in memory.parameters())


# -------- Overhead model, table and charts ------------------------------------------------------

def flop_report(model, results: dict, t: int, new_tokens: int, dtypes: str = "") -> dict | None:
    """Predicted (FLOPs) vs measured overhead of the memory over the base LM, prefill and decode."""
    if "base" not in results or "memory" not in results:
        return None
    mem_flops, rows = results["memory"]["memory_flops_per_token"], {}
    # prefill: position p attends p + 1 positions; decode steps run at positions t .. t + new_tokens - 2
    for phase, ctx, get in (("prefill_batch_1", (t + 1) / 2, lambda r: r["prefill"]["batch_1"]),
                            ("prefill_batch_8", (t + 1) / 2, lambda r: r["prefill"]["batch_8"]),
                            ("decode", t + 1 + (new_tokens - 2) / 2, lambda r: r["decode"])):
        base, mem = get(results["base"]), get(results["memory"])
        flops = base_flops_per_token(model, ctx)
        predicted, base_s = mem_flops / flops["total"], 1 / base["tokens_per_s"]
        measured = base["tokens_per_s"] / mem["tokens_per_s"] - 1
        ms = {"base": 1e3 * base_s, "memory_system": 1e3 / mem["tokens_per_s"], "memory_forward_predicted":
              1e3 * base_s * predicted, **{k: 1e3 * v for k, v in mem["stage_s_per_token"].items() if k != "total"},
              "base_forward_in_base_system": 1e3 * base["stage_s_per_token"]["base_forward"]}
        row = rows[phase] = {"base_flops_per_token": flops["total"], "base_flops_parts": flops,
                             "memory_flops_per_token": mem_flops, "predicted_overhead": predicted,
                             "measured_overhead": measured, "ms_per_token": ms,
                             "differs_over_10pct": abs(measured - predicted) > 0.10 * predicted}
        if row["differs_over_10pct"]:
            what = "the targets only" if phase.startswith("prefill") else "log-softmax over V + logaddexp"
            extra = ms["base_forward"] - ms["base_forward_in_base_system"]
            row["explanation"] = (
                f"memory_forward {ms.get('memory_forward', 0):.3g} ms/token vs {ms['memory_forward_predicted']:.3g} "
                f"predicted by FLOPs (prefill: its head's float32 log-softmax included); mixing ({what}) "
                f"{ms.get('mixing', 0):.3g} ms/token, FLOP-free in the model; base forward {extra:+.3g} "
                f"ms/token vs the base system (hook capture, timing noise){dtypes}")
    return rows


def _f(x, spec=".1f"):
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def format_markdown(report: dict) -> str:
    res, m = {k: report["systems"][k] for k in report["order"]}, report["machine"]
    lines = [f"Speed on {report['prompts']['n']} held-out prompts x {report['prompts']['tokens']} tokens, "
             f"{report['settings']['bench_decode_tokens']} greedy tokens each; {m['device']} ({m['cpu']}, "
             f"{m['torch_threads']} torch threads), {m['dtype']}; medians of {report['settings']['bench_repeats']} "
             "repeats after a warm-up", "",
             "| system | prefill tok/s b1 | prefill tok/s b8 | decode ms/token p50 | p95 | decode tok/s | TTFT ms p50 "
             "| peak RSS MB (before) | repeats |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in res.items():
        d, mem = r["decode"], r["memory"]
        cuda = f", CUDA {mem['cuda_max_allocated_mb']:.0f}" if "cuda_max_allocated_mb" in mem else ""
        lines.append(f"| {LABELS[name]} | {_f(r['prefill']['batch_1']['tokens_per_s'])} | "
                     f"{_f(r['prefill']['batch_8']['tokens_per_s'])} | {_f(d['latency_ms_p50'], '.2f')} | "
                     f"{_f(d['latency_ms_p95'], '.2f')} | {_f(d['tokens_per_s'])} | {_f(d['ttft_ms_p50'])} | "
                     f"{_f(mem['peak_rss_mb'], '.0f')} ({_f(mem['rss_before_mb'], '.0f')}){cuda} | {d['repeats']} |")
    stages = [s for s in STAGE_ORDER if any(s in b["stage_s_per_token"] for r in res.values()
                                            for b in (r["prefill"]["batch_1"], r["decode"]))]
    lines += ["", "Stage split, ms per useful token (median repeat; base_forward = total - timed sections)", "",
              "| system | phase | " + " | ".join(stages) + " | total |", "|---|---|" + "---|" * (len(stages) + 1)]
    for name, r in res.items():
        for phase, block in (("prefill b1", r["prefill"]["batch_1"]), ("decode b1", r["decode"])):
            st = block["stage_s_per_token"]
            lines.append(f"| {LABELS[name]} | {phase} | " + " | ".join(_f(1e3 * st[s], ".3f") if s in st else ""
                                                                     for s in stages) + f" | {1e3 * st['total']:.3f} |")
    if report.get("overhead_model"):
        lines += ["", "Overhead model: FLOPs per token, memory vs base LM", "",
                  "| phase | base GFLOP/token | memory GFLOP/token | predicted overhead | measured overhead | note |",
                  "|---|---|---|---|---|---|"]
        for phase, row in report["overhead_model"].items():
            lines.append(f"| {phase} | {row['base_flops_per_token'] / 1e9:.4g} | "
                         f"{row['memory_flops_per_token'] / 1e9:.4g}"
                         f" | {100 * row['predicted_overhead']:+.1f}% | {100 * row['measured_overhead']:+.1f}% | "
                         f"{row.get('explanation', 'within 10%')} |")
    sc = report.get("scaling")
    if sc:
        lines += ["", "Datastore-size scaling: decode tokens/s (batch 1 / batch 8)", "",
                  "| N | base | + MLP memory | + kNN exact | + kNN IVF-PQ | IVF-PQ factory (recall@64) |",
                  "|---|---|---|---|---|---|"]
        for pt in sc["points"]:
            s = pt["systems"]
            cells = [f"{_f(s[k]['batch_1']['tokens_per_s'])} / {_f(s[k]['batch_8']['tokens_per_s'])}"
                     for k in ("base", "memory", "knn_exact", "knn_ivfpq")]
            ix = s["knn_ivfpq"]["index"]
            lines.append(f"| {pt['n']:,} | " + " | ".join(cells) + f" | {ix['factory']} ({_f(ix['recall'], '.3f')}) |")
        r = sc["ratios_at_largest_n"]
        lines += ["", f"At N = {sc['largest_n']:,} the memory decodes {r['memory_over_knn_exact_batch_1']:.2f}x "
                      f"(batch 1) / {r['memory_over_knn_exact_batch_8']:.2f}x (batch 8) as fast as exact kNN-LM and "
                      f"{r['memory_over_knn_ivfpq_batch_1']:.2f}x / {r['memory_over_knn_ivfpq_batch_8']:.2f}x "
                      "as fast as IVF-PQ kNN-LM."]
    lines += ["", "| machine | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in m.items()]
    return "\n".join(lines)


def write_charts(out: Path, report: dict) -> None:
    """throughput.png (per system), stage_split.png (stacked, prefill and decode), scaling.png (vs N)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res, names = report["systems"], report["order"]
    x, blocks = np.arange(len(names)), {"prefill b1": lambda r: r["prefill"]["batch_1"],
                                         "prefill b8": lambda r: r["prefill"]["batch_8"],
                                         "decode b1": lambda r: r["decode"]}

    def finish(fig, axes, name):
        for ax in axes:
            if ax.get_xlabel() == "":
                ax.set_xticks(x, [LABELS[n].replace("+ ", "+") for n in names], rotation=15, fontsize=8)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for j, (label, get) in enumerate(blocks.items()):
        ax.bar(x + (j - 1) * 0.27, [get(res[n])["tokens_per_s"] for n in names], 0.27, label=label)
    ax.set(ylabel="tokens / s", yscale="log", title="Throughput per system (median of repeats)")
    finish(fig, [ax], "throughput.png")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, phase in zip(axes, ("prefill b1", "decode b1")):
        bottom = np.zeros(len(names))
        for stage in STAGE_ORDER:
            vals = np.array([1e3 * blocks[phase](res[n])["stage_s_per_token"].get(stage, 0.0) for n in names])
            if vals.any():
                ax.bar(x, vals, 0.6, bottom=bottom, label=stage)
                bottom += vals
        ax.set(ylabel="ms per useful token", title=f"Stage split: {phase}")
    finish(fig, axes, "stage_split.png")
    if report.get("scaling"):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        pts = report["scaling"]["points"]
        for c, k in enumerate(("base", "memory", "knn_exact", "knn_ivfpq")):
            for b, style in ((1, "-o"), (8, "--s")):
                ax.plot([p["n"] for p in pts], [p["systems"][k][f"batch_{b}"]["tokens_per_s"] for p in pts], style,
                        color=f"C{c}", label=f"{LABELS[k]}, batch {b}")
        ax.set(xscale="log", yscale="log", xlabel="datastore rows N", ylabel="decode tokens / s",
               title="Decode throughput vs datastore size")
        finish(fig, [ax], "scaling.png")


def write_outputs(out: Path, report: dict) -> str:
    table = format_markdown(report)
    (out / "bench.md").write_text(table + "\n")
    write_charts(out, report)
    return table
