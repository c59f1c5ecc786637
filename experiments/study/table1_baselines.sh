#!/usr/bin/env bash
# Table 1 in the field's form (docs/pruning.md): the small study's Vanilla-16L seeds pruned by every
# method of gfa/pruning.py's registry at 25 % and 50 % of the layers (k = 4, 8 of 16), each pruned model
# healed three ways (full, partial, LoRA; 2M tokens each), the pruned models timed; one folder per seed,
# the seeds side by side, combined afterwards:
#
#   bash experiments/study/table1_baselines.sh <data_dir> <mc.jsonl> <dest> <seed> [<seed> ...]
#   python prune.py --combine <dest>/table1_baselines_s{1,2,3}/results.json --out <dest>/table1_baselines
#
# A seed's checkpoint is read from out/small_vanilla_16l_s<seed> (experiments/study/run.sh leaves it there); a seed
# without one is trained first, exactly as the study trained it (3000 steps of 32 x 1024 tokens). A call
# stopped part-way goes on where it stopped (prune.py reuses every healed.json). SCALE=<config file> and
# TRAIN_ARGS / PRUNE_ARGS (extra --key=value words) change the setup, e.g. for a smoke test on the embedded
# Shakespeare: SCALE=config/tiny.py TRAIN_ARGS="--max_iters=200" PRUNE_ARGS="--heal_tokens=1e5".
# One seed per call trains it alone, then heals HEAL_JOBS=3 pruned models at once (8 sequences per micro-step
# each); so the seeds can run in separate sittings, each on a fresh machine, and combine afterwards.
set -euo pipefail
data=$1 mc=$2 dest=$3
shift 3
scale=${SCALE:-config/small.py}
heal_jobs=${HEAL_JOBS:-$(( $# == 1 ? 3 : 1 ))}   # heals at once per seed: one seed alone fills the GPU with three
methods=cfp,similarity,taylor,magnitude,block_influence,sleb,reverse,replaceme,early_grad,cfp_calib
prune_seed() {   # prune.py on one seed's run; extra words (--speed) after the table's settings
    local seed=$1
    shift
    python prune.py --runs "out/$(basename "$scale" .py)_vanilla_16l_s$seed" --k 4,8 --methods "$methods" \
        --hellaswag "$mc" --calib_batches 32 --early_steps 8 --heal_tokens 2e6 --heal_mode full,partial,lora \
        --heal_last_layers 3 --heal_lora_rank 8 --heal_jobs "$heal_jobs" --heal_args="--compile=False --micro_batch=8" \
        --out "$dest/table1_baselines_s$seed" "$@" ${PRUNE_ARGS:-}
}
one_seed() {
    local seed=$1 run
    run=out/$(basename "$scale" .py)_vanilla_16l_s$seed
    if [ ! -f "$run/ckpt.pt" ]; then
        python train.py "$scale" config/vanilla_16l.py --data_dir="$data" --seed="$seed" --out_dir="$run" \
            --max_iters=3000 --warmup_iters=200 --eval_interval=1000 --log_interval=100 --overwrite=True ${TRAIN_ARGS:-}
    fi
    prune_seed "$seed"
}
# the seeds side by side (one GPU holds three small runs), each one's console output in <dest>/logs/; then,
# one seed at a time so that nothing else shares the GPU, the pruned models' speed (the heals are reused)
mkdir -p "$dest/logs"
pids=()
for seed in "$@"; do
    one_seed "$seed" > "$dest/logs/table1_baselines_s$seed.txt" 2>&1 &
    pids+=($!)
    sleep 20
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
[ $status = 0 ] || { echo "a seed failed: see $dest/logs/" >&2; exit 1; }
for seed in "$@"; do
    prune_seed "$seed" --speed >> "$dest/logs/table1_baselines_s$seed.txt" 2>&1
done
