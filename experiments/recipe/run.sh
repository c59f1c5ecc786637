#!/usr/bin/env bash
# The recipe arms (experiments/recipe/README.md): Vanilla-16L at the small scale, the study's protocol
# (experiments/study/run.sh: 3000 steps of 32 x 1024 tokens, then fanin.py) with one arm's config on top.
#
#   bash experiments/recipe/run.sh <arm> <data_dir> <dest> <seed> [<seed> ...]
#   TABLE1=<mc.jsonl> bash experiments/recipe/run.sh lr2e-4 ...   # and Table 1, if the decision rule says so
#
# <arm> is a file of experiments/recipe/configs/ (lr2e-4, lr5e-4, warmup1500, lr1e-3, the equalisation's arms; an
# SGD arm's lr is the one the sweep under runs/sgd_sweep picked, `aggregate.py --sgd_args=picked`). The seeds run side by
# side on one GPU (~22 GiB each at this scale); each run lands in <dest>/small_vanilla_16l_<arm>_s<seed>
# (without its checkpoint) and its console output in <dest>/logs/<arm>_s<seed>.txt. With TABLE1 set, and
# when every seed keeps the fan-in's order (rule 1 of the page: rho > 0 with p < 0.05), each seed's
# checkpoint (still in out/) is pruned by every method at k = 1, 2, 4, 6, 8 (prune.py, into <run>/prune).
set -euo pipefail
arm=$1 data=$2 dest=$3
shift 3
here=$(cd "$(dirname "$0")" && pwd)
config=$here/configs/$arm.py
[ -f "$config" ] || { echo "error: no arm $arm: pick one of $(ls "$here/configs" | sed 's/\.py$//' | xargs)" >&2; exit 2; }
sgd=()   # an SGD arm trains at the sweep's pick (rule 6): its peak lr, min lr and weight decay
if grep -q '^optimizer = "sgd"' "$config"; then
    picked=$(python "$here/aggregate.py" --sgd_args=picked) || exit 2
    read -ra sgd <<< "$picked"
fi
mkdir -p "$dest/logs"
for seed in "$@"; do
    TAG=$arm EXITS=0 bash "$here/../study/run.sh" vanilla_16l "$seed" "$data" - "$dest" "$config" "${sgd[@]}" \
        > "$dest/logs/${arm}_s$seed.txt" 2>&1 &
    sleep 20   # staggered, so the compiles do not all start at once
done
wait
[ -n "${TABLE1:-}" ] || exit 0
names=()
for seed in "$@"; do names+=("small_vanilla_16l_${arm}_s$seed"); done
python - "$dest" "${names[@]}" <<'PY' || { echo "rule 1 not met: no Table 1 for $arm"; exit 0; }
import json, os, sys
runs = [json.load(open(os.path.join(sys.argv[1], n, "fanin_summary.json")))["runs"][0] for n in sys.argv[2:]]
print("rho(share, fan-in) per seed:", ", ".join(f"{r['rho_theory']:+.2f} (p {r['p_theory']:.1e})" for r in runs))
sys.exit(not all(r["rho_theory"] > 0 and r["p_theory"] < 0.05 for r in runs))
PY
for name in "${names[@]}"; do
    python prune.py --runs "out/$name" --k 1,2,4,6,8 --methods cfp,similarity,taylor,magnitude,block_influence,sleb \
        --hellaswag "$TABLE1" --calib_batches 32 --out "out/$name/prune" > "$dest/logs/${name}_prune.txt" 2>&1 &
    sleep 5
done
wait
for name in "${names[@]}"; do cp -r "out/$name/prune" "$dest/$name/"; done
