"""`mlpmem`: one command, one subcommand per pipeline stage, each a thin call into pipeline.py.

Options come from the fields of :class:`mlpmemory.config.Config` (their docs are the ``--help``
text). Every stage takes every option: it may have to run the stages before it.

Commands that *use* a finished run (generation, QA, benchmarks, scaling) live in their own
modules (``TOOL_COMMANDS``). Each such module exposes an ``Options`` dataclass (fields made with
:func:`mlpmemory.config.opt`, docs = ``--help``) and ``main(run, opts)``. The module is imported
only when its command is the one being run, so ``mlpmem --help`` stays fast.

Errors a user can fix print as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
import typing
from dataclasses import fields
from pathlib import Path

from .config import PRESETS, Config, load_config_file, make_config
from .errors import MLPMemError

# Every stage accepts every option: settings are saved with the run directory, so an option given
# early (say --k with `mlpmem datastore`) is remembered for the stages that use it.
ALL_GROUPS = ["run", "corpus", "datastore", "index", "targets", "train", "eval"]
STAGES = ("corpus", "datastore", "index", "targets", "train", "eval-ppl", "run")
STAGE_GROUPS = {stage: ALL_GROUPS for stage in STAGES}
STAGE_HELP = {
    "corpus": "tokenise the corpus into train / held-out token streams",
    "datastore": "build the datastore (hidden-state keys -> next tokens) with the frozen base LM",
    "index": "build the FAISS index over the datastore keys",
    "targets": "compute the sparse kNN target distribution of every datastore row",
    "train": "train the MLP memory on the kNN targets (alpha * KL + (1 - alpha) * CE)",
    "eval-ppl": "perplexity of base / +kNN-LM / +MLP memory on identical windows; lambda and T chosen on validation",
    "run": "the main job: every stage on the chosen preset, skipping finished ones, then the results table",
}


# command -> (module, help). The module provides `Options` (a dataclass) and `main(run, opts)`.
TOOL_COMMANDS = {
    "generate": ("mlpmemory.generation", "generate text with the base LM, +MLP memory or +kNN-LM (HF generate: "
                                         "greedy, sampling, beams, stop strings), streaming to the terminal"),
    "eval-qa": ("mlpmemory.qa", "open-domain QA (exact match / F1) of base, +MLP memory, +kNN-LM and +RAG; "
                                "lambda chosen on a dev split"),
    "bench": ("mlpmemory.bench", "speed of base, +MLP memory, +kNN-LM and +RAG on identical inputs: prefill, "
                                 "decode latency, time to first token, per-stage split, peak memory"),
    "scaling": ("mlpmemory.scaling", "memories of several sizes trained on the same targets: held-out "
                                     "perplexity vs parameters, with a fitted power law"),
}


def _arg_type(tp):
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def add_config_args(parser: argparse.ArgumentParser, groups: list[str] | None, cls=Config) -> None:
    """One ``--flag`` per field of the dataclass ``cls`` (in ``groups``; all when None)."""
    hints = typing.get_type_hints(cls)
    sections = {}
    for f in fields(cls):
        group = f.metadata["group"]
        if groups is not None and group not in groups:
            continue
        section = sections.get(group) or parser.add_argument_group(f"{group} options")
        sections[group] = section
        flag = "--" + f.name.replace("_", "-")
        tp = _arg_type(hints[f.name])
        help_text = f.metadata["help"] if "default:" in f.metadata["help"] else f"{f.metadata['help']} (default: {f.default})"
        if tp is bool:
            section.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            section.add_argument(flag, type=tp, default=argparse.SUPPRESS, choices=f.metadata.get("choices"),
                                 help=help_text, metavar=f.name.upper())


def _selected_command(argv: list[str] | None) -> str | None:
    argv = sys.argv[1:] if argv is None else argv
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; a tool command's own options are added only when it is ``command``."""
    parser = argparse.ArgumentParser(prog="mlpmem", description="MLP Memory for Hugging Face causal LMs "
                                     "(arXiv 2508.01832): build a datastore, index and kNN targets, then train and use the memory.",
                                     allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, groups in STAGE_GROUPS.items():
        p = sub.add_parser(name, help=STAGE_HELP[name], description=STAGE_HELP[name], allow_abbrev=False)
        p.add_argument("--preset", choices=sorted(PRESETS), default="quick" if name == "run" else None,
                       help="named settings (quick: 100k datastore tokens, ~12 min on 2 CPU cores; large: 500k tokens, ~50 min; default: the whole corpus)"
                            + (" (default: quick)" if name == "run" else ""))
        p.add_argument("--config", metavar="FILE", help="TOML or JSON file with settings (flags override it)")
        add_config_args(p, groups)
    for name, (module, help_text) in TOOL_COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
        if name == command:
            import importlib

            add_config_args(p, None, importlib.import_module(module).Options)
        p.add_argument("--config", metavar="FILE", help="TOML or JSON file with run settings (flags override it)")
        add_config_args(p, ["run"])
    return parser


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser(_selected_command(argv)).parse_args(argv))
    command = args.pop("command")
    if command in TOOL_COMMANDS:
        return _guarded(lambda: _tool_main(command, args))
    return _guarded(lambda: _stage_main(command, args))


def _guarded(fn) -> int:
    """Run a command: errors a user can fix become one line and exit status 2."""
    try:
        fn()
    except MLPMemError as e:
        print(f"mlpmem: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mlpmem: interrupted; re-run the same command to continue where it stopped", file=sys.stderr)
        return 130
    return 0


def _stage_main(command: str, args: dict) -> None:
    preset, config_file = args.pop("preset", None), args.pop("config", None)
    if "run_dir" not in args:
        args["run_dir"] = f"runs/{preset or 'default'}"
    saved = Path(args["run_dir"]) / "config.json"
    base = load_config_file(saved) if saved.exists() else {}
    cfg = make_config(preset, config_file, base=base, **args)
    from . import pipeline

    run = pipeline.Run(cfg)
    if command == "run":
        results = pipeline.run_all(run)
        print(pipeline.format_table(results))
        print(f"\nresults: {run.dir / 'results.json'}")
    else:
        stage = command.replace("-ppl", "")
        manifest = getattr(pipeline, f"stage_{stage}")(run)
        if stage == "eval":
            from .evaluate import format_ppl_table

            print(format_ppl_table(manifest))
        print(f"{command}: complete in {run.path(stage if stage != 'train' else 'memory')}")
        _print_brief(manifest)


def _tool_main(command: str, args: dict) -> None:
    """Run a tool command on a run directory: run-level settings from the run, its own options from flags."""
    import importlib
    from dataclasses import fields as dc_fields

    module = importlib.import_module(TOOL_COMMANDS[command][0])
    own = {f.name for f in dc_fields(module.Options)}
    opts = module.Options(**{k: v for k, v in args.items() if k in own})
    rest = {k: v for k, v in args.items() if k not in own}
    config_file = rest.pop("config", None)
    rest.setdefault("run_dir", "runs/quick")
    saved = Path(rest["run_dir"]) / "config.json"
    base = load_config_file(saved) if saved.exists() else {}
    cfg = make_config(None, config_file, base=base, **rest)
    if hasattr(opts, "validate"):
        opts.validate()
    from . import pipeline

    module.main(pipeline.Run(cfg, save_config=False), opts)


def _print_brief(manifest: dict) -> None:
    for key in ("n", "n_tokens", "dim", "factory", "recall", "search_qps", "k", "temperature", "mean_nnz",
                "memory_params", "validation"):
        if key in manifest:
            print(f"  {key}: {manifest[key]}")


if __name__ == "__main__":
    sys.exit(main())
