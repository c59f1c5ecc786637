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
TIKTOKEN_CACHE_DIR at a tiktoken cache) or bytes (UTF-8 bytes, vocab 256, byte 0 after each
document). Every k-th document (k = 1/val_fraction, spread evenly) goes to val.bin, the rest
to train.bin, so the split is deterministic and representative.

write_bins() is the one tokenise-and-write routine; data/dolma/prepare.py uses it too.
"""
import argparse
import gzip
import json
import os
import sys
from multiprocessing import Pool

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repo root
from gfa.cli import UserError, cli  # noqa: E402

TOKENIZERS = ("gpt2", "bytes")
_enc = None   # per-process tiktoken encoding


def load_encoding(tokenizer):
    if tokenizer == "bytes":
        return None
    if tokenizer != "gpt2":
        raise UserError(f"tokenizer={tokenizer!r}: use one of {', '.join(TOKENIZERS)}")
    import tiktoken
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:
        raise UserError(f"tiktoken cannot load the gpt2 encoding ({type(e).__name__}); offline, set "
                        f"TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cache, or use --tokenizer bytes") from None


def eot_token(tokenizer):
    return 50256 if tokenizer == "gpt2" else 0


def _init_worker(tokenizer):
    global _enc
    _enc = load_encoding(tokenizer)


def _encode(args):
    """[(text, end_of_document)] -> [uint16 array]: one worker's share of the stream."""
    tokenizer, docs = args
    out = []
    eot = eot_token(tokenizer)
    for text, end in docs:
        if tokenizer == "bytes":
            ids = list(text.encode("utf-8"))
        else:
            ids = _enc.encode_ordinary(text)   # text that spells <|endoftext|> stays ordinary text
        if end:
            ids.append(eot)
        out.append(np.asarray(ids, dtype=np.uint16))
    return out


def _batches(docs, size):
    batch = []
    for d in docs:
        batch.append(d)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def write_bins(docs, out_dir, tokenizer="gpt2", val_fraction=0.0005, max_tokens=None, workers=None,
               batch_docs=256, log_every=10_000_000):
    """Tokenise an iterable of (text, end_of_document) in parallel, in order, and write
    out_dir/train.bin and val.bin (uint16). Stops after max_tokens tokens (a budget, None = all).
    Deterministic: the output depends only on the documents and the arguments."""
    if not 0 < val_fraction < 1:
        raise UserError(f"val_fraction={val_fraction}: must be in (0, 1)")
    load_encoding(tokenizer)   # fail early, in this process, if the tokenizer is unavailable
    workers = workers or os.cpu_count() or 1
    os.makedirs(out_dir, exist_ok=True)
    paths = {s: os.path.join(out_dir, f"{s}.bin") for s in ("train", "val")}
    tmp = {s: f"{p}.tmp{os.getpid()}" for s, p in paths.items()}
    files = {s: open(tmp[s], "wb") for s in tmp}
    counts, n_doc, next_log = {"train": 0, "val": 0}, 0, log_every
    pool, ok = None, False
    try:
        if workers > 1:
            pool = Pool(workers, initializer=_init_worker, initargs=(tokenizer,))
        else:
            _init_worker(tokenizer)
        batches = _batches(docs, batch_docs)
        done = False
        while not done:
            # a bounded window of batches at a time: Pool.imap would pull the whole stream into memory
            window = [(tokenizer, b) for _, b in zip(range(4 * workers), batches)]
            if not window:
                break
            results = pool.map(_encode, window) if pool else [_encode(w) for w in window]
            for arrays in results:
                for ids in arrays:
                    # doc i goes to val when floor((i+1)f) > floor(i f): exactly a fraction f, evenly spread
                    split = "val" if int((n_doc + 1) * val_fraction) > int(n_doc * val_fraction) else "train"
                    ids.tofile(files[split])
                    counts[split] += len(ids)
                    n_doc += 1
                    if max_tokens and counts["train"] + counts["val"] >= max_tokens:
                        done = True
                        break
                if done:
                    break
            total = counts["train"] + counts["val"]
            if total >= next_log:
                print(f"{n_doc:,} documents, {total:,} tokens", flush=True)
                next_log = total + log_every
        ok = True
    finally:
        if pool:
            pool.terminate()
        for f in files.values():
            f.close()
        if not ok:   # a bad input or Ctrl-C mid-stream: leave no half-written temp files behind
            for t in tmp.values():
                os.remove(t)
    for s in ("train", "val"):
        if counts[s] == 0:
            for t in tmp.values():
                os.remove(t)
            raise UserError(f"the {s} split came out empty ({n_doc} documents): give more text or change val_fraction")
    for s in ("train", "val"):
        os.replace(tmp[s], paths[s])
    print(f"wrote {paths['train']} ({counts['train']:,} tokens) and {paths['val']} ({counts['val']:,} tokens) "
          f"from {n_doc:,} documents, tokenizer {tokenizer}")
    return counts


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
    """(text, end_of_document) pairs from local files, in order."""
    for path in paths:
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
            with opener(path, "rt", encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError:
                        raise UserError(f"{path}:{lineno} is not a JSON object per line (jsonl)") from None
                    if not isinstance(obj, dict) or text_key not in obj:
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
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("inputs", nargs="+", help="files or folders")
    ap.add_argument("--out_dir", required=True, help="where train.bin / val.bin go (train.py --data_dir=...)")
    ap.add_argument("--tokenizer", default="gpt2", choices=TOKENIZERS)
    ap.add_argument("--text_key", default="text", help="jsonl field / parquet column holding the text")
    ap.add_argument("--val_fraction", type=float, default=0.01)
    ap.add_argument("--tokens", type=float, default=None, help="token budget (default: everything)")
    ap.add_argument("--workers", type=int, default=None, help="tokeniser processes (default: all cores)")
    args = ap.parse_args(argv)
    docs = iter_documents(expand(args.inputs), args.text_key)
    return write_bins(docs, args.out_dir, args.tokenizer, args.val_fraction,
                      int(args.tokens) if args.tokens else None, args.workers)


if __name__ == "__main__":
    cli(main)
