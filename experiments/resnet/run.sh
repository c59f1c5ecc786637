#!/usr/bin/env bash
# ResNet-50 on Fashion-MNIST in float32 (the paper's precision; the committed run above is bf16): resnet.py's
# defaults otherwise (Table 5: 30 epochs, batch 512, AdamW 5e-4), the seeds side by side on one GPU, each
# followed by its importance (resnet.py) and fanin.py; then fanin.py over all seeds (mean and spread).
#
#   bash experiments/resnet/run.sh <fashion_mnist idx dir> <dest> <seed> [<seed> ...]
#
# Each run lands in <dest>/fashion_mnist_fp32_s<seed> without its checkpoint (which stays in out/), its
# console output in <dest>/logs/.
set -euo pipefail
data=$1 dest=$2
shift 2
mkdir -p "$dest/logs"
runs=()
for seed in "$@"; do
    name=fashion_mnist_fp32_s$seed
    runs+=("$dest/$name")
    (python resnet.py --dataset=fashion_mnist --data_dir="$data" --dtype=float32 --seed="$seed" \
         --out_dir="out/$name" --overwrite=True \
     && mkdir -p "$dest/$name" \
     && (cd "out/$name" && find . -type f ! -name ckpt.pt -print0 | xargs -0 cp --parents -t "$dest/$name")) \
        > "$dest/logs/$name.txt" 2>&1 &
    sleep 10
done
wait
python fanin.py "${runs[@]}" --seeds --fig_dir "$dest/figs" > "$dest/logs/fanin.txt" 2>&1
