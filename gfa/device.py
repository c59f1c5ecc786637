"""Devices: which one to run on, the compute dtype, waiting for queued work, and the GPU's peak FLOP/s
(for MFU)."""
from contextlib import nullcontext

import torch

from gfa.cli import UserError

DTYPES = ("float32", "tf32", "bfloat16")


def pick_device(name=""):
    """'' or 'auto': cuda when a GPU is visible, else cpu; otherwise the name as given, checked."""
    if name in ("", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise UserError(f"device={name!r} is not a device this codebase runs on: use cpu, cuda or cuda:<index> "
                        f"(or leave it out: cuda when a GPU is visible, else cpu)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name} but no CUDA GPU is visible: use device=cpu (or leave it out)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"device={name} but only {torch.cuda.device_count()} GPU(s) are visible: use cuda:0.."
                        f"cuda:{torch.cuda.device_count() - 1}")
    return name


def autocast_for(device_type, dtype):
    """Context for the compute dtype: 'float32' (the paper), 'tf32' or 'bfloat16' (autocast)."""
    if dtype not in DTYPES:
        raise UserError(f"dtype={dtype!r}: use float32, tf32 or bfloat16")
    torch.backends.cuda.matmul.allow_tf32 = dtype == "tf32"
    torch.backends.cudnn.allow_tf32 = dtype == "tf32"
    if dtype == "bfloat16":
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    return nullcontext()


def sync():
    """Wait for the GPU's queued work (a no-op without one): what a wall-clock timing must do before it
    reads the clock, or it times the host's launches instead of the work."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# dense peak TFLOP/s per GPU (bf16, tf32, fp32), from the vendors' data sheets
_PEAKS = [("H200", (989.4, 494.7, 66.9)), ("H100 NVL", (835.0, 417.5, 60.0)),
          ("H100 PCIe", (756.0, 378.0, 51.0)), ("H100", (989.4, 494.7, 66.9)),
          ("GH200", (989.4, 494.7, 66.9)), ("B200", (2250.0, 1100.0, 80.0)),
          ("A100", (312.0, 156.0, 19.5)), ("A6000", (154.8, 77.4, 38.7)), ("L40S", (362.1, 183.0, 91.6)),
          ("A10", (125.0, 62.5, 31.2)), ("L4", (121.0, 60.0, 30.3)), ("4090", (165.2, 82.6, 82.6))]


def percent(fraction):
    """A fraction as the log's percentage: one decimal, or two significant digits below 0.1 % (a small
    model's MFU on a large GPU must not read as 0.0 %, which the scaling study would take for no MFU)."""
    pct = 100 * fraction
    return f"{pct:.1f}%" if pct >= 0.1 or pct == 0 else f"{pct:.2g}%"


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
