"""`mlpmem`: one command, one subcommand per pipeline stage or tool; each a thin call into the library.

Stage commands (corpus ... eval-ppl, run; :mod:`mlpmemory.commands.stages`) build a run directory.
Each accepts the settings of the groups it reads (its own stage and every stage before it, which it
may have to build) and saves them as the run's ``config.json``. ``eval-ppl`` also takes invocation
options that are never saved.

Tool commands (generate, eval-qa, bench, scaling) use a finished run. Each lives in its own module
under :mod:`mlpmemory.commands` (:data:`TOOL_COMMANDS`), which exposes an ``Options`` dataclass (fields made with
:func:`mlpmemory.config.opt`, docs = ``--help``) and ``main(run, opts)``; the module is imported
only when its command runs, so ``mlpmem --help`` stays fast. Tool options are never saved.

Errors a user can fix print as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import re
import sys
import types
import typing
from dataclasses import fields

from .commands.stages import STAGE_HELP, STAGE_READS, EvalPplOptions, check_run_dir
from .config import GROUPS, PRESETS, check_fields
from .errors import MLPMemError

# command -> (module, help). The module provides `Options` (a dataclass) and `main(run, opts)`.
TOOL_COMMANDS = {
    "generate": ("mlpmemory.commands.generate", "generate text with any system (HF generate: greedy, sampling, "
                                                "beams, stop strings), streaming to the terminal"),
    "eval-qa": ("mlpmemory.commands.eval_qa", "open-domain QA (exact match / F1) of every system; lambda chosen on "
                                              "a dev split"),
    "bench": ("mlpmemory.commands.bench", "speed of every system on identical inputs: prefill, decode latency, time "
                                          "to first token, per-stage split, peak memory"),
    "scaling": ("mlpmemory.commands.scaling", "memories of several sizes trained on the same targets: held-out "
                                              "perplexity vs parameters, with a fitted power law"),
    "verify": ("mlpmemory.commands.verify", "check every finished stage's files against the sizes and sha256 "
                                            "checksums in its manifest; says what to delete and rebuild"),
    "plan": ("mlpmemory.commands.plan", "disk, peak RAM per rank and time of each stage for a corpus and model size"),
    "serve": ("mlpmemory.commands.serve", "an OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, "
                                          "streaming) for every system, batched"),
    "loadtest": ("mlpmemory.commands.loadtest", "`mlpmem serve` under load from the openai client: time to first "
                                                "token, tokens/s and errors at several concurrency levels"),
    "finetune": ("mlpmemory.commands.finetune", "fine-tune the base LM (cpt or lora) with the memory's token budget"),
    "eval-harness": ("mlpmemory.commands.eval_harness", "lm-evaluation-harness tasks (offline NQ-open, open SQuAD, "
                                                        "TruthfulQA MC, HaluEval) on one system of a run"),
}


# tool commands whose work is split over torchrun ranks (the others run on one process)
RANKED_TOOLS = {"eval-qa"}


def _arg_type(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def add_dataclass_args(parser: argparse.ArgumentParser, cls, title: str) -> None:
    """One ``--flag`` per field of the dataclass ``cls``, in a help section named ``title``."""
    section = parser.add_argument_group(title, (cls.__doc__ or "").strip().splitlines()[0] or None)
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        tp = _arg_type(hints[f.name])
        help_text = f.metadata["help"]
        if "default:" not in help_text and "(none:" not in help_text:
            help_text += f" (default: {f.default})"
        if tp is bool:
            section.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                 help=help_text)
        else:
            section.add_argument(flag, type=tp, default=argparse.SUPPRESS, choices=f.metadata.get("choices"),
                                 help=help_text, metavar=f.name.upper())


def _verbosity_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const=-1, default=0,
                       help="only warnings and errors on stderr")
    group.add_argument("-v", "--verbose", dest="verbosity", action="store_const", const=1, help="debug messages")


def _selected_command(argv: list[str] | None) -> str | None:
    argv = sys.argv[1:] if argv is None else argv
    return next((a for a in argv if not a.startswith("-")), None)


def _add_stage_parser(sub, name: str) -> None:
    p = sub.add_parser(name, help=STAGE_HELP[name], description=STAGE_HELP[name], allow_abbrev=False)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="named settings: quick (100k datastore tokens), large (500k), default (the whole corpus)"
                        + ("; default: quick for a new run, the saved settings for an existing one"
                           if name == "run" else ""))
    p.add_argument("--config", metavar="FILE", help="TOML or JSON file with run settings (flags override it)")
    _nproc_arg(p)
    _verbosity_args(p)
    for group in STAGE_READS[name]:
        add_dataclass_args(p, GROUPS[group], f"{group} settings")
    if name == "eval-ppl":
        add_dataclass_args(p, EvalPplOptions, "this invocation only (not saved)")


def _nproc_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="split the heavy work over N local processes (launches torchrun; each takes cores/N threads). "
                        "For several machines call `torchrun ... -m mlpmemory` yourself (docs/scale.md). Not saved")


def _add_tool_parser(sub, name: str, selected: bool) -> None:
    module, help_text = TOOL_COMMANDS[name]
    p = sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
    if selected:  # a tool module is imported only when its command runs
        add_dataclass_args(p, importlib.import_module(module).Options, f"{name} options (not saved)")
    if name in RANKED_TOOLS:
        _nproc_arg(p)
    _verbosity_args(p)
    add_dataclass_args(p, GROUPS["run"], "run settings (default: the run's saved ones)")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; a tool command's own options are added only when it is ``command``."""
    parser = argparse.ArgumentParser(prog="mlpmem", description="MLP Memory for Hugging Face causal LMs "
                                     "(arXiv 2508.01832): build a datastore, index and kNN targets, then train and "
                                     "use the memory.", allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in STAGE_READS:
        _add_stage_parser(sub, name)
    for name in TOOL_COMMANDS:
        _add_tool_parser(sub, name, name == command)
    return parser


def main(argv: list[str] | None = None) -> int:
    from . import distributed
    from .log import configure

    argv = sys.argv[1:] if argv is None else list(argv)
    args = vars(build_parser(_selected_command(argv)).parse_args(argv))
    command = args.pop("command")
    nproc = args.pop("nproc", 1)
    if nproc < 1:
        print(f"mlpmem: error: --nproc must be >= 1, got {nproc}", file=sys.stderr)
        return 2
    if nproc > 1 and not distributed.launched():
        return launch_torchrun(nproc, argv)
    distributed.init()
    verbosity = args.pop("verbosity", 0)
    configure(verbosity if distributed.rank() == 0 else -1)  # one voice per job: rank 0's
    where = args.get("run_dir")
    try:
        if command in TOOL_COMMANDS:
            return _guarded(lambda: _tool_main(command, args), where)
        from .commands import stages

        return _guarded(lambda: stages.main(command, args), where)
    finally:
        distributed.shutdown()


def launch_torchrun(nproc: int, argv: list[str]) -> int:
    """``mlpmem <command> --nproc N ...`` = ``torchrun --standalone --nproc-per-node N -m mlpmemory <command> ...``.

    torchrun runs in this process (its ``run`` function); a failed rank prints its own one-line
    error, and this returns its exit status instead of torchrun's traceback.
    """
    import os

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    from . import distributed

    rest, skip = [], False
    for a in argv:  # the same command line without --nproc
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    os.environ.setdefault("OMP_NUM_THREADS", str(distributed.threads_per_rank(nproc)))  # else torchrun sets 1
    os.environ.setdefault("LOGLEVEL", "ERROR")  # torchrun's own start-up warnings
    try:
        run(get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "mlpmemory", *rest]))
    except ChildFailedError as e:
        code = e.get_first_failure()[1].exitcode
        print(f"mlpmem: error: {len(e.failures)} of {nproc} ranks stopped (first: exit status {code}); "
              "see their messages above", file=sys.stderr)
        return code if code > 0 else 1
    return 0


def _guarded(fn, run_dir: str | None = None) -> int:
    """Run a command: errors a user can fix become one line and exit status 2."""
    try:
        fn()
    except MLPMemError as e:
        print(f"mlpmem: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if _peer_failed(e):  # its own one-line message is above; no second traceback for the same failure
            print("mlpmem: error: another rank of this job failed (its message is above); fix that and re-run: "
                  "finished work is kept", file=sys.stderr)
            return 2
        err = write_failure(e, run_dir)
        if err is None:
            raise
        print(f"mlpmem: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mlpmem: interrupted; re-run the same command to continue where it stopped", file=sys.stderr)
        return 130
    return 0


def _peer_failed(e: BaseException) -> bool:
    from . import distributed

    return distributed.launched() and isinstance(e, RuntimeError) and "closed by peer" in str(e)


_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_DENIED = {errno.EACCES, errno.EPERM, errno.EROFS}
# What libraries that write files themselves (safetensors, FAISS, numpy) say when a write fails.
_FULL_TEXT = re.compile(r"No space left|File too large|[Qq]uota exceeded|os error (28|27|122)\b|"
                        r"\d+ requested and \d+ written|write error in")
_DENIED_TEXT = re.compile(r"Permission denied|Read-only file system|os error (13|30|1)\b")


def write_failure(e: BaseException, run_dir: str | None = None) -> MLPMemError | None:
    """A disk-full or permission failure of a write, as a one-line error saying what to do; else None.

    Writes are atomic, so re-running the same command after freeing space resumes where it stopped.
    """
    code, text = getattr(e, "errno", None), " ".join(str(e).split())
    full = code in _FULL or (code is None and _FULL_TEXT.search(text))
    denied = code in _DENIED or (code is None and not full and _DENIED_TEXT.search(text))
    if not (full or denied):
        return None
    path = getattr(e, "filename", None) or (f"a file under {run_dir}" if run_dir else "a file")
    reason = getattr(e, "strerror", None) or text[:200]
    if full:
        return MLPMemError(f"disk full (or file-size limit reached) writing {path} ({reason}); free space on that disk "
                           "or give --run-dir / --cache-dir on another one, then re-run the same command: it "
                           "continues where it stopped")
    return MLPMemError(f"permission denied on {path} ({reason}); make it writable, or write elsewhere with "
                       "--run-dir / --cache-dir (generate: --output)")


def _tool_main(command: str, args: dict) -> None:
    """Run a tool command on a run directory: run settings from the run, its own options from flags."""
    from . import distributed, pipeline

    if distributed.launched() and command not in RANKED_TOOLS:
        raise MLPMemError(f"`mlpmem {command}` runs on one process; run it without torchrun (commands that split "
                          f"their work over ranks: the stages and {', '.join(sorted(RANKED_TOOLS))})")
    module = importlib.import_module(TOOL_COMMANDS[command][0])
    own = {f.name for f in fields(module.Options)}
    opts = module.Options(**{k: v for k, v in args.items() if k in own})
    rest = {k: v for k, v in args.items() if k not in own}
    rest.setdefault("run_dir", "runs/quick")
    check_fields(opts)  # the options first (types, finite numbers), without touching any file
    if hasattr(opts, "validate"):
        opts.validate()
    for name in own:
        if name.endswith("_out") and getattr(opts, name):  # output folders (bench, scaling)
            check_run_dir(getattr(opts, name), "--" + name.replace("_", "-"))
    if not getattr(module, "needs_run", lambda _: True)(opts):  # e.g. `plan --tokens`: no run directory
        module.main(None, opts)
        return
    module.main(pipeline.open_run(rest.pop("run_dir"), **rest), opts)


if __name__ == "__main__":
    sys.exit(main())
