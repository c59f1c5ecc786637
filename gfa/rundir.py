"""
The run directory: one folder per run, read and written only through this module.

    <run>/model_config.json   {"kind": "gpt" | "resnet", "config": {...}}: the architecture, the
                              one record of it (GPTConfig fields, or resnet.py's ResNet50 arguments);
                              written when a run starts (start_run), so a run can be analysed
                              before its first checkpoint
    <run>/ckpt.pt             {"kind", "model" (state dict), "train_config" (the script's settings,
                              no model keys), "iter_num" (optimizer steps taken), "save_id" (new at
                              every save: what caches of results are keyed on), "optimizer" (training
                              checkpoints; a pruned model has none), "grad_dump"
                              (GradNormDump.state_dict(), for exact resume), plus the script's own
                              extras: best_val_loss and equalize_clip (train.py), best_val_acc and rng (resnet.py),
                              pruned_from (prune.py --save_pruned), imported_from (hf.py import: the
                              HF folder and its config.json)}. A sharded checkpoint (train.py
                              parallel='fsdp') holds "sharded" (a folder name) instead of "model" and
                              "optimizer": they are in that folder of ckpt_sharded/
    <run>/ckpt_sharded/<id>/  torch.distributed.checkpoint's files: every rank's shards of "model" and
                              "optimizer" (write_shards); ckpt.pt names the current folder, older ones
                              are removed once a newer ckpt.pt is written (so a kill mid-save keeps
                              the previous checkpoint), and model_state() reads the whole model from it
    <run>/grad_norms.npz      the gradient-norm dump (GradNormDump below). Training writes float32
                              norms; for committing a run, `python -m gfa.rundir compact FOLDER...`
                              rewrites them as float16, LZMA-compressed (compact_grad_dump: about 70 % smaller;
                              a dump float16 cannot hold within 2^-10 stays float32). read_grad_dump
                              reads both
    <run>/importance.json     per-layer functional importance: fanin.py (LMs: ppl_increase, with
                              the settings and the checkpoint's save_id it was measured with) or
                              resnet.py (top1_drop, with that save_id too)
    <run>/log.txt             the training log
    <run>/identity.json       what makes two runs "the same experiment" (run_identity): kind, architecture,
                              recipe (every training setting but the seed and BOOKKEEPING), seed, and the
                              data's content id (gfa.data.data_id); written at start and at every resume.
                              Runs without one (earlier versions) get theirs derived from what they have
                              (read_identity); check_poolable() refuses to pool runs that differ in anything
                              but the seed, or the same run twice
    <run>/.lock               while a script writes the run (RunStart): the pid, host and command line of
                              the one writer, under an exclusive flock; removed when it ends
    <run>/provenance.json     {"invocations": [...]}: every script call that started or resumed the
                              run, with the code's git commit (and whether the tree was dirty), the
                              full command line, the time and the host (record_invocation)
    <run>/healed.json         in a run that healed a pruned model (prune.py --heal_tokens): what was
                              healed and measured how ("stamp": the source checkpoint's save_id, the
                              removed layers, train.py's arguments, the measurement's settings) and
                              the measurement ("metrics"); a later prune.py call with the same stamp
                              reuses it instead of healing again
    fanin.py also writes fanin_summary.json and its figures there, prune.py a prune/ folder.

Every write of these files is atomic (a temporary file, then a rename; log.txt is appended line
by line): a kill mid-write leaves the previous file intact, a failed write leaves no temporary
file, and an OSError (a full disk) is a one-line error. Every checkpoint read (read_gpt) or written
(save_checkpoint) passes the weights guard (gfa.training.check_state: no NaN, inf or exploded weight).
One process writes a run at a time (RunStart's lock), and a start that fails leaves the folder as it was. A new run never starts in a folder that holds another run's checkpoint or dump
(start_run), so the files of a run always belong together. The Eq. 2 share is never stored:
read_grad_dump() derives it from the stored norms, over the step range it reports (for a
checkpointed run, the steps its weights have seen). Runs of earlier versions (the architecture
inside ckpt.pt, a bare model_config.json, resnet.py's resnet_ckpt.pt) are still read.
"""
import fcntl
import glob
import hashlib
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import uuid
import warnings
import zipfile
from dataclasses import asdict

import numpy as np
import torch

from gfa.cli import ArgumentParser, UserError, cli
from gfa.data import data_id, run_dataset_dir
from gfa.theory import accumulated_share, layer_of
from gfa.training import check_state
from model import GPT, GPTConfig

CKPT, MODEL_CONFIG, GRAD_DUMP, IMPORTANCE, LOG, HEALED, PROVENANCE, IDENTITY, LOCK = (
    "ckpt.pt", "model_config.json", "grad_norms.npz", "importance.json", "log.txt", "healed.json",
    "provenance.json", "identity.json", ".lock")
KINDS = ("gpt", "resnet")
OLD_RESNET_CKPT = "resnet_ckpt.pt"   # resnet.py's checkpoint before checkpoints carried their kind


def file(run, name):
    return os.path.join(run, name)


# ---- atomic writes ------------------------------------------------------------------------------
def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def remove_stale_temporaries(path):
    """Temporary files a killed write of `path` left behind (`<path>.tmp<pid>...`): those of
    processes that are gone (a live writer's temporary file is left to it)."""
    for stale in glob.glob(glob.escape(path) + ".tmp*"):
        digits = re.match(r"\d+", stale[len(path) + 4:])
        if digits and int(digits.group()) != os.getpid() and _alive(int(digits.group())):
            continue
        try:
            os.remove(stale)
        except OSError:
            pass


def cannot_write(path, e):
    """The one-line error for an OSError while writing path."""
    return UserError(f"cannot write {path}: {e.strerror or e} (a full disk, a read-only or missing folder?)")


def _atomic(path, write, binary=True):
    """write(f) into a temporary file beside path, fsync, rename over path. On any failure (a full
    disk, a read-only folder) the temporary file is removed and path is left as it was; an OSError
    becomes a one-line UserError."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        remove_stale_temporaries(path)
        with open(tmp, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise cannot_write(path, e) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_with(path, write):
    """write(binary file) -> path, atomically (e.g. an array's tofile)."""
    _atomic(path, write)


def atomic_save(obj, path):
    _atomic(path, lambda f: torch.save(obj, f))


def atomic_write_json(obj, path, **kw):
    _atomic(path, lambda f: json.dump(obj, f, **kw), binary=False)


def atomic_write_text(text, path):
    _atomic(path, lambda f: f.write(text), binary=False)


# ---- model config and checkpoint ------------------------------------------------------------------
# what a run's scripts write into its folder: --overwrite removes all of it, so nothing of the
# replaced run stays beside the new one
_RUN_OUTPUTS = (CKPT, GRAD_DUMP, OLD_RESNET_CKPT, IMPORTANCE, LOG, HEALED, PROVENANCE, IDENTITY, "fanin_summary.json",
                "fig*.png",
                "*_fig*.png")
SHARDED = "ckpt_sharded"   # the folder of sharded checkpoints (parallel='fsdp')


def start_run(run, kind, config, overwrite=False, write=True, identity=None):
    """Begin a new run in `run`: refuse a folder that holds another run (its checkpoint or gradient
    dump) unless overwrite, which first removes everything that run's scripts wrote there
    (_RUN_OUTPUTS, prune.py's prune/ and sharded checkpoints); then write model_config.json.
    write=False (DDP ranks other than 0) only checks. identity (run_identity()) goes into identity.json."""
    existing = [f for f in (CKPT, GRAD_DUMP, OLD_RESNET_CKPT) if os.path.isfile(file(run, f))]
    if existing and not overwrite:
        resume = ("continue it with --init_from=resume, " if has_checkpoint(run)
                  else "it stopped before its first checkpoint: ")
        raise UserError(f"{run} already holds a run ({', '.join(existing)}): {resume}pick another --out_dir, or "
                        f"replace it with --overwrite=True")
    if not write:
        return
    try:
        for pattern in _RUN_OUTPUTS:
            for f in glob.glob(os.path.join(glob.escape(run), pattern)):
                os.remove(f)
        for folder in ("prune", SHARDED):
            if os.path.isdir(file(run, folder)):
                shutil.rmtree(file(run, folder))
    except OSError as e:
        raise UserError(f"cannot replace the run in {run}: {e.strerror or e}") from None
    write_model_config(run, kind, config)
    if identity is not None:
        write_identity(run, identity)
    record_invocation(run)


def code_version():
    """The git commit of this code and whether tracked files differ from it. GFA_COMMIT, when set,
    names the commit instead (a copy whose .git is missing or not the code's own: a cluster's staging
    copy, a synced tree); without either, 'unknown'."""
    if os.environ.get("GFA_COMMIT"):
        return {"commit": os.environ["GFA_COMMIT"], "dirty": None}
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        git = ["git", "-C", repo]
        commit = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        status = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)
        if commit.returncode == 0 and status.returncode == 0:
            return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        pass
    return {"commit": "unknown", "dirty": None}


def record_invocation(run, argv=None):
    """Append this call (commit, dirty tree, command line, time, host) to <run>/provenance.json."""
    path = file(run, PROVENANCE)
    record = read_provenance(run) or {"invocations": []}
    record["invocations"].append(code_version() | {
        "argv": list(sys.argv if argv is None else argv), "cwd": os.getcwd(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node()})
    atomic_write_json(record, path, indent=1)


def read_provenance(run):
    """<run>/provenance.json as a dict, or None for a run of an earlier version (or none yet)."""
    path = file(run, PROVENANCE)
    return _read_json(path) if os.path.isfile(path) else None


def provenance_summary(run):
    """One line for an aggregator: the commit and command that started the run, or why there is none."""
    record = read_provenance(run)
    if not record or not record.get("invocations"):
        return "not recorded (a run from before provenance.json)"
    first = record["invocations"][0]
    dirty = {True: ", dirty", False: "", None: ""}[first.get("dirty")]
    resumed = len(record["invocations"]) - 1
    return (f"commit {str(first.get('commit'))[:10]}{dirty}: {' '.join(first.get('argv', []))}"
            + (f" (+{resumed} resume{'s' * (resumed > 1)})" if resumed else ""))


def write_model_config(run, kind, config):
    assert kind in KINDS, kind
    atomic_write_json({"kind": kind, "config": dict(config)}, file(run, MODEL_CONFIG), indent=1)


def _with_defaults(kind, config):
    # a GPT run of an earlier version lacks the fields added since: their defaults are what it ran with
    return GPTConfig.defaults() | config if kind == "gpt" else config


def read_model_config(run, kind=None):
    """(kind, config dict) of a run: model_config.json, else (runs of earlier versions) the
    architecture inside its checkpoint, or a ResNet run known by its importance metric. A GPT
    config has every current GPTConfig key (those newer than the run at their defaults).
    kind: the kind the caller can use ('gpt', 'resnet'; None: any): another is a one-line error."""
    have, config = _read_model_config(run)
    if kind is not None and have != kind:
        raise UserError(f"{run} holds a {have} model, not a {kind} one: " + (
            "this script reads language-model runs (train.py, hf.py import)" if kind == "gpt" else
            "this script reads resnet.py's runs") + "; pass a run of the right kind")
    return have, config


def _read_model_config(run):
    path = file(run, MODEL_CONFIG)
    if os.path.isfile(path):
        try:
            with open(path) as f:
                d = json.load(f)
        except (OSError, ValueError) as e:
            raise UserError(f"{path} cannot be read ({type(e).__name__}: {e})") from None
        kind, config = (d["kind"], d["config"]) if "kind" in d else ("gpt", d)   # earlier versions: a bare GPTConfig
        return kind, _with_defaults(kind, config)
    if os.path.isfile(file(run, CKPT)) or os.path.isfile(file(run, OLD_RESNET_CKPT)):
        ckpt = read_checkpoint(run, kind=None)
        if "model_config" in ckpt:
            return ckpt["kind"], _with_defaults(ckpt["kind"], ckpt["model_config"])
    if (read_importance(run) or {}).get("metric") == "top1_drop":
        return "resnet", {}
    raise UserError(f"{run} has no {MODEL_CONFIG}: not a run directory (train one with train.py or resnet.py)")


def kept(run):
    """What a stopped run leaves, for its error message."""
    path = file(run, CKPT)
    return f"the last good checkpoint {path} is kept" if os.path.isfile(path) else "no checkpoint written"


def save_checkpoint(run, kind, model_state, train_config, iter_num, **extra):
    """<run>/ckpt.pt, atomically; extra: optimizer, grad_dump and the script's own keys. A sharded
    checkpoint passes model_state=None and sharded=<the folder write_shards() filled>: writing
    ckpt.pt commits it, and the older folders go."""
    assert kind in KINDS, kind
    assert (model_state is None) == ("sharded" in extra)
    if model_state is not None:   # the weights guard at the door out (sharded ones: train.py's check_weights)
        check_state(model_state, f"not writing {file(run, CKPT)}", fix=f"nothing written ({kept(run)})")
    weights = {"model": model_state} if model_state is not None else {}
    # save_id: a new id for every checkpoint written, what results computed from it are keyed on
    atomic_save({"kind": kind, **weights, "train_config": dict(train_config), "iter_num": int(iter_num),
                 "save_id": uuid.uuid4().hex, **extra}, file(run, CKPT))
    if os.path.isfile(file(run, OLD_RESNET_CKPT)):   # a resumed run of an earlier version: one checkpoint only
        os.remove(file(run, OLD_RESNET_CKPT))
    if os.path.isdir(file(run, SHARDED)):   # shards no ckpt.pt names any more (or a save that failed)
        for old in os.listdir(file(run, SHARDED)):
            if old != extra.get("sharded"):
                shutil.rmtree(os.path.join(file(run, SHARDED), old), ignore_errors=True)


def write_shards(run, name, state):
    """Every rank's shards of state ({'model': ..., 'optimizer': ...} with DTensors) into
    <run>/ckpt_sharded/<name>/ through torch.distributed.checkpoint. Collective: every rank calls
    it, and a failure on any rank (a full disk) is this one-line error on every rank. Nothing
    names the folder until save_checkpoint(..., sharded=name) writes ckpt.pt."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    path = os.path.join(file(run, SHARDED), name)
    try:
        dcp.save(state, checkpoint_id=path)
    except (OSError, CheckpointException) as e:
        raise UserError(f"cannot write the sharded checkpoint {path} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else ''}); a full disk? {kept(run)}") from None


def _shards(run, ckpt):
    path = os.path.join(file(run, SHARDED), ckpt["sharded"])
    if not os.path.isfile(os.path.join(path, ".metadata")):
        raise UserError(f"{run}/ckpt.pt names the sharded checkpoint {path}, which is missing or incomplete: "
                        f"restore the folder, or train the run again")
    return path


def read_shards(run, ckpt, state):
    """Fill state (this rank's DTensor state dicts, e.g. from get_state_dict) from the sharded
    checkpoint ckpt (a read_checkpoint() dict) names; collective. The shards may come from
    another number of ranks: torch.distributed.checkpoint reshards."""
    import torch.distributed.checkpoint as dcp
    dcp.load(state, checkpoint_id=_shards(run, ckpt))


def model_state(run, ckpt):
    """The whole model's state dict of a read_checkpoint() dict, on the CPU: its "model", or for a
    sharded checkpoint the weights gathered from every rank's shards (in this process, no
    process group: what fanin.py, prune.py and bench.py read)."""
    if "model" in ckpt:
        return ckpt["model"]
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    reader = dcp.FileSystemReader(_shards(run, ckpt))
    meta = reader.read_metadata().state_dict_metadata
    weights = {k[len("model."):]: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()
               if k.startswith("model.") and isinstance(m, TensorStorageMetadata)}
    with warnings.catch_warnings():   # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({"model": weights}, storage_reader=reader, no_dist=True)
    return weights


def read_checkpoint(run, kind="gpt"):
    """The dict in <run>/ckpt.pt, memory-mapped (reading its train_config or grad_dump does not
    pull the weights into memory). kind: the kind the caller can use (None: any)."""
    if not os.path.isdir(run):
        raise UserError(f"{run} is not a run directory (train one with train.py, or pass another run)")
    path = file(run, CKPT)
    if not os.path.isfile(path) and os.path.isfile(file(run, OLD_RESNET_CKPT)):
        path = file(run, OLD_RESNET_CKPT)
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist (train the run with train.py, or pass another run)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:
        raise UserError(f"{path} is corrupt or truncated ({type(e).__name__}): restore it from a copy, or train the "
                        f"run again") from None
    if not isinstance(ckpt, dict) or ("model" not in ckpt and "sharded" not in ckpt):
        raise UserError(f"{path} is not a checkpoint written by this codebase")
    have = ckpt.setdefault("kind", "resnet" if path.endswith(OLD_RESNET_CKPT) else "gpt")   # earlier versions: none
    if kind is not None and have != kind:
        raise UserError(f"{run} holds a {have} model, not a {kind} one (pass a run of the right kind)")
    return ckpt


def checkpoint_id(ckpt):
    """The identity of a checkpoint's weights, what a cache of results computed from them (fanin.py's
    importance) is keyed on: its save_id, new at every save (a copy keeps it); for checkpoints of
    earlier versions, a hash over every tensor's bytes."""
    if "save_id" in ckpt:
        return ckpt["save_id"]
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(ckpt["model"].items()):   # (sharded checkpoints always have a save_id)
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def has_checkpoint(run):
    return os.path.isfile(file(run, CKPT)) or os.path.isfile(file(run, OLD_RESNET_CKPT))


def check_weights_match(run, weights, config):
    """UserError unless the weights (a state dict: model_state()) are exactly those of the model the
    run's config describes (names and shapes, checked on the meta device: nothing allocated)."""
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in GPT(GPTConfig(**config)).state_dict().items()}
    have = {k: tuple(v.shape) for k, v in weights.items()}
    if want != have:
        name = (sorted(want.keys() ^ have.keys()) or sorted(k for k in want if want[k] != have[k]))[0]
        what = f"{name}: {have.get(name, 'missing')} in the checkpoint, {want.get(name, 'absent')} in the config"
        raise UserError(f"{file(run, CKPT)} does not hold the model {file(run, MODEL_CONFIG)} describes ({what}): the "
                        f"run's files do not belong together; restore them from one run")


def read_gpt(run):
    """(checkpoint dict, its weights as a state dict (FSDP's gathered from their shards; memory-mapped
    otherwise), the GPTConfig dict of model_config.json) of a GPT run directory, checked to belong
    together: weights that do not fit the config are a one-line error."""
    ckpt = read_checkpoint(run, kind="gpt")
    _, config = read_model_config(run, kind="gpt")
    weights = model_state(run, ckpt)
    check_weights_match(run, weights, config)
    check_state(weights, file(run, CKPT), fix="the checkpoint's weights are unusable: restore it from a good copy, "
                                              "or train the run again")
    return ckpt, weights, config


def load_gpt(run, device="cpu"):
    """(GPT on device, checkpoint dict) of a run directory (read_gpt's checks)."""
    ckpt, weights, config = read_gpt(run)
    model = GPT(GPTConfig(**config))
    model.load_state_dict(weights)
    return model.to(device), ckpt


def save_gpt(run, model, train_config, iter_num, **extra):
    """A whole GPT run directory at once: model_config.json and ckpt.pt (prune.py, tests). Model
    keys in train_config (runs of earlier versions kept them there) are dropped: the architecture
    is model_config.json's alone."""
    write_model_config(run, "gpt", asdict(model.config))
    train_config = {k: v for k, v in train_config.items() if k not in GPTConfig.defaults()}
    save_checkpoint(run, "gpt", model.state_dict(), train_config, iter_num, **extra)


# ---- the gradient-norm dump -----------------------------------------------------------------------
SUBLAYERS = ("attn", "mlp")   # the sub-blocks of a GPT layer in the dump: 'layer.i.attn', 'layer.i.mlp'


def records_sublayers(names):
    """Whether a dump's groups split the layers into sub-blocks (train.py since attention and MLP
    are recorded apart; earlier runs and ResNet runs have one group per layer)."""
    return any(layer_of(n) not in (None, n) for n in names)


class GradNormDump:
    """<run>/grad_norms.npz, np.load-able:

      names            [G] str      'embed', 'layer.0.attn', 'layer.0.mlp', ..., 'head' (train.py: each
                                    layer's attention sub-block, with the norm before it, and its MLP
                                    sub-block); 'embed', 'layer.0'..'layer.N-1', 'head' in runs of earlier
                                    versions; ResNet: 'stem', 'layer.0'.., 'head'
      steps            [T] int64    optimizer step of each row
      norms            [T, G] f32   L2 norm of each group's global gradient (after the DDP
                                    all-reduce, before clipping and before any equalisation); f16 in a
                                    compact dump (compact_grad_dump), which training never writes
      norms_equalized  [T, G] f32   only with norm equalisation: the norms after the rescaling
    A layer's norm, the one Eq. 2 sums, is sqrt(attn^2 + mlp^2) of its sub-blocks: read_grad_dump
    derives it.

    record() keeps device tensors (no host sync); flush() copies them to the host once and
    rewrites the file atomically. state_dict() travels in the checkpoint for exact resume."""

    def __init__(self, names, path, equalized=False):
        self.names, self.path, self.equalized = list(names), path, equalized
        self.steps, self.norms, self.norms_eq = [], [], []          # host rows
        self._pending = []                                          # (step, dev norms, dev eq norms)

    def record(self, step, norms, norms_eq=None):
        self._pending.append((step, norms.detach(), None if norms_eq is None else norms_eq.detach()))

    def _drain(self):
        if not self._pending:
            return
        self.steps.extend(s for s, _, _ in self._pending)
        self.norms.extend(torch.stack([n for _, n, _ in self._pending]).float().cpu().numpy())
        if self.equalized:
            self.norms_eq.extend(torch.stack([e for _, _, e in self._pending]).float().cpu().numpy())
        self._pending = []

    def state_dict(self):
        self._drain()
        G = len(self.names)
        out = {"names": self.names, "steps": np.asarray(self.steps, dtype=np.int64),
               "norms": np.asarray(self.norms, dtype=np.float32).reshape(-1, G)}
        if self.equalized:
            out["norms_equalized"] = np.asarray(self.norms_eq, dtype=np.float32).reshape(-1, G)
        return out

    def flush(self):
        arrays = self.state_dict()
        _atomic(self.path, lambda f: np.savez(f, **(arrays | {"names": np.array(self.names)})))

    def load_state_dict(self, sd, before_step=None):
        """Restore rows, dropping any at or after before_step (the resumed step)."""
        if list(sd["names"]) != self.names:
            raise UserError("the checkpoint's gradient dump has other layer names than this model")
        if self.equalized != ("norms_equalized" in sd):
            raise UserError(f"the checkpoint was trained with equalize={not self.equalized}: resume with the same "
                            f"equalize setting")
        keep = [i for i, s in enumerate(sd["steps"]) if before_step is None or s < before_step]
        self.steps = [int(sd["steps"][i]) for i in keep]
        self.norms = [np.asarray(sd["norms"][i]) for i in keep]
        self.norms_eq = [np.asarray(sd["norms_equalized"][i]) for i in keep] if self.equalized else []
        self._pending = []


def per_layer(norms, names):
    """(norms, names) with each layer's sub-block columns combined into the layer's own norm,
    sqrt(sum of squares), at the place of its first sub-block; other columns as they are."""
    norms = np.asarray(norms, dtype=np.float64).reshape(-1, len(names))
    out = {}
    for j, n in enumerate(names):
        key = layer_of(n) or n
        out[key] = out.get(key, 0.0) + norms[:, j] ** 2
    return np.sqrt(np.stack(list(out.values()), axis=1)).astype(np.float32), list(out)


def read_grad_dump(run, before_step=None, ckpt=None):
    """The dump of a run as a dict: names, steps, norms (and norms_equalized), plus, derived here,
    layer_names and the Eq. 2 share over the rows kept. before_step drops the rows at or after
    it: pass the checkpoint's iter_num, and the share covers exactly the steps its weights saw.
    Without grad_norms.npz, the copy inside ckpt (a read_checkpoint dict) is used.
    names / norms are per layer (embed, layer.i, head) whatever the file records; a dump with
    sub-blocks adds sub_names and sub_norms (its own columns) and sub_share: {'attn': [N], 'mlp': [N]},
    Eq. 2 over each kind of sub-block alone (the attention shares sum to 1 over the layers, and so
    do the MLP shares)."""
    path = file(run, GRAD_DUMP)
    d = None
    if os.path.isfile(path):
        try:
            with np.load(path) as z:
                d = {k: z[k] for k in z.files if k in ("names", "steps", "norms", "norms_equalized")}
            if not {"names", "steps", "norms"} <= d.keys():
                raise ValueError("names, steps or norms missing")
        except Exception as e:
            d = None
            if not (ckpt is not None and ckpt.get("grad_dump")):
                raise UserError(f"{path} is corrupt or truncated ({type(e).__name__}) and the run has no checkpoint "
                                f"holding a copy: train the run again") from None
            print(f"note: {path} is corrupt or truncated ({type(e).__name__}): using the copy in the checkpoint")
    if d is None and ckpt is not None and ckpt.get("grad_dump"):
        d = dict(ckpt["grad_dump"])
    elif d is None:
        raise UserError(f"no gradient dump at {path}: train the run with train.py or resnet.py (they write it)")
    d["names"] = [str(n) for n in d["names"]]
    keep = np.ones(len(d["steps"]), dtype=bool) if before_step is None else np.asarray(d["steps"]) < before_step
    for k in ("steps", "norms", "norms_equalized"):
        if k in d:
            d[k] = np.asarray(d[k])[keep]
            if d[k].dtype == np.float16:   # a compact dump (compact_grad_dump): exact in float64, for the sums
                d[k] = d[k].astype(np.float64)
    if len(d["steps"]) == 0:
        raise UserError(f"the gradient dump of {run} holds no steps" + (f" before step {before_step}"
                                                                        if before_step is not None else ""))
    if records_sublayers(d["names"]):
        d["sub_names"], d["sub_norms"] = d["names"], d["norms"]
        d["sub_share"] = {part: accumulated_share(d["norms"][:, [j for j, n in enumerate(d["names"])
                                                                 if n.endswith("." + part)]],
                                                  [n for n in d["names"] if n.endswith("." + part)])
                          for part in SUBLAYERS}
        if "norms_equalized" in d:
            d["norms_equalized"] = per_layer(d["norms_equalized"], d["names"])[0]
        d["norms"], d["names"] = per_layer(d["norms"], d["names"])
    d["layer_names"] = [n for n in d["names"] if n.startswith("layer.")]
    d["share"] = accumulated_share(d["norms"], d["names"])
    d["step_range"] = (int(d["steps"].min()), int(d["steps"].max()))
    return d


# ---- compact dumps, for committing ------------------------------------------------------------------
FP16_MIN_NORMAL = float(np.finfo(np.float16).tiny)   # 6.1e-05: below it float16 loses precision (subnormal, then 0)
COMPACT_MAX_REL_ERROR = 2.0 ** -10   # the most a compact norm may be off, relative to itself (fp16_keeping_sums)


def fp16_keeping_sums(norms):
    """float16 of the norms [T, G], each rounded down or up to one of the two float16 values around it (so
    within 2^-10 of itself) with the choice made down the steps so each column's rounding error is carried
    to its next steps (error feedback): its running sums, which Eq. 2 and the share drift take, stay within
    about one float16 step of the float32 ones, where plain rounding's bias adds up over thousands of steps
    (on docs/runs it moved an early share-drift figure in the second decimal). Zeros, inf and nan are kept."""
    a = np.asarray(norms, dtype=np.float64)
    out = np.empty(a.shape, dtype=np.float16)
    carry = np.zeros(a.shape[1:])
    with np.errstate(over="ignore", invalid="ignore"):
        for t in range(len(a)):
            x = a[t]
            near = x.astype(np.float16)
            below = np.where(near > x, np.nextafter(near, np.float16(-np.inf)), near)
            above = np.where(near < x, np.nextafter(near, np.float16(np.inf)), near)
            live = np.isfinite(x) & (x != 0)
            want = np.where(live, x + carry, x)
            out[t] = np.where(live, np.clip(want.astype(np.float16), below, above), near)
            carry = np.where(live & np.isfinite(out[t]), want - out[t].astype(np.float64), carry)
    return out


def fp16_fit(values, stored, max_rel_error=COMPACT_MAX_REL_ERROR):
    """How the float16 `stored` holds the norms `values`: {'ok', 'below_min_normal' (nonzero finite norms
    below FP16_MIN_NORMAL), 'smallest' (the smallest nonzero |norm|), 'overflow' (finite norms float16 made
    inf), 'max_rel_error' (over the finite nonzero norms kept finite)}. ok when nothing overflows and no
    norm moved by more than max_rel_error of itself."""
    a, h = np.asarray(values, dtype=np.float64), np.asarray(stored, dtype=np.float64)
    finite_nonzero = np.isfinite(a) & (a != 0)
    overflow = int((finite_nonzero & ~np.isfinite(h)).sum())
    kept = finite_nonzero & np.isfinite(h)
    rel = np.abs(h[kept] - a[kept]) / np.abs(a[kept])
    worst = float(rel.max()) if rel.size else 0.0
    return {"ok": overflow == 0 and worst <= max_rel_error, "overflow": overflow, "max_rel_error": worst,
            "below_min_normal": int((finite_nonzero & (np.abs(a) < FP16_MIN_NORMAL)).sum()),
            "smallest": float(np.abs(a[finite_nonzero]).min()) if finite_nonzero.any() else 0.0}


def compact_grad_dump(run, max_rel_error=COMPACT_MAX_REL_ERROR, fold_sublayers=False):
    """Rewrites <run>/grad_norms.npz compactly, in place and atomically: the norms as float16 in
    an LZMA-compressed npz, each norm column stored contiguously (same keys; np.load reads it,
    read_grad_dump upcasts to float64), or, when float16
    would overflow a norm or move one by more than max_rel_error of itself (norms below FP16_MIN_NORMAL),
    the norms unchanged (float32), compressed. The written bytes are read back and checked before they
    replace the file. fold_sublayers: a dump that records attention and MLP apart keeps only each layer's
    norm (per_layer: what read_grad_dump's share and every table use), about half the bytes; its sub_share
    is gone for good. Returns {'path', 'before', 'after' (bytes), 'dtype' ('float16' | 'float32'), 'fit'
    (fp16_fit of all its norms), 'skipped' (compact already: left as it is), 'folded'}."""
    path = file(run, GRAD_DUMP)
    try:
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:
        raise UserError(f"{path} cannot be read as a gradient dump ({type(e).__name__}: {e}): left as it is") from None
    if not {"names", "steps", "norms"} <= arrays.keys():
        raise UserError(f"{path} holds {sorted(arrays)}, not a gradient dump's names, steps and norms: left as it is")
    norm_keys = [k for k in ("norms", "norms_equalized") if k in arrays]
    names = [str(n) for n in arrays["names"]]
    folded = fold_sublayers and records_sublayers(names)
    if folded:
        for k in norm_keys:
            arrays[k], layer_names = per_layer(arrays[k], names)
        arrays["names"] = np.array(layer_names)
    before = os.path.getsize(path)
    with zipfile.ZipFile(path) as z:
        compressed = all(i.compress_type == zipfile.ZIP_LZMA for i in z.infolist())
    halves = {k: arrays[k] if arrays[k].dtype == np.float16 else fp16_keeping_sums(arrays[k]) for k in norm_keys}
    fits = [fp16_fit(arrays[k], halves[k], max_rel_error) for k in norm_keys]
    fit = {"ok": all(f["ok"] for f in fits), "overflow": sum(f["overflow"] for f in fits),
           "below_min_normal": sum(f["below_min_normal"] for f in fits),
           "smallest": min(f["smallest"] for f in fits), "max_rel_error": max(f["max_rel_error"] for f in fits)}
    out = dict(arrays, **halves) if fit["ok"] else arrays   # else its norms as they are (float32), compressed
    dtype = out["norms"].dtype.name
    if compressed and not folded and all(out[k] is arrays[k] for k in norm_keys):   # compact already
        return {"path": path, "before": before, "after": before, "dtype": dtype, "fit": fit, "skipped": True,
                "folded": False}
    buf = io.BytesIO()
    _write_lzma_npz(buf, out)
    with np.load(io.BytesIO(buf.getvalue())) as z:   # what will be on disk, read back before it replaces the file
        if sorted(z.files) != sorted(out) or not all(np.array_equal(z[k], out[k], equal_nan=z[k].dtype.kind == "f")
                                                     for k in out):
            raise UserError(f"{path}: the compact copy did not read back equal: left as it is")
    _atomic(path, lambda f: f.write(buf.getvalue()))
    return {"path": path, "before": before, "after": len(buf.getvalue()), "dtype": dtype, "fit": fit, "skipped": False,
            "folded": folded}


def _write_lzma_npz(f, arrays):
    """An npz (np.load reads it as any other) whose members are LZMA-compressed, 2-D arrays in column order:
    a norm column's steps sit together, so their like high bytes compress ~25 % better than savez_compressed."""
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_LZMA) as z:
        for key, value in arrays.items():
            with z.open(f"{key}.npy", "w") as member:
                np.lib.format.write_array(member, np.asfortranarray(value) if value.ndim == 2 else value,
                                          allow_pickle=False)


def compact_main(argv):
    """python -m gfa.rundir compact FOLDER...: every grad_norms.npz under the folders, compact (see
    compact_grad_dump), one line each and the total."""
    ap = ArgumentParser(prog="python -m gfa.rundir", description="Rewrite every grad_norms.npz under the folders "
                        "compactly (float16 norms, LZMA-compressed), in place and atomically, for committing; a dump "
                        "float16 cannot hold within --max_rel_error stays float32 (compressed).")
    ap.add_argument("command", choices=["compact"], help="compact: the only command")
    ap.add_argument("folders", nargs="+", help="run directories, or folders holding them (searched recursively)")
    ap.add_argument("--max_rel_error", type=float, default=COMPACT_MAX_REL_ERROR,
                    help="the most a norm may move, relative to itself (float16, rounded down or up to keep the "
                    "running sums, holds every norm from 6.1e-05 to 65504 within 2^-10)")
    ap.add_argument("--fold_sublayers", action="store_true",
                    help="keep one norm per layer (sqrt of its attention and MLP norms' sum of squares), about half "
                    "the bytes; the attention/MLP split (fanin.py's sub-block shares) is dropped for good")
    args = ap.parse_args(argv)
    paths = []
    for folder in args.folders:
        if not os.path.isdir(folder):
            raise UserError(f"{folder} is not a folder: give run directories or folders holding them")
        paths += sorted(glob.glob(os.path.join(glob.escape(folder), "**", GRAD_DUMP), recursive=True))
    if not paths:
        raise UserError(f"no {GRAD_DUMP} under {', '.join(args.folders)}")
    before = after = 0
    for p in paths:
        r = compact_grad_dump(os.path.dirname(p), args.max_rel_error, args.fold_sublayers)
        before, after = before + r["before"], after + r["after"]
        f = r["fit"]
        why = ("float16" if r["skipped"] and f["ok"] else f"float16, norms within {f['max_rel_error']:.2g} of themselves"
               if f["ok"] else
               f"kept float32: float16 would move norms by up to {f['max_rel_error']:.2g} of themselves (> "
               f"{args.max_rel_error:.2g}); {f['below_min_normal']} norms below its min normal {FP16_MIN_NORMAL:.2g} "
               f"(smallest {f['smallest']:.2g})" + (f", {f['overflow']} over its max 65504" if f["overflow"] else ""))
        print(f"{p}: " + ("already compact, " if r["skipped"] else f"{r['before']:,} -> {r['after']:,} bytes, ")
              + ("per layer, " if r["folded"] else "") + why)
    print(f"{len(paths)} dumps: {before:,} -> {after:,} bytes ({100 * (after / before - 1):+.1f} %)")


# ---- importance -------------------------------------------------------------------------------------
def read_importance(run):
    """<run>/importance.json as a dict, or None when there is none."""
    path = file(run, IMPORTANCE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        print(f"note: {path} cannot be read ({type(e).__name__}): ignored")
        return None


def write_importance(run, result):
    atomic_write_json(result, file(run, IMPORTANCE), indent=1)


# ---- healing -----------------------------------------------------------------------------------------
def read_healed(run, stamp):
    """The metrics <run>/healed.json recorded for exactly this stamp, else None (none, another stamp,
    unreadable)."""
    path = file(run, HEALED)
    try:
        with open(path) as f:
            rec = json.load(f)
        return rec["metrics"] if rec.get("stamp") == json.loads(json.dumps(stamp)) else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def write_healed(run, stamp, metrics):
    atomic_write_json({"stamp": stamp, "metrics": metrics}, file(run, HEALED), indent=1)


# ---- the log ----------------------------------------------------------------------------------------
class Log:
    """print() and append to <run>/log.txt; on a DDP rank other than 0, nothing (master=False)."""

    def __init__(self, run, master=True):
        self.path, self.file = file(run, LOG), None
        if master:
            try:
                os.makedirs(run, exist_ok=True)
                self.file = open(self.path, "a")
            except OSError as e:
                raise cannot_write(self.path, e) from None

    def __call__(self, line):
        if self.file is not None:
            print(line, flush=True)
            try:
                self.file.write(line + "\n")
                self.file.flush()
            except OSError as e:
                raise cannot_write(self.path, e) from None

    def close(self):
        if self.file is not None:
            self.file.close()


# ---- the run's identity, and pooling runs as seeds -------------------------------------------------
UNKNOWN = "unknown"
# training settings that do not change what is trained: where output goes, how often to log, evaluate and
# save, how the same global batch is computed, the device, compiler and logger, and the dataset's location
# (its content is the identity's "data"). Every other setting, but the seed, is the recipe. train.py's and
# resnet.py's FREE_ON_RESUME keys are here too.
BOOKKEEPING = frozenset({
    "out_dir", "overwrite", "allow_changes", "device", "compile", "eval_interval", "eval_iters", "eval_batch_size",
    "log_interval", "always_save_checkpoint", "stop_iter", "stop_after_min", "gradient_accumulation_steps",
    "wandb_log", "wandb_project", "wandb_run_name", "parallel", "activation_checkpointing", "fused_ce",
    "fused_ce_chunk", "equalize_reference", "dataset", "data_dir", "num_workers", "download", "ckpt_interval",
    "importance", "analyse", "micro_batch", "plan", "world_size", "gpu_mem_gb"})
_SECTIONS = (("kind", "kinds"), ("architecture", "architectures"), ("recipe", "recipes"), ("data", "data"))


def run_identity(kind, model_config, train_config, data=None):
    """What makes two runs the same experiment, as a JSON-able dict: kind, architecture (the model
    config), recipe (every training setting but the seed and BOOKKEEPING; init_from is 'scratch' or
    'checkpoint'), seed, data (gfa.data.data_id of a GPT run's dataset; a ResNet run's dataset name).
    A part that is not known (None) is 'unknown': pooling compares what is known."""
    tc = dict(train_config or {})
    recipe = {k: v for k, v in sorted(tc.items()) if k not in BOOKKEEPING and k != "seed"
              and not (kind == "gpt" and k in GPTConfig.defaults())}   # earlier versions kept model keys there
    if "init_from" in recipe:
        recipe["init_from"] = "scratch" if recipe["init_from"] in ("scratch", "resume") else "checkpoint"
    ident = {"version": 1, "kind": kind, "architecture": dict(model_config) if model_config else UNKNOWN,
             "recipe": recipe if tc else UNKNOWN, "seed": tc.get("seed", UNKNOWN), "data": data or UNKNOWN}
    return json.loads(json.dumps(ident))   # tuples as lists: as read back from identity.json


def run_data_id(kind, train_config, folder=None):
    """The identity's data part of a run's training config: the content id of its dataset folder (or of
    `folder`), a ResNet run's dataset name; None when unknown."""
    tc = train_config or {}
    if kind == "resnet":
        return {"dataset": tc["dataset"]} if tc.get("dataset") else None
    folder = folder or run_dataset_dir(tc)
    return data_id(folder) if folder and os.path.isdir(folder) else None


def write_identity(run, identity):
    atomic_write_json(identity, file(run, IDENTITY), indent=1)


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path} cannot be read ({type(e).__name__}: {e}): move it aside") from None


def _logged_data_folder(run):
    """The dataset folder the first lines of a train.py log name ('...; data <folder>: N train tokens')."""
    try:
        with open(file(run, LOG)) as f:
            head = [next(f, "") for _ in range(5)]
    except OSError:
        return None
    found = [m.group(1) for line in head if (m := re.search(r"; data (.+): [\d,]+ train tokens", line))]
    return found[0] if found else None


def read_identity(run):
    """A run's identity: its identity.json, else (a run of an earlier version, an imported or pruned model)
    derived from what it has: model_config.json, the checkpoint's train_config, the data folder these or
    log.txt's first lines name (its content now). What cannot be known is 'unknown'; 'derived' says how."""
    if os.path.isfile(file(run, IDENTITY)):
        return _read_json(file(run, IDENTITY))
    kind, config = read_model_config(run)
    ckpt = read_checkpoint(run, kind=None) if has_checkpoint(run) else {}
    tc = ckpt.get("train_config") or None
    if tc and ckpt.get("initialised_from"):
        tc = tc | {"init_from": "checkpoint"}
    folder = None if kind == "resnet" else run_dataset_dir(tc) or _logged_data_folder(run)
    ident = run_identity(kind, config, tc, run_data_id(kind, tc, folder))
    ident["derived"] = "model_config.json" + (", ckpt.pt's train_config" if tc else "") + (
        f", the content of {folder} now" if ident["data"] != UNKNOWN and kind == "gpt" else "")
    return ident


def check_resume_data(run, now):
    """A resume refuses data whose content changed since the run recorded it (identity.json)."""
    if not os.path.isfile(file(run, IDENTITY)) or not now:
        return
    was = _read_json(file(run, IDENTITY)).get("data")
    changed = [k for k in (was if isinstance(was, dict) else {}) if k in now and was[k] != now[k]]
    if changed:
        k = changed[0]
        raise UserError(f"{run} was trained on other data: its {k} had content id {was[k]}, the one now given has "
                        f"{now[k]} (regenerated, truncated or replaced since?): resume with the data the run was "
                        f"trained on, or start a new run")


def pool_member(run):
    """A run directory's identity plus what tells the same run twice apart from two seeds: its folder
    and its checkpoint's save_id (a copy keeps it)."""
    ident = read_identity(run)
    ckpt = read_checkpoint(run, kind=None) if has_checkpoint(run) else {}
    return ident | {"checkpoint": ckpt.get("save_id"), "path": os.path.realpath(run)}


def _first_difference(a, b):
    """(what differs, key, a's value, b's value) of the first known difference of two identities outside
    the seed, else None. Unknown parts, and keys only one of them has (a setting newer than a run), are
    not compared."""
    for section, words in _SECTIONS:
        va, vb = a.get(section, UNKNOWN), b.get(section, UNKNOWN)
        if UNKNOWN in (va, vb):
            continue
        if isinstance(va, dict) and isinstance(vb, dict):
            for k in sorted(va.keys() & vb.keys()):
                if va[k] != vb[k]:
                    return words, k, va[k], vb[k]
        elif va != vb:
            return words, section, va, vb
    return None


def _same_run(a, b):
    """Why two pool members are one run counted twice, or None."""
    for key, why in (("path", "the same folder"), ("checkpoint", "the same checkpoint"),
                     ("fingerprint", "identical results")):
        if a.get(key) and a.get(key) == b.get(key):
            return why
    if a.get("seed", UNKNOWN) != UNKNOWN and a.get("seed") == b.get("seed") and _first_difference(a, b) is None:
        return f"the same seed {a['seed']} and the same settings"
    return None


def check_poolable(runs, allow_mixed=False, option="--runs"):
    """Refuse to pool (average as seeds) runs that are not seeds of one experiment: the same run twice
    (always), or runs whose identities differ in anything but the seed (unless allow_mixed). runs: run
    directories, or (label, identity) pairs (e.g. from results files; an identity may carry 'checkpoint',
    'path' or 'fingerprint' to tell duplicates). Returns None for a pure pool, else a line saying how the
    pool is mixed, for the caller to label its output with."""
    members = [(r, pool_member(r)) if isinstance(r, (str, os.PathLike)) else r for r in runs]
    for i, (a, ia) in enumerate(members):
        for b, ib in members[i + 1:]:
            why = _same_run(ia, ib)
            if why:
                raise UserError(f"{option}: {a} and {b} are one run given twice ({why}): each run counts once in a "
                                f"mean ± std; drop one")
    (first, i0), mixed = members[0], []
    for b, ib in members[1:]:
        diff = _first_difference(i0, ib)
        if diff:
            words, key, va, vb = diff
            mixed.append(f"{first} and {b} have different {words} ({key} {va} vs {vb})")
    if not mixed:
        return None
    if not allow_mixed:
        raise UserError(f"{option}: {mixed[0]}: {option} takes seeds of one config (only the seed may differ); give "
                        f"seeds of one experiment, or pass --allow_mixed to pool them anyway (the output is labelled "
                        f"mixed)")
    note = "; ".join(mixed)
    print(f"warning: a mixed pool (--allow_mixed): {note}")
    return note


# ---- one writer per run directory, and a start that fails leaves nothing behind ---------------------
SNAPSHOT_BYTES = 1 << 20   # files of a run up to this size are kept whole while a start may fail


class RunLock:
    """An exclusive flock on <run>/.lock naming its holder (pid, host, time, command line). A second
    writer gets a one-line error naming the holder; a lock file left by a process that died (the
    kernel released its flock) is taken over, and `taken_over` says whose it was."""

    def __init__(self, run):
        self.run, self.path, self.fd, self.taken_over = run, file(run, LOCK), None, None

    def acquire(self):
        try:
            os.makedirs(self.run, exist_ok=True)
            while self.fd is None:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "a process"
                    holder = holder if len(holder) <= 160 else holder[:157] + "..."
                    os.close(fd)
                    raise UserError(f"{self.run} is being written by another process ({holder}): one writer per run "
                                    f"directory; wait for it to end, or pick another folder") from None
                try:
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if not same:   # its holder removed the file between our open and flock: take the new one
                    os.close(fd)
                    continue
                self.fd = fd
            self.taken_over = os.pread(self.fd, 4096, 0).decode(errors="replace").strip() or None
            me = (f"pid {os.getpid()} on host {platform.node()} since {time.strftime('%Y-%m-%dT%H:%M:%S%z')}: "
                  + " ".join(sys.argv))[:4000]
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, me.encode(), 0)
        except OSError as e:
            raise cannot_write(self.path, e) from None
        return self

    def release(self):
        if self.fd is not None:
            try:
                os.remove(self.path)   # while still holding it: a waiter that opened it retries (acquire)
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None


def _snapshot(run):
    """What a run folder holds before a start: None when it does not exist; else {name: bytes (files up to
    SNAPSHOT_BYTES), int (the size of larger files, which a start only appends to), or 'dir'}."""
    if not os.path.isdir(run):
        return None
    snap = {}
    for name in os.listdir(run):
        path = file(run, name)
        if os.path.isdir(path):
            snap[name] = "dir"
        elif os.path.isfile(path):
            size = os.path.getsize(path)
            snap[name] = size if size > SNAPSHOT_BYTES else open(path, "rb").read()
    return snap


def _roll_back(run, snap):
    """Put a run folder back as _snapshot found it: what the failed start created goes, what it changed
    is restored (small files whole, larger ones cut back to their size); a folder it created goes."""
    if snap is None:
        shutil.rmtree(run, ignore_errors=True)
        return
    for name in os.listdir(run) if os.path.isdir(run) else []:
        path, was = file(run, name), snap.get(name)
        if name == LOCK:
            continue
        if was is None:
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
        elif isinstance(was, bytes) and open(path, "rb").read() != was:
            atomic_write_with(path, lambda f: f.write(was))
        elif isinstance(was, int) and os.path.getsize(path) > was:
            os.truncate(path, was)


class RunStart:
    """A script's writes into run directories, from before its checks to the point where the work is
    under way:

        with rundir.RunStart() as start:
            start.claim(run)          # the exclusive lock (RunLock); the folder as it is now
            ... checks, start_run, the first writes ...
            start.started()           # from here, a failure is the run's own (its log says it)
            ... the work ...

    A failure before started() rolls every claimed folder back (_roll_back): nothing the failed start
    created stays, nothing that was there is lost. The locks go when the block ends."""

    def __init__(self):
        self.claims, self.done = [], False

    def __enter__(self):
        return self

    def claim(self, run, master=True):
        """Lock run (on DDP rank 0 only: master) and remember what it holds; a lock left by a dead process
        is taken over, with a line in the run's log."""
        if not master:
            return
        snap = _snapshot(run)
        lock = RunLock(run).acquire()
        self.claims.append((run, lock, snap))
        if lock.taken_over:
            line = f"note: took over the lock of {run} from a process that is gone ({lock.taken_over})"
            print(line, flush=True)
            with open(file(run, LOG), "a") as f:
                f.write(line + "\n")

    def started(self):
        self.done = True

    def __exit__(self, exc_type, exc, tb):
        for run, lock, snap in reversed(self.claims):
            try:
                if exc_type is not None and not self.done:
                    _roll_back(run, snap)
            finally:
                lock.release()
        return False


if __name__ == "__main__":   # python -m gfa.rundir compact FOLDER...
    cli(compact_main)
