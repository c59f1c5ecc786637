#!/usr/bin/env bash
# The SGD learning-rate sweep of the equalisation (README.md, rule 6): Vanilla-16L, the study's protocol with
# SGD (momentum 0.9, configs/sgd.py) instead of AdamW, trained for the first 500 steps of the full 3000-step
# schedule at each peak lr (min lr = peak / 100; torch's coupled weight decay 2e-5 / peak: the per-step shrink
# AdamW's wd 0.1 gives at lr 2e-4; `aggregate.py --sgd_args=<lr>`). The peak with the lowest held-out loss at
# step 500 is the SGD arms' lr (`aggregate.py --sgd_args=picked`, once rule 6 has picked one).
#
#   bash experiments/recipe/sgd_sweep.sh <data_dir> <dest> [<lr> ...]     # default: 0.01 0.03 0.1 0.3 1
#
# The lrs run side by side on one GPU (~22 GiB each); each lands in <dest>/small_vanilla_16l_sgd_lr<lr>_s1
# (train.py's log, dump and provenance, no checkpoint) and its console output in <dest>/logs/.
set -euo pipefail
data=$1 dest=$2
shift 2
lrs=${*:-0.01 0.03 0.1 0.3 1}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$dest/logs"
for lr in $lrs; do
    args=$(python "$here/aggregate.py" --sgd_args="$lr")
    # shellcheck disable=SC2086   # $args is three --key=value words
    STOP_AT=500 TAG=sgd_lr$lr EXITS=0 bash "$here/../study/run.sh" vanilla_16l 1 "$data" - "$dest" \
        "$here/configs/sgd.py" $args > "$dest/logs/sgd_lr${lr}_s1.txt" 2>&1 &
    sleep 20
done
wait
