"""Every number on docs/RESULTS.md, regenerated from the committed run files (no GPU, about a minute):

    python experiments/regenerate.py            # regenerate into a scratch folder and diff against the committed outputs
    python experiments/regenerate.py --write    # (re)write the committed outputs, experiments/<study>/numbers/<name>.txt
    python experiments/regenerate.py --only study_pooled,recipe    # some of them

Each output is the printed result of one documented command (an aggregator, fanin.py --seeds,
prune.py --combine) run from the repository root over committed runs; figures go to the scratch
folder, so a check rewrites nothing. A difference is printed as a unified diff and the exit status is 1.
The GPU benchmark tables (experiments/bench/) are measurements, not derived numbers: they are not here.
"""
import argparse
import difflib
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
S = "experiments/study/runs"


def seeds(folder, config, n):
    return [f"{folder}/small_{config}_s{s}" for s in range(1, n + 1)]


def fanin_seeds(folder, config, n):
    return ["python", "fanin.py", *seeds(folder, config, n), "--seeds", "--fig_dir", "{scratch}"]


# (study, name, command): the output lands in experiments/<study>/numbers/<name>.txt
OUTPUTS = [
    ("study", "study_pooled", ["python", "experiments/study/aggregate.py"]),
    ("study", "vanilla_16l", fanin_seeds(S, "vanilla_16l", 3)),
    ("study", "layerskip", fanin_seeds(S, "layerskip", 3)),
    ("study", "vanilla_15l", fanin_seeds(S, "vanilla_15l", 3)),
    ("study", "cascade_a2", fanin_seeds(S, "cascade_a2", 3)),
    ("study", "equalize", ["python", "fanin.py", f"{S}/small_equalize_s1", "--baseline", f"{S}/small_vanilla_16l_s1",
                           "--fig_dir", "{scratch}"]),
    ("study", "equalize_s2", ["python", "fanin.py", f"{S}/small_equalize_s2", "--baseline",
                              f"{S}/small_vanilla_16l_s2", "--fig_dir", "{scratch}"]),
    ("study", "virtual_depth", ["python", "fanin.py", f"{S}/small_virtual_depth_s1", "--baseline",
                                f"{S}/small_vanilla_8l_s1", "--fig_dir", "{scratch}"]),
    ("study", "virtual_depth_s2", ["python", "fanin.py", f"{S}/small_virtual_depth_s2", "--baseline",
                                   f"{S}/small_vanilla_8l_s2", "--fig_dir", "{scratch}"]),
    ("study", "mixln", fanin_seeds(S, "vanilla_16l_mixln", 2)),
    ("study", "lns", fanin_seeds(S, "vanilla_16l_lns", 2)),
    ("study", "scaledinit", fanin_seeds(S, "vanilla_16l_scaledinit", 2)),
    ("study", "table1", ["python", "prune.py", "--combine", *[f"{r}/prune/results.json" for r in seeds(S, "vanilla_16l", 3)],
                         "--out", "{scratch}"]),
    ("study", "table1_extended", ["python", "prune.py", "--combine", *[
        f"{S}/table1_extended/small_vanilla_16l_keep_s{s}/prune_extended/results.json" for s in (3, 1, 2)],
        "--out", "{scratch}"]),
    ("recipe", "recipe", ["python", "experiments/recipe/aggregate.py", "--out", "{scratch}"]),
    ("recipe", "table1_lr2e-4", ["python", "prune.py", "--combine", *[
        f"experiments/recipe/runs/small_vanilla_16l_lr2e-4_s{s}/prune/results.json" for s in (1, 2, 3)],
        "--out", "{scratch}"]),
    ("taper", "taper", ["python", "experiments/taper/compare.py", "experiments/taper/runs/small_gfa_s1",
                        "experiments/taper/runs/small_gfa_s2", "experiments/taper/runs/small_gfa_half_s1",
                        "experiments/taper/runs/small_gfa_half_s2", "experiments/taper/runs/small_increasing_s1",
                        "experiments/taper/runs/small_increasing_s2", "experiments/taper/runs/small_linear_s1",
                        "experiments/taper/runs/small_linear_s2", "experiments/taper/runs/small_measured_s1",
                        "experiments/taper/runs/small_measured_s2", "experiments/taper/runs/small_narrow_middle_s1",
                        "experiments/taper/runs/small_narrow_middle_s2", *seeds(S, "vanilla_15l", 3),
                        *seeds(S, "cascade_a2", 3), "--bench", "experiments/taper/bench_bf16.json", "--out", "{scratch}"]),
    ("resnet", "fashion_mnist", ["python", "fanin.py", "experiments/resnet/runs_fashion_mnist", "--fig_dir", "{scratch}"]),
]


def output_path(study, name):
    return os.path.join(ROOT, "experiments", study, "numbers", f"{name}.txt")


def run(command, scratch):
    """The command's printed output, with the scratch folder's path written as <scratch>."""
    cmd = [sys.executable if c == "python" else c.replace("{scratch}", scratch) for c in command]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=os.environ | {"MPLBACKEND": "Agg"})
    if r.returncode != 0:
        raise SystemExit(f"error: `{' '.join(command)}` failed ({r.returncode}): {r.stderr.strip().splitlines()[-1:]}")
    return (r.stdout + r.stderr).replace(scratch, "<scratch>")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--write", action="store_true", help="rewrite the committed outputs instead of checking them")
    p.add_argument("--only", default="", help="comma-separated output names (default: all)")
    args = p.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = set(names) - {n for _, n, _ in OUTPUTS}
    if unknown:
        raise SystemExit(f"error: no output {sorted(unknown)}: pick from {', '.join(n for _, n, _ in OUTPUTS)}")
    failed = 0
    for study, name, command in OUTPUTS:
        if names and name not in names:
            continue
        with tempfile.TemporaryDirectory() as scratch:
            text = run(command, scratch)
        path = output_path(study, name)
        if args.write:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(text)
            print(f"wrote {os.path.relpath(path, ROOT)}")
            continue
        committed = open(path).read() if os.path.isfile(path) else ""
        if text == committed:
            print(f"ok      {os.path.relpath(path, ROOT)}")
        else:
            failed += 1
            print(f"DIFFERS {os.path.relpath(path, ROOT)}")
            sys.stdout.writelines(difflib.unified_diff(committed.splitlines(True), text.splitlines(True),
                                                       "committed", "regenerated", n=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
