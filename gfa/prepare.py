"""
Tokenising documents into a dataset folder (train.bin / val.bin, uint16 token ids with an EOT
after each document): the one routine the recipes under data/ share (prepare_local.py,
dolma/prepare.py), and the tokenizers by name.

Tokenizers: gpt2 (tiktoken's GPT-2 BPE, EOT 50256; offline, point TIKTOKEN_CACHE_DIR at a
tiktoken cache) or bytes (UTF-8 bytes, vocab 256, EOT byte 0). Every k-th document
(k = 1/val_fraction, spread evenly) goes to val.bin, the rest to train.bin, so the split is
deterministic and representative.
"""
import os
from multiprocessing import Pool

import numpy as np

from gfa.cli import UserError

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
