#!/usr/bin/env bash
# Extended Table 1 (docs/pruning.md) on the small study's Vanilla-16L seeds: the paper's four methods and
# Block Influence and SLEB, held-out PPL and the in-house multiple-choice scorer, every pruned model healed
# for HEAL_TOKENS tokens and measured again, the physically pruned models timed with bench.py (on the first
# seed only: speed depends on the architecture, not the seed), then one table over the seeds.
#
#   bash experiments/study/table1_extended.sh <mc.jsonl> <dest> <run dir>...   # runs: out/small_vanilla_16l_s{1,2,3}
#
# Healing runs uncompiled (a compile per pruned shape costs more than it saves over ~150 steps) and its own
# held-out loss on 10 batches only: the table's numbers come from prune.py's evaluation of the healed model.
# One prune.py call per seed, into <run>/prune_extended, skipped when its results.json exists; re-run the
# script after an interruption (a device call's time limit): a seed half-way through heals only the models
# it had not finished (their healed.json, docs/pruning.md: healing). Then prune.py --combine writes <dest>, with
# bench.py's tables in <dest>/speed.
# K (default 2,4,8), HEAL_TOKENS (default 5e6), TASKS=piqa,... and INCLUDE=<folder of lm-eval task YAMLs>
# (lm-eval installed) change it. SPEED=0 times nothing: for a seed pruned while the GPU is busy with other
# work (timings need the GPU to themselves); the combined table takes the speed of the first seed that timed it.
set -euo pipefail
mc=$1 dest=$2
shift 2
parts=() speed=--speed
[ "${SPEED:-1}" = 0 ] && speed=
for run in "$@"; do
    out="$run/prune_extended"
    if [ ! -f "$out/results.json" ]; then
        python prune.py --runs "$run" --k "${K:-2,4,8}" --methods cfp,similarity,taylor,magnitude,block_influence,sleb \
            --hellaswag "$mc" --calib_batches 32 --heal_tokens "${HEAL_TOKENS:-5e6}" \
            --heal_args="--compile=False --eval_iters=10" \
            $speed ${TASKS:+--tasks "$TASKS"} ${INCLUDE:+--include_path "$INCLUDE"} --out "$out"
    fi
    parts+=("$out/results.json")
    speed=
done
python prune.py --combine "${parts[@]}" --out "$dest"
first=$(dirname "${parts[0]}")
if [ -d "$first/speed" ]; then rm -rf "$dest/speed" && cp -r "$first/speed" "$dest/speed"; fi   # bench.py's own tables
