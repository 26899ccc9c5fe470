"""One module per `mlpmem` command; :mod:`mlpmemory.cli` builds the parser and dispatches here.

- :mod:`.stages`: corpus, datastore, index, targets, train, eval-ppl, run (build a run directory)
- :mod:`.generate`, :mod:`.eval_qa`, :mod:`.bench`, :mod:`.scaling`: tools on a finished run, each
  with an ``Options`` dataclass (never saved as run settings) and ``main(run, opts)``.
"""
