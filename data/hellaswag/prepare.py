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

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hellaswag_val.jsonl")

if os.path.isfile(OUT):
    print(f"{OUT} already exists")
    sys.exit(0)
try:
    with urllib.request.urlopen(URL, timeout=30) as r:
        data = r.read()
except OSError as e:
    print(f"cannot download {URL} ({type(e).__name__}): offline, pass any jsonl in HellaSwag layout (ctx, endings, "
          f"label) to prune.py with --hellaswag path/to/val.jsonl")
    sys.exit(1)
lines = data.decode("utf-8").splitlines()
first = json.loads(lines[0])
assert {"ctx", "endings", "label"} <= set(first), "unexpected layout: the upstream file changed"
tmp = OUT + ".tmp"
with open(tmp, "wb") as f:
    f.write(data)
os.replace(tmp, OUT)   # a killed download never leaves a truncated file behind
print(f"wrote {len(lines)} items to {OUT}")
