#!/usr/bin/env bash
# One run of the small study (docs/RESULTS.md): train, analyse, keep everything but the checkpoint.
#
#   bash experiments/study/run.sh <variant> <seed> <data_dir> <mc.jsonl> <dest> [--key=value ...]
#
# trains config/small.py config/<variant>.py for 3000 steps of 32 x 1024 tokens (98.3M tokens, ~4.1
# passes over the 24M-token minipile corpus, docs/data.md), then fanin.py (share vs theory and
# importance; with --baseline=<run> for an intervention) and, for vanilla_16l, prune.py (Table 1 for
# this seed, combined over seeds later with prune.py --combine); for vanilla_16l and layerskip also the
# early-exit curve (prune.py --exits, into <run>/exits; EXITS=0 skips it, ~40 s of an H200). Extra --key=value
# go to train.py.
# FANIN_BASELINE=<run dir> adds fanin.py --baseline. TAG=<name> names a run of the variant with other
# switches (small_<variant>_<name>_s<seed>; Table 1 is then skipped). <variant> may also be a path to a
# config file (a taper.py output: its file name names the run). Copies the run directory without ckpt.pt to
# <dest>/small_<variant>[_<tag>]_s<seed>.
# A run longer than one sitting (LayerSkip: ~17 min on an H200) in parts: STOP_AT=<step> trains to that step,
# STOP_AFTER=<minutes> until that much time has passed (train.py --stop_after_min), checkpoints and stops
# (no analysis until the last step is trained; what it has so far is copied to <dest>); a later call with
# RESUME=1, the run's checkpoint still in out/, resumes it (init_from=resume instead of a fresh start) and
# goes on to the analysis once it is done.
# The checkpoint stays in out/<run> (prune.py's extended table, early exit and bench.py read it there).
set -euo pipefail
variant=$1 seed=$2 data=$3 mc=$4
dest=$(mkdir -p "$5" && cd "$5" && pwd)
shift 5
file=config/${variant}.py
case $variant in *.py) file=$variant variant=$(basename "$variant" .py) ;; esac
name=small_${variant}${TAG:+_$TAG}_s${seed}
run=out/$name
start=--overwrite=True
[ -n "${RESUME:-}" ] && start=--init_from=resume
python train.py config/small.py "$file" --data_dir="$data" --seed="$seed" --out_dir="$run" \
    --max_iters=3000 --warmup_iters=200 --eval_interval=1000 --log_interval=100 $start \
    ${STOP_AT:+--stop_iter=$STOP_AT} ${STOP_AFTER:+--stop_after_min=$STOP_AFTER} "$@"
copy_out() { mkdir -p "$dest/$name" && (cd "$run" && find . -type f ! -name ckpt.pt -print0 | xargs -0 cp --parents -t "$dest/$name"); }
python -c "import sys; from gfa import rundir; c = rundir.read_checkpoint(sys.argv[1])
sys.exit(c['iter_num'] < c['train_config']['max_iters'])" "$run" || { copy_out; echo "stopped before the last step (no analysis): RESUME=1 goes on from there"; exit 0; }
python fanin.py "$run" ${FANIN_BASELINE:+--baseline "$FANIN_BASELINE"}
if [ "$variant" = vanilla_16l ] && [ -z "${TAG:-}" ]; then
    python prune.py --runs "$run" --k 1,2,4,6,8 --hellaswag "$mc" --calib_batches 32 --out "$run/prune"
fi
if { [ "$variant" = vanilla_16l ] || [ "$variant" = layerskip ]; } && [ "${EXITS:-1}" != 0 ]; then   # docs/pruning.md: early exit
    python prune.py --runs "$run" --exits --hellaswag "$mc" --out "$run/exits"
fi
copy_out
