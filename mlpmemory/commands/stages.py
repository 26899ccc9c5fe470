"""The stage commands (corpus, datastore, index, targets, train, eval-ppl, run): settings in, artifacts out.

A stage command accepts the settings of the groups it reads (:data:`STAGE_READS`: the run group,
its own stage and every stage before it, which it may have to build), checks the cheap things
first (:func:`mlpmemory.pipeline.preflight`), saves the effective settings as the run's
``config.json`` and calls its stage in :mod:`mlpmemory.pipeline`. ``eval-ppl``'s
:class:`EvalPplOptions` describe one invocation and are never saved.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..config import GROUPS, load_config_file, make_config, opt
from ..errors import MLPMemError
from ..io import atomic_write_bytes

STAGE_ORDER = ["corpus", "datastore", "index", "targets", "train", "eval-ppl"]
_GROUP_OF_STAGE = {"corpus": "corpus", "datastore": "datastore", "index": "index", "targets": "targets",
                   "train": "train", "eval-ppl": "eval"}
# command -> the settings groups it reads: the run group, its own stage and every stage before it.
STAGE_READS = {stage: ["run"] + [_GROUP_OF_STAGE[s] for s in STAGE_ORDER[:i + 1]]
               for i, stage in enumerate(STAGE_ORDER)}
STAGE_READS["run"] = list(GROUPS)
STAGE_HELP = {
    "corpus": "tokenise the corpus into train / held-out token streams",
    "datastore": "build the datastore (hidden-state keys -> next tokens) with the frozen base LM",
    "index": "build the FAISS index over the datastore keys",
    "targets": "compute the sparse kNN target distribution of every datastore row",
    "train": "train the MLP memory on the kNN targets (alpha * KL + (1 - alpha) * CE)",
    "eval-ppl": "perplexity of base / +kNN-LM / +MLP memory / +RAG on identical windows; lambda and T chosen on "
                "validation",
    "run": "the main job: every stage (preset quick for a new run), skipping finished ones, then the results table",
}


@dataclass
class EvalPplOptions:
    """Options of one `mlpmem eval-ppl` invocation (never saved as run settings)."""

    eval_text: str | None = opt(None, "score this text file/corpus instead of the held-out test half; lambda and T "
                                      "are still chosen on the held-out validation slice, and the report goes to "
                                      "<run>/eval_text/<text fingerprint>/ (results.json is not touched)")


def saved_settings(run_dir: str) -> dict:
    """The run's saved settings (flat), checked on their own so that a bad saved value is named as such."""
    saved = Path(run_dir) / "config.json"
    if not saved.exists():
        return {}
    flat = load_config_file(saved)
    try:
        make_config(base=flat)
    except MLPMemError as e:
        raise MLPMemError(f"{saved} (the run's saved settings): {e}; fix or delete that file") from None
    return flat


def base_raw(run_dir: str) -> dict | None:
    """The run's saved config.json as it is on disk (None when missing or unreadable)."""
    try:
        return json.loads((Path(run_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None


def check_run_dir(run_dir: str, flag: str = "--run-dir") -> None:
    """A one-line error when ``run_dir`` (or a folder above it) is an existing non-folder."""
    for p in (Path(run_dir), *Path(run_dir).parents):
        if p.exists():
            if not p.is_dir():
                raise MLPMemError(f"{flag} {run_dir}: {p} is a file, not a folder; give a folder (new or existing)")
            return


def check_writable(path: str | Path, what: str, flag: str) -> None:
    """Fail early, with a one-line error, when folder ``path`` (created if missing) cannot receive a new file."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".mlpmem-write-check-"):
            pass
    except OSError as e:
        raise MLPMemError(f"{what} {path} is not writable ({e.strerror or e}); make it writable or give another "
                          f"{flag}") from None


def main(command: str, args: dict) -> None:
    """Run stage ``command`` with the parsed flags ``args`` (preset, config file, settings, eval-ppl options)."""
    from .. import distributed, pipeline
    from ..models import resolve_device

    preset, config_file = args.pop("preset", None), args.pop("config", None)
    eval_text = args.pop("eval_text", None)
    if "run_dir" not in args and config_file:  # a run_dir in the config file names the run
        args["run_dir"] = load_config_file(config_file).get("run_dir")
    if not args.get("run_dir"):
        args["run_dir"] = f"runs/{preset or ('quick' if command == 'run' else 'default')}"
    check_run_dir(args["run_dir"])
    if eval_text and eval_text != "wiki" and not Path(eval_text).exists():
        raise MLPMemError(f"--eval-text {eval_text} does not exist; give a text file or folder")
    base = saved_settings(args["run_dir"])
    if command == "run" and not base and preset is None:
        preset = "quick"  # a new run without a preset is the README's main job
    run = pipeline.Run(make_config(preset, config_file, base=base, **args))
    pipeline.preflight(run)
    resolve_device(run.cfg.run.device)  # a device this machine lacks is refused before it is saved
    previous = (run.dir / "config.json").read_bytes() if (run.dir / "config.json").is_file() else None
    changed = run.cfg.to_dict() != base_raw(args["run_dir"])
    distributed.barrier()  # every rank has read the saved settings before rank 0 replaces them
    changed = changed and distributed.is_main()  # one writer per job
    if changed:  # unchanged settings: nothing to write (read-only runs work)
        check_writable(run.dir, "run directory", "--run-dir")
        run.save_config()
    try:
        _dispatch(command, run, eval_text, show=distributed.is_main())
    except MLPMemError:
        if changed:  # settings a finished stage refused (e.g. another --block) must not become the run's
            if previous is None:
                (run.dir / "config.json").unlink(missing_ok=True)
            else:
                atomic_write_bytes(run.dir / "config.json", previous)
        raise


def _dispatch(command: str, run, eval_text: str | None, show: bool = True) -> None:
    from .. import pipeline

    if command == "run":
        results = pipeline.run_all(run)
        if not show:
            return
        print(pipeline.format_table(results))
        print(f"\nresults: {run.dir / 'results.json'}")
    elif command == "eval-ppl":
        from ..evaluate import format_ppl_table

        result = pipeline.stage_eval(run, eval_text=eval_text)
        if not show:
            return
        print(format_ppl_table(result))
        if result.get("out_of_domain"):
            systems = result["test"]["systems"]
            test_ppl = {"mlp_memory" if k == "memory" else k: v["ppl"] for k, v in systems.items()}
            print("\n".join(pipeline.ood_table(result["out_of_domain"], result["test"]["tokens_scored"], test_ppl)))
        where = pipeline.EVAL_TEXT if eval_text else pipeline.EVAL
        print(f"eval-ppl: complete; report in {run.dir / where}")
    else:
        manifest = getattr(pipeline, f"stage_{command}")(run)
        if not show:
            return
        print(f"{command}: complete in {run.path(command if command != 'train' else 'memory')}")
        _print_brief(manifest)


def _print_brief(manifest: dict) -> None:
    for key in ("n", "n_tokens", "dim", "factory", "recall", "search_qps", "k", "temperature", "mean_nnz",
                "memory_params", "validation"):
        if key in manifest:
            print(f"  {key}: {manifest[key]}")
