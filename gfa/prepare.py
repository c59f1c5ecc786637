"""
Tokenising documents into a dataset folder (train.bin / val.bin, uint16 token ids with an EOT
after each document): the one routine the recipes under data/ share (prepare_local.py,
dolma/prepare.py), and the tokenizers by name.

Tokenizers: gpt2 (tiktoken's GPT-2 BPE, EOT 50256; offline, point TIKTOKEN_CACHE_DIR at a
tiktoken cache), bytes (UTF-8 bytes, vocab 256, EOT byte 0), or the folder of an HF model holding
its tokenizer.json (the `tokenizers` package; EOT: the model's eos token; its vocabulary must fit
the uint16 token files), for the data of a model imported with hf.py. Every k-th document
(k = 1/val_fraction, spread evenly) goes to val.bin, the rest to train.bin, so the split is
deterministic and representative. jsonl_rows() reads the jsonl files the recipes and the
multiple-choice evaluation take.
"""
import gzip
import json
import os
from multiprocessing import Pool

import numpy as np

from gfa.cli import UserError
from gfa.data import ID_FILE, TOKEN_FORMAT, data_id
from gfa.rundir import atomic_write_json, remove_stale_temporaries

TOKENIZERS = ("gpt2", "bytes")   # or the folder of an HF model (its tokenizer.json)
_enc, _eot = None, None   # per-process encoding and end-of-text id


def jsonl_rows(path):
    """(line number, object) for each non-blank line of a jsonl file (gzipped when it ends in .gz);
    a line that is not UTF-8 or not a JSON object is a one-line UserError naming file and line."""
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}:{n} is not UTF-8 text (byte {e.start + 1} of the line): save the file "
                                f"as UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                obj = None
            if not isinstance(obj, dict):
                raise UserError(f"{path}:{n} is not a JSON object (jsonl: one object per line)")
            yield n, obj


class HFTokenizer:
    """An HF model's tokenizer.json through the tokenizers package (transformers installs it), with the
    calls this codebase makes of a tiktoken encoding; eot: the model's end-of-sequence id. Special
    tokens spelled out in a text are matched as such (the package has no switch for it)."""

    def __init__(self, folder):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise UserError("an HF tokenizer needs the tokenizers package: pip install -r requirements-hf.txt") \
                from None
        path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(path):
            raise UserError(f"{folder} holds no tokenizer.json: give an HF model's folder, or gpt2 or bytes")
        self.tok = Tokenizer.from_file(path)
        self.eot = self._eos(folder)

    def _eos(self, folder):
        """The eos id: config.json's eos_token_id, else tokenizer_config.json's eos_token."""
        def read(name):
            try:
                with open(os.path.join(folder, name)) as f:
                    return json.load(f)
            except (OSError, ValueError):
                return {}
        eos = read("config.json").get("eos_token_id")
        if eos is None:
            tok = read("tokenizer_config.json").get("eos_token")
            eos = self.tok.token_to_id(tok.get("content") if isinstance(tok, dict) else tok) if tok else None
        if eos is None:
            raise UserError(f"{folder}: no eos token in config.json or tokenizer_config.json (the end-of-text marker "
                            f"between documents)")
        return eos[0] if isinstance(eos, list) else int(eos)

    def encode_ordinary(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode(self, text, allowed_special="all"):
        return self.encode_ordinary(text)

    def decode(self, ids):
        return self.tok.decode(list(ids), skip_special_tokens=False)


def load_encoding(tokenizer):
    if tokenizer == "bytes":
        return None
    if os.path.isdir(tokenizer):
        return HFTokenizer(tokenizer)
    if tokenizer != "gpt2":
        raise UserError(f"tokenizer={tokenizer!r}: use one of {', '.join(TOKENIZERS)}, or the folder of an HF model "
                        f"holding its tokenizer.json")
    import tiktoken
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:
        raise UserError(f"tiktoken cannot load the gpt2 encoding ({type(e).__name__}); offline, set "
                        f"TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cache, or use --tokenizer bytes") from None


def eot_token(tokenizer):
    """The end-of-text id written after each document: GPT-2's <|endoftext|>, byte 0, or an HF model's eos."""
    if tokenizer not in TOKENIZERS:
        return load_encoding(tokenizer).eot
    return 50256 if tokenizer == "gpt2" else 0


def token_dtype_for(tokenizer):
    """uint16 (nanoGPT's token files), or uint32 for an HF tokenizer with more than 65,536 ids (Llama-3)."""
    enc = load_encoding(tokenizer)
    return np.uint32 if isinstance(enc, HFTokenizer) and enc.tok.get_vocab_size() > 1 << 16 else np.uint16


def _init_worker(tokenizer):
    global _enc, _eot, _dtype
    _enc = load_encoding(tokenizer)
    _eot = _enc.eot if isinstance(_enc, HFTokenizer) else eot_token(tokenizer)
    _dtype = token_dtype_for(tokenizer)


def _encode(args):
    """[(text, end_of_document)] -> [uint16 (or uint32) array]: one worker's share of the stream."""
    tokenizer, docs = args
    out = []
    for text, end in docs:
        if tokenizer == "bytes":
            ids = list(text.encode("utf-8"))
        else:
            ids = _enc.encode_ordinary(text)   # text that spells <|endoftext|> stays ordinary text
        if end:
            ids.append(_eot)
        out.append(np.asarray(ids, dtype=_dtype))
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


def _stream(docs, files, tokenizer, val_fraction, max_tokens, workers, batch_docs, log_every):
    """Tokenise the documents in order (in parallel) into the open train/val files; returns
    (tokens per split, documents, the last training document's ids)."""
    counts, n_doc, next_log, last_train = {"train": 0, "val": 0}, 0, log_every, None
    pool = Pool(workers, initializer=_init_worker, initargs=(tokenizer,)) if workers > 1 else None
    if pool is None:
        _init_worker(tokenizer)
    try:
        batches = _batches(docs, batch_docs)
        while True:
            # a bounded window of batches at a time: Pool.imap would pull the whole stream into memory
            window = [(tokenizer, b) for _, b in zip(range(4 * workers), batches)]
            if not window:
                break
            results = pool.map(_encode, window) if pool else [_encode(w) for w in window]
            for ids in (ids for arrays in results for ids in arrays):
                # doc i goes to val when floor((i+1)f) > floor(i f): exactly a fraction f, evenly spread
                split = "val" if int((n_doc + 1) * val_fraction) > int(n_doc * val_fraction) else "train"
                ids.tofile(files[split])
                counts[split] += len(ids)
                n_doc += 1
                last_train = ids if split == "train" else last_train
                if max_tokens and counts["train"] + counts["val"] >= max_tokens:
                    return counts, n_doc, last_train
            total = counts["train"] + counts["val"]
            if total >= next_log:
                print(f"{n_doc:,} documents, {total:,} tokens", flush=True)
                next_log = total + log_every
        return counts, n_doc, last_train
    finally:
        if pool:
            pool.terminate()


def _val_from_the_end(tmp, counts, last, n_doc, val_fraction):
    """Too few documents for val_fraction to pick one: val gets the last document (several), or the
    end of the only one: val_fraction of its tokens, at least a tenth up to 64 Ki tokens."""
    n = len(last) if counts["train"] > len(last) else max(int(val_fraction * len(last)),
                                                           min(len(last) // 10, 1 << 16), 1)
    with open(tmp["train"], "r+b") as f:
        f.truncate(2 * (counts["train"] - n))
    last[-n:].tofile(tmp["val"])
    what = "the last one" if n == len(last) else f"its last {n:,} tokens"
    print(f"note: {n_doc} document(s) are too few for val_fraction={val_fraction}: {what} went to val")
    return {"train": counts["train"] - n, "val": n}


def write_bins(docs, out_dir, tokenizer="gpt2", val_fraction=0.0005, max_tokens=None, workers=None,
               batch_docs=256, log_every=10_000_000):
    """Tokenise an iterable of (text, end_of_document) in parallel, in order, and write
    out_dir/train.bin and val.bin (uint16; uint32 with a tokens.json beside them for an HF tokenizer of
    more than 65,536 ids). Stops after max_tokens tokens (a budget, None = all).
    Deterministic: the output depends only on the documents and the arguments. An input too small
    for val_fraction to pick a document gives val its last document, or the end of its only one
    (with a note)."""
    if not 0 < val_fraction < 1:
        raise UserError(f"val_fraction={val_fraction}: must be in (0, 1)")
    if max_tokens is not None and max_tokens < 1:
        raise UserError(f"max_tokens={max_tokens}: a token budget must be >= 1 (or leave it out: everything)")
    if workers is not None and workers < 1:
        raise UserError(f"workers={workers}: must be >= 1 (or leave it out: all cores)")
    load_encoding(tokenizer)   # fail early, in this process, if the tokenizer is unavailable
    paths = {s: os.path.join(out_dir, f"{s}.bin") for s in ("train", "val")}
    tmp = {s: f"{p}.tmp{os.getpid()}" for s, p in paths.items()}
    created, ok = not os.path.exists(out_dir), False
    try:
        os.makedirs(out_dir, exist_ok=True)
        for p in paths.values():
            remove_stale_temporaries(p)   # of a killed earlier run
        with open(tmp["train"], "wb") as ftrain, open(tmp["val"], "wb") as fval:
            counts, n_doc, last = _stream(docs, {"train": ftrain, "val": fval}, tokenizer, val_fraction, max_tokens,
                                          workers or os.cpu_count() or 1, batch_docs, log_every)
        if counts["val"] == 0 and last is not None and len(last) >= 2:
            counts = _val_from_the_end(tmp, counts, last, n_doc, val_fraction)
        for s in ("train", "val"):
            if counts[s] == 0:
                raise UserError(f"the {s} split came out empty ({n_doc} documents): give more text")
        fmt = os.path.join(out_dir, TOKEN_FORMAT)
        if token_dtype_for(tokenizer) == np.uint32:   # written first: bins are never read with the wrong dtype
            with open(fmt, "w") as f:
                json.dump({"dtype": "uint32"}, f)
        elif os.path.isfile(fmt):
            os.remove(fmt)
        for s in ("train", "val"):
            os.replace(tmp[s], paths[s])
        atomic_write_json(data_id(out_dir) | {"tokenizer": tokenizer}, os.path.join(out_dir, ID_FILE), indent=1)
        ok = True
    except OSError as e:
        raise UserError(f"cannot write {out_dir}: {e.strerror or e} (a full disk, or a read-only folder?)") from None
    finally:
        if not ok:   # a bad input, a full disk or Ctrl-C mid-stream: leave no half-written temp files behind
            for t in tmp.values():
                if os.path.exists(t):
                    os.remove(t)
            if created and os.path.isdir(out_dir) and not os.listdir(out_dir):
                os.rmdir(out_dir)
    print(f"wrote {paths['train']} ({counts['train']:,} tokens) and {paths['val']} ({counts['val']:,} tokens) "
          f"from {n_doc:,} documents, tokenizer {tokenizer}")
    return counts
