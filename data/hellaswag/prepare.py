"""
Fetch the official HellaSwag validation set (10,042 items) for prune.py's zero-shot evaluation:

    python data/hellaswag/prepare.py        # -> data/hellaswag/hellaswag_val.jsonl

Needs the web. Offline, pass prune.py any jsonl in HellaSwag's layout (one JSON object per line
with ctx: str, endings: [4 str], label: 0..3), e.g. a local copy of a multiple-choice set:
    python prune.py --hellaswag path/to/val.jsonl
"""
import json
import os
import sys
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))   # the repo root
from gfa.cli import ArgumentParser, UserError, cli  # noqa: E402
from gfa.rundir import atomic_write_with  # noqa: E402

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hellaswag_val.jsonl")


def main(argv):
    ap = ArgumentParser(description="Download HellaSwag's validation set for prune.py (needs the web).")
    ap.add_argument("--url", default=URL, help="where to fetch it from")
    ap.add_argument("--out", default=OUT, help="the jsonl to write")
    args = ap.parse_args(argv)
    if os.path.isfile(args.out):
        print(f"{args.out} already exists")
        return
    try:
        with urllib.request.urlopen(args.url, timeout=30) as r:
            data = r.read()
    except OSError as e:
        raise UserError(f"cannot download {args.url} ({type(e).__name__}): offline, pass any jsonl in HellaSwag "
                        f"layout (ctx, endings, label) to prune.py with --hellaswag path/to/val.jsonl") from None
    lines = data.decode("utf-8").splitlines()
    if not lines or not {"ctx", "endings", "label"} <= set(json.loads(lines[0])):
        raise UserError(f"{args.url} does not hold HellaSwag's layout (ctx, endings, label): the upstream file changed")
    atomic_write_with(args.out, lambda f: f.write(data))   # a killed download never leaves a truncated file
    print(f"wrote {len(lines)} items to {args.out}")


if __name__ == "__main__":
    cli(main)
