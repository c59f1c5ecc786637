"""
Tokenise local text / jsonl / parquet files into nanoGPT-style uint16 train.bin / val.bin.

    python data/prepare_local.py --out_dir data/mycorpus corpus/*.jsonl.gz more_text.txt
    python train.py config/small.py config/vanilla_16l.py --dataset=mycorpus   # or --data_dir=/path/to/dir

Inputs (files or folders, searched recursively, in sorted order):
  .txt / .md          plain text; cut into ~64 KiB pieces at line breaks, which only matter for
                      the train/val split (no EOT inside a file)
  .jsonl / .json      one JSON object per line, text in --text_key (Dolma's own files: .json.gz)
  .parquet            column --text_key (needs pyarrow, which `datasets` installs)
  any of them .gz     decompressed on the fly
Tokenizers: gpt2 (tiktoken's GPT-2 BPE, EOT 50256 after each document; offline, point
TIKTOKEN_CACHE_DIR at a tiktoken cache), bytes (UTF-8 bytes, vocab 256, byte 0 after each
document), or an HF model's folder (its tokenizer.json, its eos token after each document: the
data of a model imported with hf.py; needs the tokenizers package). Every k-th document
(k = 1/val_fraction, spread evenly) goes to val.bin, the rest to train.bin, so the split is
deterministic and representative.

The tokenise-and-write routine is gfa/prepare.py's write_bins(); data/dolma/prepare.py uses it too.
"""
import gzip
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repo root
from gfa.cli import ArgumentParser, UserError, cli  # noqa: E402
from gfa.prepare import TOKENIZERS, jsonl_rows, write_bins  # noqa: E402

# ---- local files ------------------------------------------------------------------------------
EXTS = (".txt", ".md", ".jsonl", ".json", ".parquet")


def expand(inputs):
    out = []
    for p in inputs:
        if os.path.isdir(p):
            for root, _, names in sorted(os.walk(p)):
                out += [os.path.join(root, n) for n in sorted(names) if n.removesuffix(".gz").endswith(EXTS)]
        elif os.path.isfile(p):
            out.append(p)
        else:
            raise UserError(f"input {p} does not exist")
    if not out:
        raise UserError(f"no {'/'.join(EXTS)} files found in {' '.join(inputs)}")
    return out


def iter_documents(paths, text_key="text", chunk_chars=1 << 16):
    """(text, end_of_document) pairs from local files, in order; a file that cannot be read (not
    gzip, not UTF-8, unreadable) is a one-line error naming it."""
    for path in paths:
        try:
            yield from _documents_of(path, text_key, chunk_chars)
        except (OSError, EOFError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read {path}: {type(e).__name__}: {e}") from None


def _documents_of(path, text_key, chunk_chars):
    kind = path.removesuffix(".gz")
    opener = gzip.open if path.endswith(".gz") else open
    if kind.endswith(".parquet"):
        import pyarrow.parquet as pq
        pf = pq.ParquetFile(path)
        if text_key not in pf.schema_arrow.names:
            raise UserError(f"{path} has no column '{text_key}' (columns: {pf.schema_arrow.names}); use --text_key")
        for batch in pf.iter_batches(columns=[text_key]):
            for text in batch.column(0).to_pylist():
                yield text or "", True
    elif kind.endswith((".jsonl", ".json")):
        for lineno, obj in jsonl_rows(path):
            if text_key not in obj:
                raise UserError(f"{path}:{lineno} has no field '{text_key}'; use --text_key")
            text = obj[text_key]
            if text is None:         # null: an empty document, as in the parquet path
                text = ""
            if not isinstance(text, str):
                raise UserError(f"{path}:{lineno}: field '{text_key}' is a {type(text).__name__}, not text")
            yield text, True
    elif kind.endswith((".txt", ".md")):
        with opener(path, "rt", encoding="utf-8") as f:
            text = f.read()
        start = 0
        while start < len(text):   # ~chunk_chars pieces cut at a line break
            end = text.find("\n", start + chunk_chars)
            end = len(text) if end < 0 else end + 1
            yield text[start:end], end == len(text)
            start = end
    else:
        raise UserError(f"{path}: unsupported file type (use {', '.join(EXTS)}, optionally .gz)")


def main(argv=None):
    ap = ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("inputs", nargs="+", help="files or folders")
    ap.add_argument("--out_dir", required=True, help="where train.bin / val.bin go (train.py --data_dir=...)")
    ap.add_argument("--tokenizer", default="gpt2", help=f"{' or '.join(TOKENIZERS)} (tiktoken's GPT-2 BPE, UTF-8 "
                    f"bytes), or the folder of an HF model holding its tokenizer.json (an imported model's data)")
    ap.add_argument("--text_key", default="text", help="jsonl field / parquet column holding the text")
    ap.add_argument("--val_fraction", type=float, default=0.01, help="share of documents held out in val.bin")
    ap.add_argument("--tokens", type=float, default=None, help="token budget (default: everything)")
    ap.add_argument("--workers", type=int, default=None, help="tokeniser processes (default: all cores)")
    args = ap.parse_args(argv)
    docs = iter_documents(expand(args.inputs), args.text_key)
    return write_bins(docs, args.out_dir, args.tokenizer, args.val_fraction,
                      int(args.tokens) if args.tokens else None, args.workers)


if __name__ == "__main__":
    cli(main)
