#!/usr/bin/env bash
# The extended Table 1's pruned shapes (experiments/study/runs/table1_extended) timed again, without their
# checkpoints: speed depends on the shape only, so config/small.py with n_layer = 16, 14, 12, 8 stands in
# for the unpruned model and the physically pruned ones (the same parameter counts). The forward of one
# 1024-token sequence, compiled plainly and under CUDA graphs (prune.py --speed's way on CUDA), each over
# the shapes deepest first and shallowest first: a time that depends on the order measures something else.
#
#   bash experiments/study/retime_pruned.sh <dest> [bench.py options, e.g. --device=cpu --runs=2 --seq=64]
#
# Writes bench.py's JSON and markdown for each (mode, order) and <dest>/retime.md: median ms per shape.
set -euo pipefail
dest=$1
shift
mkdir -p "$dest/configs"
for n in 16 14 12 8; do { cat config/small.py; echo "n_layer = $n"; } > "$dest/configs/small_l$n.py"; done
deep_first=("$dest"/configs/small_l{16,14,12,8}.py)
shallow_first=("$dest"/configs/small_l{8,12,14,16}.py)
for mode in default reduce-overhead; do
    python bench.py "${deep_first[@]}" --mode=inference --seq=1024 --compile=$mode "$@" --out="$dest/${mode}_deep_first.json"
    python bench.py "${shallow_first[@]}" --mode=inference --seq=1024 --compile=$mode "$@" \
        --out="$dest/${mode}_shallow_first.json"
done
python - "$dest" <<'EOF'
import json, os, sys
dest = sys.argv[1]
runs = [(m, o) for m in ("default", "reduce-overhead") for o in ("deep_first", "shallow_first")]
ms = {}
for m, o in runs:
    with open(os.path.join(dest, f"{m}_{o}.json")) as f:
        d = json.load(f)
    for r in d["rows"]:
        ms[(m, o, r["config"])] = (r.get("median_ms"), r.get("iqr_ms"))
lines = [f"Forward of one sequence, median ms (IQR), {d['meta']['device']}, torch {d['meta']['torch']}, "
         f"seq {d['meta']['seq']}, {d['rows'][0]['dtype']}", "",
         "| layers | " + " | ".join(f"{m}, {o.replace('_', ' ')}" for m, o in runs) + " |",
         "|---" * (len(runs) + 1) + "|"]
for n in (16, 14, 12, 8):
    cells = [ms.get((m, o, f"small_l{n}"), (None, None)) for m, o in runs]
    lines.append(f"| {n} | " + " | ".join(f"{a:.3f} ({b:.3f})" if a is not None else "error" for a, b in cells) + " |")
open(os.path.join(dest, "retime.md"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
