"""
The reusable parts of benchmarking (bench.py and the probes in experiments/bench/probes/): models to
time (from a config name, a scale/variant pair or a run; compute dtype; an HF Llama twin),
compile with a progress heartbeat, CUDA-event timing without host syncs between calls, summary
statistics, and the per-kind kernel profile (bench.py --profile).
"""
import gc
import os
import re
import statistics
import threading
import time
from contextlib import nullcontext

import torch

from gfa import rundir
from gfa.cli import UserError, gpt_config
from gfa.data import REPO
from gfa.device import autocast_for, sync
from gfa.hf_llama import check_llama_blocks, hf_config, is_plain_llama
from model import GPT, GPTConfig


# ---- models to time -------------------------------------------------------------------------
def resolve(item):
    """(row name, config files, run directory or None) for a CLI item."""
    if os.path.isdir(item):
        if not os.path.isfile(rundir.file(item, rundir.CKPT)):
            raise UserError(f"{item} holds no checkpoint ({rundir.CKPT}): pass a trained run or a config name")
        return os.path.basename(os.path.normpath(item)), [], item
    if item.endswith(".py"):
        files = [item]
    else:   # vanilla_16l -> config/vanilla_16l.py; small/cascade_a2 -> config/small.py, config/cascade_a2.py
        files = [os.path.join(REPO, "config", part + ".py") for part in item.split("/")]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing and (item.endswith(".pt") or os.path.isfile(item)):
        raise UserError(f"{item}: pass the run directory that holds it (ckpt.pt with model_config.json)")
    if missing and (os.path.isabs(item) or item.startswith(".") or "" in item.split("/")):
        raise UserError(f"{item}: no run directory there (pass a folder holding ckpt.pt and model_config.json)")
    if missing:
        raise UserError(f"{item}: no run directory, and no config file {missing[0]} (names are config/<variant>.py, "
                        f"e.g. vanilla_16l, or <scale>/<variant>, e.g. tiny/cascade_a2)")
    name = item if not item.endswith(".py") else os.path.basename(item)[:-3]
    return name, files, None


def load_config(item):
    """GPTConfig of a config name or path (the model keys only)."""
    return gpt_config(resolve(item)[1])


def item_params(item):
    """Parameters of a CLI item's model, counted on the meta device (nothing allocated)."""
    _, _, run = resolve(item)
    cfg = GPTConfig(**rundir.read_model_config(run, kind="gpt")[1]) if run else load_config(item)
    with torch.device("meta"):
        return GPT(cfg).num_params()


def build(item, device, seq):
    """Our GPT for a CLI item, on device, fp32, random init unless it is a checkpoint."""
    name, _, run = resolve(item)
    if run:
        model, _ = rundir.load_gpt(run, device)
    else:
        cfg = load_config(item)
        cfg.block_size = max(cfg.block_size, seq)   # only sizes the RoPE table
        with torch.device(device):
            model = GPT(cfg)
    if seq > model.config.block_size:
        raise UserError(f"--seq {seq} is longer than {name}'s block_size={model.config.block_size}")
    return name, model


def cost_tflop(model, tokens):
    """Table 2's cost: 2 x (params minus the input embedding) x tokens, in TFLOP."""
    return 2 * model.num_params(include_embedding=False) * tokens / 1e12


def uniform(model):
    return is_plain_llama(model) and set(model.repeats) == {1} and not model.passthrough


def build_hf(model, device):
    """HF LlamaForCausalLM with our model's (uniform) config, as gfa.hf_llama exports it (same widths, K/V heads,
    tying, RoPE), random weights, SDPA attention."""
    check_llama_blocks(model)
    from transformers import LlamaConfig, LlamaForCausalLM
    config = {k: v for k, v in hf_config(model).items() if k not in ("architectures", "model_type", "auto_map")}
    hc = LlamaConfig(**config | {"use_cache": False}, attn_implementation="sdpa")
    try:
        hc._attn_implementation = "sdpa"   # older transformers ignore the constructor argument
    except Exception:
        pass
    with torch.device(device):
        hf = LlamaForCausalLM(hc)
    return hf


def set_dtype(model, dtype, bf16_mode, device):
    """Apply the compute dtype; returns the autocast context to run under."""
    ctx = autocast_for(device.type, dtype)   # also sets the TF32 switches
    if dtype == "bfloat16" and bf16_mode == "cast":
        keep = {n: b for n, b in model.named_buffers() if n.startswith("rope_")}
        model.to(torch.bfloat16)
        for n, b in keep.items():   # RoPE angles stay fp32 (apply_rope computes in fp32)
            setattr(model, n, b)
        ctx = nullcontext()
    return ctx


def free():
    """Release the last model's GPU memory and compiled graphs (call once its frame has returned)."""
    gc.collect()
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- timing -------------------------------------------------------------------------------------


class Progress:
    """Prints 'msg ...' now, a heartbeat while the block runs (compiles can take minutes), and the time."""

    def __init__(self, msg, every=20.0):
        self.msg, self.every, self.stop = msg, every, threading.Event()

    def __enter__(self):
        self.t0 = time.time()
        print(f"{self.msg} ...", flush=True)
        def beat():
            while not self.stop.wait(self.every):
                print(f"  ... {self.msg}: {time.time() - self.t0:.0f} s", flush=True)
        threading.Thread(target=beat, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.elapsed = time.time() - self.t0
        print(f"{self.msg}: {'failed after' if exc[0] else 'done in'} {self.elapsed:.1f} s", flush=True)


def one_line(e, n=300):
    """An exception as 'Type: first line of the message', for a table cell or a note."""
    return f"{type(e).__name__}: {e}".splitlines()[0][:n]


def compiled(fn, mode, fullgraph):
    return fn if mode == "none" else torch.compile(fn, mode=mode, fullgraph=fullgraph)


def uses_cudagraphs(mode):
    return mode in ("reduce-overhead", "max-autotune")


def first_call(make, mode, fullgraph, msg):
    """Compile (on the first call) with progress; if fullgraph fails, report and retry without it.
    make(mode, fullgraph) -> a zero-argument callable. Returns (callable, compile seconds, note)."""
    note = ""
    try:
        fn = make(mode, fullgraph)
        with Progress(f"compiling {msg}" if mode != "none" else f"first run {msg}") as p:
            fn()
            sync()
        return fn, p.elapsed, note
    except Exception as e:
        if mode == "none" or not fullgraph:
            raise
        note = f"fullgraph=True failed ({one_line(e, 200)}); ran fullgraph=False"
        print(f"warning: {msg}: {note}", flush=True)
        torch._dynamo.reset()
        fn = make(mode, False)
        with Progress(f"compiling {msg} (fullgraph=False)") as p:
            fn()
            sync()
        return fn, p.elapsed, note


def time_calls(fn, warmup, runs, device, cudagraphs=False):
    """Milliseconds of each of `runs` calls after `warmup` calls. CUDA: one event pair per call and
    no host sync between calls, so the host runs ahead and launch gaps are not timed."""
    mark = getattr(torch.compiler, "cudagraph_mark_step_begin", None) if cudagraphs else None
    for _ in range(warmup):
        mark and mark()
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(runs)]
        for start, end in ev:
            mark and mark()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) for start, end in ev]
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def copy_bandwidth(device, mib=1024, runs=20):
    """Device-copy bandwidth in GB/s (1e9 bytes): the median of `runs` copies of a mib-MiB buffer into
    another, counting the bytes read and the bytes written. What a memory-bound kernel can reach; the
    decode rows are measured against it (bench.py --mode decode)."""
    n = mib * 2 ** 20
    src, dst = torch.empty(n, dtype=torch.uint8, device=device), torch.empty(n, dtype=torch.uint8, device=device)
    ms = statistics.median(time_calls(lambda: dst.copy_(src), 3, runs, device))
    del src, dst
    return 2 * n / (ms / 1e3) / 1e9


def decode_bytes_per_step(model, batch, cache_len, kv_bytes):
    """Bytes one static-shape decode step must read at least: every weight but the token-embedding
    table (a step gathers only `batch` rows of it; a tied table is read whole as the head), and the
    whole KV cache of every virtual layer that runs (decode_step attends over all cache_len positions
    through a mask)."""
    size = lambda p: p.numel() * p.element_size()
    weights = sum(size(p) for n, p in model.named_parameters() if n != "tok_emb.weight")
    if model.config.tie_embeddings:
        weights += size(model.tok_emb.weight)
    kv = sum(2 * h * model.config.head_dim * cache_len * batch * r
             for i, (h, r) in enumerate(zip(model.kv_heads, model.repeats)) if i not in model.passthrough)
    return weights + kv * kv_bytes


def stats(ms):
    q = statistics.quantiles(ms, n=4) if len(ms) >= 2 else [ms[0]] * 3
    return {"median_ms": statistics.median(ms), "iqr_ms": q[2] - q[0], "std_ms": statistics.pstdev(ms),
            "min_ms": min(ms), "mean_ms": statistics.fmean(ms), "n": len(ms)}


class CpuEvent:
    """torch.cuda.Event's record()/elapsed_time() on the host clock, for CPU runs."""

    def record(self):
        self.t = time.perf_counter()

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3


def profile(fn, label, device, out=None, n=3):
    """The CUDA kernels of n more calls of fn, by self time, printed (and written beside the JSON
    file out, when given): bench.py --profile."""
    if device.type != "cuda":
        return
    from torch.profiler import ProfilerActivity, profile as prof_ctx
    # GPU activity only: recording host-side ops as well slows the host enough to starve the GPU,
    # which shows up as idle time between kernels that the unprofiled runs do not have
    with prof_ctx(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        sync()
    ka = prof.key_averages()
    for key in ("self_device_time_total", "self_cuda_time_total"):
        try:
            text = ka.table(sort_by=key, row_limit=25, max_name_column_width=90)
            break
        except Exception:
            text = "profile table unavailable"
    text = f"{label}: {n} calls\n{kernel_breakdown(prof.events(), n)}\n{text}"
    print(text, flush=True)
    if out:
        path = os.path.splitext(out)[0] + "_profile_" + "".join(c if c.isalnum() else "_" for c in label) + ".txt"
        with open(path, "w") as f:
            f.write(text)


def kernel_kind(name):
    low = name.lower()
    # inductor's element-wise/reduction kernels are named after the ops they feed (the RoPE kernel
    # is "triton_poi_fused__scaled_dot_product_cudnn_attention_..."), so they are never attention
    if low.startswith(("triton_poi", "triton_red", "triton_per")):
        return "other"
    # cuDNN runs only attention in these models (its backward has helper kernels without "sdpa")
    if any(k in low for k in ("sdpa", "flash", "attention", "fmha", "cudnn")):
        return "attention"
    if "nvjet" in low or "gemm" in low or low.startswith(("triton_tem", "sm90_xmma", "cutlass")):
        return "matmul"
    return "other"


def kernel_breakdown(events, n):
    """Per call: GPU kernel time by kind (matmul, attention, other), and the span from the first
    kernel's start to the last one's end; span minus the time covered by kernels is the time the
    GPU sat between kernels."""
    # not kernels: record_function ranges mirrored on the GPU ("Optimizer.step#AdamW.step"), and
    # "Command Buffer Full", CUPTI's marker for a full launch queue
    ks = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA
          and not getattr(e, "is_user_annotation", False) and e.name != "Command Buffer Full"]
    if not ks:
        return "no CUDA kernels recorded"
    dur = lambda e: (e.time_range.end - e.time_range.start) / 1e3 / n   # us -> ms per call
    kinds = {}
    for e in ks:
        kinds[kernel_kind(e.name)] = kinds.get(kernel_kind(e.name), 0.0) + dur(e)
    busy = sum(kinds.values())
    covered, end = 0, None   # union of the kernel intervals: kernels on two streams may overlap
    for a, b in sorted((e.time_range.start, e.time_range.end) for e in ks):
        if end is None or a > end:
            covered, end = covered + (b - a), b
        elif b > end:
            covered, end = covered + (b - end), b
    span = (max(e.time_range.end for e in ks) - min(e.time_range.start for e in ks)) / 1e3 / n
    parts = ", ".join(f"{k} {v:.3f}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))
    return (f"per call: {len(ks) / n:.0f} kernels, busy {busy:.3f} ms ({parts}), span {span:.3f} ms, "
            f"idle between kernels {span - covered / 1e3 / n:.3f} ms")


# ---- train.py itself, as a user runs it (bench.py --mode memory) ---------------------------------------
_PLAN_PEAK = re.compile(r"peak ([\d.]+) GiB \(torch\.cuda\.max_memory_allocated\)")
_MICRO = re.compile(r"= (\d+) per micro-step x (\d+) accumulation")
_STEP = re.compile(r"^step (\d+) \| loss .*? \| ([\d.]+) ms/step \| ([\d,]+) tok/s \| MFU ([^ |]+)"
                   r"(?: \| peak mem ([\d.]+) GiB)?")


def random_tokens(folder, vocab_size, n=1 << 22, seed=0):
    """folder/{train,val}.bin of random token ids: data for timing and memory, which the values do not change."""
    import numpy as np
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        rng.integers(0, vocab_size, n, dtype=np.uint16).tofile(os.path.join(folder, f"{split}.bin"))
    return folder


def read_train_log(text):
    """What train.py's log says about memory and speed: the plan's peak (GiB), the micro-batch and
    accumulation it ran, per step (ms, tok/s, MFU, peak GiB so far), and its error line if it stopped."""
    plan = _PLAN_PEAK.search(text)
    micro = _MICRO.search(text)
    steps = {int(m[1]): {"ms": float(m[2]), "tok_s": float(m[3].replace(",", "")), "mfu": m[4],
                         "peak_gib": float(m[5]) if m[5] else None}
             for m in map(_STEP.match, text.splitlines()) if m}
    error = next((l for l in text.splitlines() if l.startswith("error: ")), None)
    return {"plan_gib": float(plan[1]) if plan else None, "micro": int(micro[1]) if micro else None,
            "accum": int(micro[2]) if micro else None, "steps": steps, "error": error}


def run_train(args, torchrun=False, timeout=600):
    """train.py with args in a subprocess (torchrun with one rank: DDP), as a user runs it: (its log
    read by read_train_log, wall seconds)."""
    import subprocess
    import sys
    cmd = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"] if torchrun else [])
    t0 = time.time()
    try:
        r = subprocess.run(cmd + [os.path.join(REPO, "train.py"), *args], cwd=REPO, capture_output=True, text=True,
                           timeout=timeout)
        text = r.stdout + "\n" + r.stderr
    except subprocess.TimeoutExpired as e:
        out = e.stdout or ""
        text = (out.decode() if isinstance(out, bytes) else out) + f"\nerror: timed out after {timeout} s"
    return read_train_log(text), time.time() - t0
