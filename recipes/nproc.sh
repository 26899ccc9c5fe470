#!/usr/bin/env bash
# The quick preset on 1 process and on 2 ranks (`--nproc 2`), then what must agree: the README's
# "Several processes" table. Compares the datastore arrays byte for byte and the target shards,
# prints both runs' per-stage seconds, perplexities and peak RSS (GNU time).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
PY=${PY:-.venv/bin/python}
ONE=${ONE:-runs/quick_1proc} TWO=${TWO:-runs/quick_2ranks}
/usr/bin/time -v "$PY" -m mlpmemory run --run-dir "$ONE" 2> "$ONE.time.log"
/usr/bin/time -v "$PY" -m mlpmemory run --run-dir "$TWO" --nproc 2 2> "$TWO.time.log"
for f in datastore/keys.f16 datastore/values.i32 tune/keys.f16 eval_test/lm_logprob.f32; do
  cmp -s "$ONE/$f" "$TWO/$f" && echo "identical $f" || echo "DIFFERENT $f"
done
"$PY" - "$ONE" "$TWO" <<'PY'
import json, sys
import numpy as np
one, two = sys.argv[1:]
for r in (one, two):
    t, res = json.load(open(f"{r}/timings.json")), json.load(open(f"{r}/results.json"))
    print(r, "seconds", t, "ppl", res["ppl"])
rows = same = 0
for s in range(json.load(open(f"{one}/targets/manifest.json"))["n_shards"]):
    a, b = (np.load(f"{r}/targets/shard_{s:05d}/offsets.npy") for r in (one, two))
    ta, tb = (np.load(f"{r}/targets/shard_{s:05d}/token_ids.npy") for r in (one, two))
    for i in range(len(a) - 1):
        rows += 1
        same += set(ta[a[i]:a[i + 1]]) == set(tb[b[i]:b[i + 1]])
print(f"targets: {same} of {rows} rows with the same support")
PY
grep -hE "Elapsed|Maximum resident" "$ONE.time.log" "$TWO.time.log"
