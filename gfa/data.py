"""
Token data: nanoGPT-style uint16 files, the training batch of (seed, step), the fixed held-out windows.

A dataset is a folder holding train.bin and val.bin (uint16 token ids, EOT between documents):
`dataset=NAME` is this repository's data/NAME/, `data_dir=PATH` any folder. The recipes that
make them are under data/ (docs/data.md). A dataset's content id (content_id: each file's size and a
hash of evenly spaced blocks, milliseconds for any size) is what a run's identity records of its
data (gfa/rundir.py); gfa/prepare.py also writes it into the folder's data_id.json when it makes one.
"""
import hashlib
import importlib.util
import json
import os

import numpy as np
import torch

from gfa.cli import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "data")
BUILTIN = ("shakespeare",)   # prepared on first use: its text is committed, so a fresh clone trains offline


def dataset_dir(dataset, data_dir=""):
    """The folder of a dataset: data_dir if given, else data/<dataset> of this repository (found from
    this file, so scripts work from any directory)."""
    return data_dir or os.path.join(DATA, str(dataset or ""))


def run_dataset_dir(train_config, data=None):
    """The dataset folder of a run: data (a dataset name or a folder) if given, else the one the run's
    training config names; None when neither names one."""
    if data:
        return data if os.path.isdir(data) else dataset_dir(data)
    tc = train_config or {}
    return dataset_dir(tc.get("dataset"), tc.get("data_dir")) if tc.get("data_dir") or tc.get("dataset") else None


def prepare_builtin(dataset, data_dir=""):
    """Make data/<dataset>/{train,val}.bin for a built-in dataset when they are missing."""
    folder = dataset_dir(dataset, data_dir)
    if data_dir or dataset not in BUILTIN or all(os.path.isfile(os.path.join(folder, f"{s}.bin"))
                                                 for s in ("train", "val")):
        return
    spec = importlib.util.spec_from_file_location(f"{dataset}_prepare", os.path.join(folder, "prepare.py"))
    prep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prep)
    prep.prepare(folder)


FULL_CHECK_TOKENS = 1 << 28   # token files up to this size have every id checked; larger ones evenly spaced blocks
ID_FILE = "data_id.json"   # gfa/prepare.py's record of the content id of the files it wrote
TOKEN_FORMAT = "tokens.json"   # beside train.bin / val.bin when their ids are uint32 (a vocabulary over 65,536)


def token_dtype(folder):
    """The dtype of a dataset folder's token files: uint16 (nanoGPT's), or what its tokens.json names (uint32:
    the data of a model whose vocabulary does not fit 16 bits, e.g. Llama-3's 128,256 ids)."""
    path = os.path.join(folder, TOKEN_FORMAT)
    if not os.path.isfile(path):
        return np.uint16
    try:
        with open(path) as f:
            name = json.load(f)["dtype"]
        assert name in ("uint16", "uint32")
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        raise UserError(f"{path} must be a JSON object with dtype 'uint16' or 'uint32' (data/prepare_local.py "
                        f"writes it)") from None
    return np.dtype(name).type


def load_tokens(path, vocab_size=None):
    """A token file (uint16, or the dtype its folder's tokens.json names) as a read-only memmap, checked where
    it enters: a whole number of ids (a byte count that is not is an interrupted copy), every id below the
    vocabulary (files above FULL_CHECK_TOKENS: 64 evenly spaced blocks of 1M ids, so a start stays seconds)."""
    if not os.path.isfile(path):
        raise UserError(f"data file {path} does not exist (run the dataset's prepare.py first, see docs/data.md)")
    size = os.path.getsize(path)
    if size < 4:
        raise UserError(f"data file {path} is empty")
    dtype = token_dtype(os.path.dirname(os.path.abspath(path)))
    if size % np.dtype(dtype).itemsize:
        raise UserError(f"data file {path} has {size:,} bytes, not a whole number of {np.dtype(dtype).name} token "
                        f"ids (an interrupted copy or write?): copy it again, or run the dataset's prepare.py again")
    data = np.memmap(path, dtype=dtype, mode="r")
    if vocab_size is not None:
        if len(data) <= FULL_CHECK_TOKENS:
            top = int(data.max())
        else:
            block = 1 << 20
            top = max(int(data[o:o + block].max()) for o in np.linspace(0, len(data) - block, 64).astype(np.int64))
        if top >= vocab_size:
            raise UserError(f"{path} holds token id {top} but the model's vocab_size is {vocab_size}: "
                            f"raise vocab_size or use the matching dataset")
    return data


def content_id(path, blocks=16, block=1 << 16):
    """'<bytes>:<hash>' of a file: its size and a blake2b hash of `blocks` evenly spaced blocks (the
    whole file when it is small). Cheap for any size; a regenerated or truncated file gets another id."""
    size = os.path.getsize(path)
    h = hashlib.blake2b(digest_size=8)
    with open(path, "rb") as f:
        if size <= blocks * block:
            h.update(f.read())
        else:
            for offset in np.linspace(0, size - block, blocks).astype(np.int64):
                f.seek(int(offset))
                h.update(f.read(block))
    return f"{size}:{h.hexdigest()}"


def data_id(folder):
    """{'train.bin': content_id, 'val.bin': content_id} of a dataset folder (the files it has), or
    None when it has neither (a folder that is gone: the run's data is unknown)."""
    if not folder:
        return None
    out = {f"{s}.bin": content_id(os.path.join(folder, f"{s}.bin")) for s in ("train", "val")
           if os.path.isfile(os.path.join(folder, f"{s}.bin"))}
    return out or None


def load_split(dataset, data_dir, split, vocab_size=None):
    """train.bin or val.bin of a dataset (see dataset_dir)."""
    return load_tokens(os.path.join(dataset_dir(dataset, data_dir), f"{split}.bin"), vocab_size)


def _windows_to_tensors(data, offsets, block_size):
    xy = torch.from_numpy(np.stack([np.asarray(data[o:o + block_size + 1], dtype=np.int64) for o in offsets]))
    return xy[:, :-1], xy[:, 1:]


def get_batch(data, batch_size, block_size, step, seed, rows=slice(None)):
    """The global training batch of (seed, step): random windows, identical on every call, so
    resume is exact. rows: the rows this DDP rank reads (the rest are never read), so any world
    size trains on the same global batch. Returns CPU int64 (x, y)."""
    if len(data) <= block_size + 1:
        raise UserError(f"dataset has {len(data)} tokens, fewer than block_size+1={block_size + 1}")
    rng = np.random.default_rng([seed, step, 0])   # the trailing 0 keeps the batches of the runs in docs/
    offsets = rng.integers(0, len(data) - block_size - 1, size=batch_size)
    return _windows_to_tensors(data, offsets[rows], block_size)


def eval_batches(data, block_size, batch_size, n_batches):
    """A fixed held-out token set: n_batches*batch_size evenly spaced windows (no randomness),
    so every run, script and call scores exactly the same tokens."""
    n = batch_size * n_batches
    span = len(data) - block_size - 1
    if span < 0:
        raise UserError(f"held-out data has {len(data)} tokens, fewer than block_size+1={block_size + 1}")
    offsets = np.linspace(0, span, n).astype(np.int64)
    for b in range(n_batches):
        yield _windows_to_tensors(data, offsets[b * batch_size:(b + 1) * batch_size], block_size)
