#!/usr/bin/env bash
# The recipe arms (experiments/recipe/README.md): Vanilla-16L at the small scale, the study's protocol
# (docs/runs/study.sh: 3000 steps of 32 x 1024 tokens, then fanin.py) with one arm's config on top.
#
#   bash experiments/recipe/run.sh <arm> <data_dir> <dest> <seed> [<seed> ...]
#
# <arm> is a file of experiments/recipe/configs/ (lr2e-4, lr5e-4, warmup1500, lr1e-3). The seeds run side by
# side on one GPU (~22 GiB each at this scale); each run lands in <dest>/small_vanilla_16l_<arm>_s<seed>
# (without its checkpoint) and its console output in <dest>/logs/<arm>_s<seed>.txt.
set -euo pipefail
arm=$1 data=$2 dest=$3
shift 3
here=$(cd "$(dirname "$0")" && pwd)
config=$here/configs/$arm.py
[ -f "$config" ] || { echo "error: no arm $arm: pick one of $(ls "$here/configs" | sed 's/\.py$//' | xargs)" >&2; exit 2; }
mkdir -p "$dest/logs"
for seed in "$@"; do
    TAG=$arm EXITS=0 bash "$here/../../docs/runs/study.sh" vanilla_16l "$seed" "$data" - "$dest" "$config" \
        > "$dest/logs/${arm}_s$seed.txt" 2>&1 &
    sleep 20   # staggered, so the compiles do not all start at once
done
wait
