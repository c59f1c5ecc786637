"""
Helpers that several scripts share; each thing has exactly one home, here.

  configurator     read_config(): `script.py config/x.py --key=value`, nanoGPT style
  errors           UserError + cli(): user mistakes print one line, never a traceback
  data             data_dir(), load_tokens(), get_batch() (deterministic in seed/step), eval_batches()
  evaluation       evaluate(): mean cross-entropy over a fixed held-out token set
  checkpoints      atomic_save(), atomic_write_json(), read_checkpoint(), load_model()
  gradient norms   LayerGradNorms (one fused reduction, no host sync), GradNormDump (the
                   grad_norms.npz format every script reads), load_grad_dump()
  devices          autocast_for(), peak_flops()
"""
import ast
import difflib
import json
import os
import sys
from contextlib import nullcontext

import numpy as np
import torch


class UserError(ValueError):
    """Bad input from the user: printed as one line by cli(), no traceback."""


def cli(main):
    """Run main(); user mistakes (UserError, model.ConfigError) exit with a one-line message."""
    from model import ConfigError
    try:
        return main()
    except (UserError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


# ---- configurator -------------------------------------------------------------------------
def _exec_config_file(path):
    if not os.path.isfile(path):
        raise UserError(f"config file {path} does not exist (see config/ for the available ones)")
    ns = {}
    try:
        exec(compile(open(path).read(), path, "exec"), ns)
    except Exception as e:
        raise UserError(f"config file {path} failed to run: {type(e).__name__}: {e}") from None
    return {k: v for k, v in ns.items() if not k.startswith("_") and not callable(v)
            and not isinstance(v, type(os))}


def _coerce(key, value, default):
    """value with the type of default; one-line error on a mismatch. None defaults take anything."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(default, (list, tuple)):
        if isinstance(value, (list, tuple)):
            return type(default)(value)
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
    else:
        return value
    raise UserError(f"{key}={value!r} has type {type(value).__name__}, expected {type(default).__name__} "
                    f"(default {default!r})")


def read_config(argv, defaults=None, model_only=False):
    """Merge defaults, then config files (positional *.py), then --key=value overrides.

    defaults: the script's known keys and their default values (types are enforced).
    model_only: the known keys are GPTConfig's fields; keys a config file sets for other
    scripts (batch_size, ...) are ignored, but an unknown --override is still an error."""
    from model import GPTConfig
    if model_only:
        defaults = GPTConfig.defaults()
    cfg = dict(defaults)

    def unknown(key, where):
        close = difflib.get_close_matches(key, list(defaults), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        return UserError(f"unknown config key '{key}' {where}{hint}")

    for arg in argv:
        if arg.startswith("--"):
            if "=" not in arg:
                raise UserError(f"override {arg} must look like --key=value")
            key, raw = arg[2:].split("=", 1)
            if key not in defaults:
                raise unknown(key, f"in {arg}")
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                value = raw   # a bare string, e.g. --device=cuda
            cfg[key] = _coerce(key, value, defaults[key])
        elif arg.endswith(".py"):
            for key, value in _exec_config_file(arg).items():
                if key in defaults:
                    cfg[key] = _coerce(key, value, defaults[key])
                elif not model_only:
                    raise unknown(key, f"set by {arg}")
        else:
            raise UserError(f"argument '{arg}' is neither a config file (*.py) nor a --key=value override")
    return cfg


# ---- data ---------------------------------------------------------------------------------
def load_tokens(path, vocab_size=None):
    """A nanoGPT-style uint16 token file as a read-only memmap, checked against the vocabulary."""
    if not os.path.isfile(path):
        raise UserError(f"data file {path} does not exist (run the dataset's prepare.py first)")
    if os.path.getsize(path) < 4:
        raise UserError(f"data file {path} is empty")
    data = np.memmap(path, dtype=np.uint16, mode="r")
    if vocab_size is not None:
        top = int(data.max())
        if top >= vocab_size:
            raise UserError(f"{path} holds token id {top} but the model's vocab_size is {vocab_size}: "
                            f"raise vocab_size or use the matching dataset")
    return data


def data_dir(train_config, override=None):
    """The folder holding train.bin/val.bin: override (a folder, or a dataset name under data/),
    else the run's data_dir as given, else this repository's data/<dataset> (found from this
    file, so scripts work from any directory)."""
    repo_data = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
    if override:
        return override if os.path.isdir(override) else os.path.join(repo_data, override)
    return train_config.get("data_dir") or os.path.join(repo_data, str(train_config.get("dataset") or ""))


def _windows_to_tensors(data, offsets, block_size):
    xy = np.stack([np.asarray(data[o:o + block_size + 1], dtype=np.int64) for o in offsets])
    xy = torch.from_numpy(xy)
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


def clip_coef(total_norm, max_norm):
    """The factor clip_grad_norm_ applies, as a device tensor (no host sync); 1 when max_norm <= 0."""
    if max_norm <= 0:
        return torch.ones_like(total_norm)
    return (max_norm / (total_norm + 1e-6)).clamp(max=1.0)


def scaled_step(optimizer, grads, coef):
    """optimizer.step() on the gradients multiplied by coef (a 0-d fp32 device tensor, such as
    clip_coef's); the gradients are left scaled, as an in-place clip leaves them. A fused optimizer
    scales inside its own pass over the gradients, through grad_scale (the hook torch.amp.GradScaler
    uses: the kernel divides each gradient by it and writes the result back). That saves the
    separate in-place pass over every gradient: -0.5 % to -1.5 % of a Vanilla-16L training step
    on an H100 (docs/bench/probes/train_switches.py)."""
    if optimizer.defaults.get("fused") and getattr(optimizer, "_step_supports_amp_scaling", False):
        optimizer.grad_scale = coef.float().reciprocal()
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale
    else:
        torch._foreach_mul_(grads, coef)
        optimizer.step()


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


@torch.no_grad()
def evaluate(model, data, block_size, batch_size, n_batches, device, ctx=None):
    """Mean next-token cross-entropy (nats/token) of model over eval_batches(); ppl = exp(loss)."""
    from model import cross_entropy
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), device=device, dtype=torch.float64), 0
    for x, y in eval_batches(data, block_size, batch_size, n_batches):
        x, y = x.to(device), y.to(device)
        with ctx or nullcontext():
            logits, _ = model(x)
        total += cross_entropy(logits, y, reduction="sum").double()
        count += y.numel()
    model.train(was_training)
    return (total / count).item()


# ---- checkpoints ----------------------------------------------------------------------------
def atomic_save(obj, path):
    """torch.save to a temporary file, fsync, then rename over path: a kill mid-write leaves
    the previous file intact."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(obj, path, **kw):
    """json.dump to a temporary file, then rename over path (same guarantee as atomic_save)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, **kw)
    os.replace(tmp, path)


def checkpoint_path(path):
    return os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path


def read_checkpoint(path):
    """The dict in a run directory's ckpt.pt (or a ckpt file), memory-mapped: reading only its
    model_config / train_config / grad_dump does not pull the weights into memory."""
    path = checkpoint_path(path)
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist (train one with train.py, or pass another run)")
    ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    if "model_config" not in ckpt or "model" not in ckpt:
        raise UserError(f"{path} is not a checkpoint written by this codebase (no model/model_config)")
    return ckpt


def load_model(path, device="cpu"):
    """(model, checkpoint dict) from a run directory or a ckpt.pt written by train.py/prune.py."""
    from model import GPT, GPTConfig
    ckpt = read_checkpoint(path)
    model = GPT(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device), ckpt


# ---- per-layer gradient norms ---------------------------------------------------------------
class LayerGradNorms:
    """L2 norm of each named parameter group's gradient, as one device tensor [G].

    groups: {name: [params]} (GPT.param_groups_by_layer(), or the ResNet's). One fused
    _foreach_norm over all gradients plus one index_add: no per-layer host sync."""

    def __init__(self, groups):
        self.names = list(groups)
        self.params, index = [], []
        for g, name in enumerate(self.names):
            for p in groups[name]:
                self.params.append(p)
                index.append(g)
        self.index = torch.tensor(index)

    def __call__(self):
        dev = self.params[0].device
        have = [i for i, p in enumerate(self.params) if p.grad is not None]
        sq = torch.zeros(len(self.names), device=dev, dtype=torch.float32)
        if have:
            key = (dev, tuple(have))
            if getattr(self, "_key", None) != key:   # copy the index to the device once, not every step
                self._key, self._dev_index = key, self.index[have].to(dev)
            norms = torch._foreach_norm([self.params[i].grad for i in have])
            sq.index_add_(0, self._dev_index, torch.stack(norms).float() ** 2)
        return sq.sqrt()


def accumulated_share(norms, names):
    """Eq. 2: per-layer sum over steps of ||grad||, normalised over the layers ('layer.*')."""
    cols = [i for i, n in enumerate(names) if n.startswith("layer.")]
    acc = np.asarray(norms, dtype=np.float64)[:, cols].sum(axis=0)
    return acc / acc.sum() if acc.sum() > 0 else acc


class GradNormDump:
    """The gradient-norm dump, `<out_dir>/grad_norms.npz` (np.load; every script reads it):

      names            [G] str      'embed', 'layer.0'..'layer.N-1', 'head' (ResNet: 'stem', ..., 'head')
      steps            [T] int64    optimizer step of each row
      norms            [T, G] f32   L2 norm of each group's global gradient (after the DDP
                                    all-reduce, before clipping and before any equalisation)
      norms_equalized  [T, G] f32   only with norm equalisation: the norms after the rescaling
      share            [N] f64      Eq. 2 accumulated share over the 'layer.*' groups
      layer_names      [N] str      the names the share refers to

    record() keeps device tensors (no sync); flush() copies them to the host once and
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
        steps = [s for s, _, _ in self._pending]
        rows = torch.stack([n for _, n, _ in self._pending]).float().cpu().numpy()
        self.steps.extend(steps)
        self.norms.extend(rows)
        if self.equalized:
            self.norms_eq.extend(torch.stack([e for _, _, e in self._pending]).float().cpu().numpy())
        self._pending = []

    def arrays(self):
        self._drain()
        G = len(self.names)
        norms = np.asarray(self.norms, dtype=np.float32).reshape(-1, G)
        out = {"names": np.array(self.names), "steps": np.asarray(self.steps, dtype=np.int64), "norms": norms,
               "layer_names": np.array([n for n in self.names if n.startswith("layer.")]),
               "share": accumulated_share(norms, self.names)}
        if self.equalized:
            out["norms_equalized"] = np.asarray(self.norms_eq, dtype=np.float32).reshape(-1, G)
        return out

    def flush(self):
        arrays = self.arrays()
        tmp = f"{self.path}.tmp{os.getpid()}.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, self.path)
        return arrays

    def state_dict(self):
        a = self.arrays()
        return {k: a[k] for k in ("steps", "norms", "norms_equalized") if k in a} | {"names": self.names}

    def load_state_dict(self, sd, before_step=None):
        """Restore rows, dropping any at or after before_step (the resumed step)."""
        if list(sd["names"]) != self.names:
            raise UserError("the checkpoint's gradient dump has other layer names than this model")
        if self.equalized != ("norms_equalized" in sd):
            raise UserError(f"the checkpoint was trained with equalize={not self.equalized}: resume with the same "
                            f"equalize setting")
        keep = [i for i, s in enumerate(sd["steps"]) if before_step is None or s < before_step]
        self.steps = [int(sd["steps"][i]) for i in keep]
        self.norms = [sd["norms"][i] for i in keep]
        if self.equalized:
            self.norms_eq = [sd["norms_equalized"][i] for i in keep]
        self._pending = []


def load_grad_dump(path):
    """Read grad_norms.npz (a run directory or the file) into a dict of arrays."""
    if os.path.isdir(path):
        path = os.path.join(path, "grad_norms.npz")
    if not os.path.isfile(path):
        raise UserError(f"no gradient dump at {path}: train the run with train.py (it writes grad_norms.npz)")
    with np.load(path) as z:
        d = {k: z[k] for k in z.files}
    d["names"] = [str(n) for n in d["names"]]
    d["layer_names"] = [str(n) for n in d["layer_names"]]
    if len(d["steps"]) == 0:
        raise UserError(f"gradient dump {path} holds no steps yet")
    return d


# ---- devices ----------------------------------------------------------------------------------
def autocast_for(device_type, dtype):
    """Context for the compute dtype: 'float32' (the paper), 'tf32' or 'bfloat16' (autocast)."""
    if dtype not in ("float32", "tf32", "bfloat16"):
        raise UserError(f"dtype={dtype!r}: use float32, tf32 or bfloat16")
    torch.backends.cuda.matmul.allow_tf32 = dtype == "tf32"
    torch.backends.cudnn.allow_tf32 = dtype == "tf32"
    if dtype == "bfloat16":
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    return nullcontext()


# dense peak TFLOP/s per GPU (bf16, tf32, fp32), from the vendors' data sheets
_PEAKS = [("H200", (989.4, 494.7, 66.9)), ("H100 NVL", (835.0, 417.5, 60.0)),
          ("H100 PCIe", (756.0, 378.0, 51.0)), ("H100", (989.4, 494.7, 66.9)),
          ("GH200", (989.4, 494.7, 66.9)), ("B200", (2250.0, 1100.0, 80.0)),
          ("A100", (312.0, 156.0, 19.5)), ("A6000", (154.8, 77.4, 38.7)), ("L40S", (362.1, 183.0, 91.6)),
          ("A10", (125.0, 62.5, 31.2)), ("L4", (121.0, 60.0, 30.3)), ("4090", (165.2, 82.6, 82.6))]


def peak_flops(device, dtype):
    """Peak FLOP/s of the device for dtype, looked up by the GPU's name; None where unknown
    (CPU, or a GPU missing from the table: then MFU is not reported)."""
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    col = {"bfloat16": 0, "tf32": 1, "float32": 2}[dtype]
    for key, peaks in _PEAKS:
        if key in name:
            return peaks[col] * 1e12
    return None
