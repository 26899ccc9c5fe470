"""lm-evaluation-harness task configs over data this project has offline (``mlpmem eval-harness``).

The YAML files here are lm_eval tasks (pass this folder as ``--include_path``); ``data.py`` materialises
their data as local JSONL files and holds their scoring functions. Why the data comes from where it
does is in that module's docstring.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
