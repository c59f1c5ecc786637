"""
Latency, throughput and TFLOP/s of the paper's models (Table 2), decode speed, training throughput.

    python bench.py                                  # Table 2: all 11 configs, bf16, one 2048-token forward
    python bench.py --dtype float32,bfloat16 --out out/bench/table2.json
    python bench.py vanilla_16l --hf                 # ours vs HF LlamaForCausalLM, same config, same run
    python bench.py --compile max-autotune           # the paper's exact protocol (slow to compile)
    python bench.py --mode decode --prompt_len 128 --new_tokens 128
    python bench.py --mode train vanilla_16l --batch 8      # optimizer steps, MFU, grad-norm dump overhead
    python bench.py tiny/vanilla_16l --device cpu --runs 5  # CPU, tiny configs (tests)

Configs are names under config/ (vanilla_16l, tiny/cascade_a2, ...), paths to *.py files, or
checkpoints (a run directory or ckpt.pt; also --ckpt). Weights are random unless a checkpoint is
given: timing does not depend on them. Inputs are random token ids in [1, vocab), never zeros.

Inference protocol (the paper's, Section 5): model.eval(), no_grad, torch.compile(mode, fullgraph),
one forward of batch x seq tokens (default 1 x 2048, which is what Table 2's cost column implies),
10 warm-up runs, then the median of 100 runs timed with CUDA events. The forward computes the LM
head over all positions, as the paper's cost does. Cost = 2 x (params - input embedding) x tokens
(Table 2's convention); we also report TFLOP/s counting causal attention (model.flops_per_token).

Compile default: mode='default', fullgraph=True. max-autotune (the paper's) benchmarks every GEMM
shape; a tapered model has many and one model can take minutes, so it is opt-in. Compiled kernels
are cached on disk by inductor (--cache_dir, else torch's default /tmp/torchinductor_$USER).

dtypes: float32 = IEEE fp32 matmuls (TF32 off); tf32 = fp32 weights, TF32 tensor cores; bfloat16 =
weights cast to bf16 (--bf16 cast, default: what an inference deployment runs; the RoPE tables stay
fp32) or fp32 weights under autocast (--bf16 autocast: re-casts every weight on every forward, which
reads ~7.5 GB more per run for a 1.2B model). The paper's A100 "fp32" reaches 54 TFLOP/s, above the
A100's 19.5 TFLOP/s fp32 peak, so its matmuls must have run in TF32: compare its numbers with tf32.
"""
import argparse
import gc
import os
import statistics
import sys
import threading
import time
import traceback
from contextlib import nullcontext
from datetime import datetime, timezone

import torch
import torch.nn.functional as F

import common
from common import UserError
from model import GPT, GPTConfig, apply_rope

ROOT = os.path.dirname(os.path.abspath(__file__))
TABLE2 = ["vanilla_16l", "vanilla_15l", "vanilla_14l", "vanilla_13l", "vanilla_12l",
          "cascade_a1", "cascade_a2", "cascade_f1", "cascade_f2", "cascade_c1", "cascade_c2"]
PAPER = {"latency": -8.6, "throughput": 9.4}   # A2 vs Vanilla-15L, Table 2
DTYPES = {"fp32": "float32", "float32": "float32", "tf32": "tf32", "bf16": "bfloat16", "bfloat16": "bfloat16"}
MODES = ["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs", "none"]


# ---- models ---------------------------------------------------------------------------------
def resolve(item):
    """(row name, config path or None, checkpoint path or None) for a CLI item."""
    if os.path.isdir(item) or item.endswith(".pt"):
        if not os.path.exists(common.checkpoint_path(item)):
            raise UserError(f"checkpoint {item} does not exist")
        name = os.path.basename(os.path.normpath(item if os.path.isdir(item) else os.path.dirname(item) or item))
        return name, None, item
    path = item if item.endswith(".py") else os.path.join(ROOT, "config", item + ".py")
    if not os.path.isfile(path):
        raise UserError(f"config {item}: no file {path} (names are config/<name>.py, e.g. vanilla_16l, tiny/cascade_a2)")
    rel = os.path.relpath(os.path.abspath(path), os.path.join(ROOT, "config"))
    return (rel[:-3] if not rel.startswith("..") else os.path.basename(path)[:-3]), path, None


def load_config(item):
    """GPTConfig of a config name or path (the model keys only)."""
    return GPTConfig.from_dict(common.read_config([resolve(item)[1]], model_only=True))


def pretty(name):
    """Table 2's row names: vanilla_15l -> Vanilla-15L, cascade_a2 -> CascadeFormer-A2."""
    prefix, stem = os.path.dirname(name), os.path.basename(name)
    for key, label in (("vanilla_", "Vanilla-"), ("cascade_", "CascadeFormer-")):
        if stem.startswith(key):
            stem = label + stem[len(key):].upper()
    return f"{prefix}/{stem}" if prefix else stem


def build(item, device, seq):
    """Our GPT for a CLI item, on device, fp32, random init unless it is a checkpoint."""
    name, path, ckpt = resolve(item)
    if ckpt:
        model, _ = common.load_model(ckpt, device)
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
    return (len(set(model.heads)) == 1 and len(set(model.ffns)) == 1 and set(model.repeats) == {1}
            and not model.passthrough)


def build_hf(model, device):
    """HF LlamaForCausalLM with our model's (uniform) config: same widths, untied, no biases, RoPE."""
    from transformers import LlamaConfig, LlamaForCausalLM
    c = model.config
    hc = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=model.ffns[0],
                     num_hidden_layers=c.n_layer, num_attention_heads=model.heads[0],
                     num_key_value_heads=model.heads[0], head_dim=c.head_dim, max_position_embeddings=c.block_size,
                     rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta, tie_word_embeddings=False,
                     attention_bias=False, mlp_bias=False, hidden_act="silu", use_cache=False,
                     attn_implementation="sdpa")
    try:
        hc._attn_implementation = "sdpa"   # older transformers ignore the constructor argument
    except Exception:
        pass
    with torch.device(device):
        hf = LlamaForCausalLM(hc)
    return hf


def set_dtype(model, dtype, bf16_mode, device):
    """Apply the compute dtype; returns the autocast context to run under."""
    ctx = common.autocast_for(device.type, dtype)   # also sets the TF32 switches
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


# ---- timing -----------------------------------------------------------------------------------
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


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


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


def stats(ms):
    q = statistics.quantiles(ms, n=4) if len(ms) >= 2 else [ms[0]] * 3
    return {"median_ms": statistics.median(ms), "iqr_ms": q[2] - q[0], "std_ms": statistics.pstdev(ms),
            "min_ms": min(ms), "mean_ms": statistics.fmean(ms), "n": len(ms)}


# ---- inference (Table 2) ----------------------------------------------------------------------
def bench_forward(model, idx, ctx, args, device, label, hf=False):
    model.eval()
    def make(mode, fullgraph):
        m = compiled(model, mode, fullgraph)
        def fwd():
            with torch.no_grad(), ctx:
                return m(input_ids=idx, use_cache=False).logits if hf else m(idx)[0]
        return fwd
    fn, compile_s, note = first_call(make, args.compile, not args.no_fullgraph, label)
    ms = time_calls(fn, args.warmup, args.runs, device, uses_cudagraphs(args.compile))
    profile(fn, label, args, device)
    return stats(ms), compile_s, note


def profile(fn, label, args, device, n=3):
    """--profile: the CUDA kernels of n more calls, by self time, printed and written beside --out."""
    if not args.profile or device.type != "cuda":
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
    if args.out:
        path = os.path.splitext(args.out)[0] + "_profile_" + "".join(c if c.isalnum() else "_" for c in label) + ".txt"
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


def inference_row(item, dtype, args, device):
    B, T = args.batch, args.seq
    name, model = build(item, device, T)
    row = {"config": name, "model": pretty(name), "impl": "ours", "dtype": dtype, "batch": B, "seq": T,
           "tokens": B * T, "params": model.num_params(), "params_non_embedding": model.num_params(False),
           "cost_tflop": cost_tflop(model, B * T), "tflop_with_attention": model.flops_per_token(T) * B * T / 1e12}
    g = torch.Generator().manual_seed(args.seed)
    idx = torch.randint(1, model.config.vocab_size, (B, T), generator=g).to(device)   # never zeros
    ctx = set_dtype(model, dtype, args.bf16, device)
    rows = [row]
    try:
        st, row["compile_s"], row["note"] = bench_forward(model, idx, ctx, args, device, f"{name} ({dtype})")
        row.update(st)
        if args.hf:
            rows.append(hf_row(model, idx, row, dtype, args, device))
    except Exception as e:   # report in the row, keep the table going
        traceback.print_exc()
        row["error"] = one_line(e)
    return rows


def hf_row(model, idx, ours, dtype, args, device):
    """The same config as HF LlamaForCausalLM, compiled the same way, same input."""
    row = {k: ours[k] for k in ("config", "dtype", "batch", "seq", "tokens", "cost_tflop", "tflop_with_attention")}
    row.update(model=f"HF-Llama ({pretty(ours['config'])})", impl="hf-llama")
    try:
        if not uniform(model):
            raise UserError("HF Llama has one width for all layers; this config is tapered")
        hf = build_hf(model, device)
        try:
            row["params"] = sum(p.numel() for p in hf.parameters())
            row["params_non_embedding"] = row["params"] - hf.get_input_embeddings().weight.numel()
            ctx = set_dtype(hf, dtype, args.bf16, device)   # cast: inv_freq too (HF upcasts it in forward)
            st, row["compile_s"], row["note"] = bench_forward(hf, idx, ctx, args, device,
                                                              f"HF Llama {ours['config']} ({dtype})", hf=True)
            row.update(st)
            ours["speedup_vs_hf"] = row["median_ms"] / ours["median_ms"]
            import transformers
            row["transformers"] = transformers.__version__
        finally:
            del hf
            free()
    except Exception as e:
        row["error"] = one_line(e)
        print(f"HF Llama {ours['config']} ({dtype}): {row['error']}", flush=True)
    return row


def ref_row(rows, ref, dtype):
    """The reference row of a dtype: config == ref, else basename == ref (tiny/vanilla_15l)."""
    ok = [b for b in rows if b["impl"] == "ours" and b["dtype"] == dtype and "median_ms" in b]
    return (next((b for b in ok if b["config"] == ref), None)
            or next((b for b in ok if os.path.basename(b["config"]) == ref), None))


def finish_rows(rows, ref, device):
    """Derived columns, and each row relative to the reference row of its dtype."""
    for r in rows:
        if "median_ms" in r:
            s = r["median_ms"] / 1e3
            r["tok_s"] = r["tokens"] / s
            r["tflops"] = r["cost_tflop"] / s
            r["tflops_with_attention"] = r["tflop_with_attention"] / s
            peak = common.peak_flops(device, r["dtype"])
            r["pct_peak_with_attention"] = 100 * r["tflops_with_attention"] * 1e12 / peak if peak else None
    for r in rows:
        base = ref_row(rows, ref, r["dtype"])
        if base and "median_ms" in r:
            r["latency_vs_ref_pct"] = 100 * (r["median_ms"] / base["median_ms"] - 1)
            r["throughput_vs_ref_pct"] = 100 * (r["tok_s"] / base["tok_s"] - 1)


def fmt(x, spec):
    return "" if x is None else format(x, spec)


def num(x, scale=1):
    """Table 2's precision (1.280 B, 4.82 TFLOP) for paper-size numbers, 3 significant digits for tiny ones."""
    if x is None:
        return ""
    x /= scale
    return f"{x:.3f}" if scale > 1 and x >= 0.1 else f"{x:.2f}" if x >= 0.1 else f"{x:.3g}"


def inference_markdown(rows, ref):
    head = ("| model | dtype | params (B) | cost (TFLOP) | latency ms (median) | IQR ms | tok/s | TFLOP/s "
            "| TFLOP/s incl. attn | latency vs " + pretty(ref) + " | throughput vs " + pretty(ref) + " |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        if "median_ms" not in r:
            lines.append(f"| {r['model']} | {r['dtype']} | {num(r.get('params'), 1e9)} | "
                         f"{num(r.get('cost_tflop'))} | {r.get('error', 'not run')} |  |  |  |  |  |  |")
            continue
        rel = lambda k: fmt(r.get(k), "+.1f") + (" %" if r.get(k) is not None else "")
        lines.append(f"| {r['model']} | {r['dtype']} | {num(r['params'], 1e9)} | {num(r['cost_tflop'])} | "
                     f"{r['median_ms']:.2f} | {r['iqr_ms']:.2f} | {r['tok_s']:,.0f} | {num(r['tflops'])} | "
                     f"{num(r['tflops_with_attention'])} | {rel('latency_vs_ref_pct')} | {rel('throughput_vs_ref_pct')} |")
    return "\n".join(lines)


def headlines(rows):
    out = []
    for r in rows:
        if r.get("speedup_vs_hf"):
            out.append(f"{r['model']} ({r['dtype']}): {r['median_ms']:.2f} ms, {r['tflops_with_attention']:.0f} "
                       f"TFLOP/s incl. attn; {r['speedup_vs_hf']:.2f}x faster than HF LlamaForCausalLM")
        if r.get("note"):
            out.append(f"{r['model']} ({r['dtype']}): {r['note']}")
        if r["config"].endswith("cascade_a2") and r.get("latency_vs_ref_pct") is not None:
            out.append(f"{r['model']} vs reference ({r['dtype']}): latency {r['latency_vs_ref_pct']:+.1f} % "
                       f"(paper {PAPER['latency']:+.1f} %), throughput {r['throughput_vs_ref_pct']:+.1f} % "
                       f"(paper {PAPER['throughput']:+.1f} %)")
    return out


# ---- decode -----------------------------------------------------------------------------------
def decode_step(model, tok, pos, cache):
    """One greedy token for every sequence: static shapes (the whole cache is attended with a mask
    of positions <= pos, written in place at pos), so it compiles once and replays as a CUDA graph.
    Same math as GPT.forward with kv_cache and T=1. tok (B, 1), pos 0-d long tensor -> next (B, 1)."""
    B = tok.size(0)
    at = pos.view(1)
    # index_select, not rope_cos[pos]: torch 2.11's fullgraph cannot index with a 0-d tensor
    cos, sin = model.rope_cos.index_select(0, at), model.rope_sin.index_select(0, at)
    x = model.tok_emb(tok)
    L = cache[0][0].size(2)
    mask = (torch.arange(L, device=tok.device) <= pos).view(1, 1, 1, L)
    v = 0
    for i, block in enumerate(model.blocks):
        if i in model.passthrough:
            v += model.repeats[i]
            continue
        a = block.attn
        for _ in range(model.repeats[i]):
            q, k, val = a.qkv(block.attn_norm(x)).view(B, 1, 3, a.n_head, a.head_dim).permute(2, 0, 3, 1, 4)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            kc, vc = cache[v]
            kc.index_copy_(2, at, k.to(kc.dtype))
            vc.index_copy_(2, at, val.to(vc.dtype))
            y = F.scaled_dot_product_attention(q, kc.to(q.dtype), vc.to(q.dtype), attn_mask=mask)
            x = x + a.proj(y.transpose(1, 2).reshape(B, 1, -1))
            x = x + block.ffn(block.ffn_norm(x))
            v += 1
    logits = model.lm_head(model.norm_f(x))
    return logits[:, -1].float().argmax(dim=-1, keepdim=True)


class CpuEvent:
    """torch.cuda.Event's record()/elapsed_time() on the host clock, for CPU runs."""

    def record(self):
        self.t = time.perf_counter()

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3


def greedy_decode(model, prompt, new_tokens, step=None, cache=None, ctx=nullcontext(), events=None):
    """Prefill with GPT.forward, then new_tokens - 1 decode steps: the same tokens as
    model.generate(prompt, new_tokens, temperature=0). events=(start, end) bracket the decode steps."""
    B, P = prompt.shape
    step = step or (lambda t, p, c: decode_step(model, t, p, c))
    cache = cache if cache is not None else model.new_kv_cache(B, P + new_tokens)
    positions = torch.arange(P, P + new_tokens, device=prompt.device)
    mark = getattr(torch.compiler, "cudagraph_mark_step_begin", lambda: None)
    with torch.no_grad(), ctx:
        logits, _ = model(prompt, kv_cache=cache, pos=0, last_only=True)
        out = [prompt, logits[:, -1].float().argmax(dim=-1, keepdim=True)]
        events and events[0].record()
        for s in range(new_tokens - 1):
            mark()
            out.append(step(out[-1], positions[s], cache).clone())   # clone: a CUDA graph reuses its output
        events and events[1].record()
    return torch.cat(out, dim=1)


def decode_row(item, dtype, args, device):
    B, P, N = args.batch, args.prompt_len, args.new_tokens
    if N < 2:
        raise UserError("--new_tokens must be >= 2 (the first new token comes from the prefill)")
    name, model = build(item, device, P + N)
    row = {"config": name, "model": pretty(name), "impl": "ours", "dtype": dtype, "batch": B,
           "prompt_len": P, "new_tokens": N, "params": model.num_params()}
    model.eval()
    ctx = set_dtype(model, dtype, args.bf16, device)
    try:
        g = torch.Generator().manual_seed(args.seed)
        prompt = torch.randint(1, model.config.vocab_size, (B, P), generator=g).to(device)
        cache = model.new_kv_cache(B, P + N, dtype=torch.bfloat16 if dtype == "bfloat16" else torch.float32)
        if uses_cudagraphs(args.compile):   # the cache is written in place: keep it out of graph inputs' copies
            for kv in cache:
                for t in kv:
                    torch._dynamo.mark_static_address(t)
        Event = (lambda: torch.cuda.Event(enable_timing=True)) if device.type == "cuda" else CpuEvent
        ev, times = (Event(), Event()), []
        def make(mode, fullgraph):
            step = compiled(lambda t, p, c: decode_step(model, t, p, c), mode, fullgraph)
            def gen():
                greedy_decode(model, prompt, N, step, cache, ctx, ev)
                sync()
                times.append(ev[0].elapsed_time(ev[1]))
            return gen
        gen, row["compile_s"], row["note"] = first_call(make, args.compile, not args.no_fullgraph, f"{name} decode ({dtype})")
        for _ in range(args.warmup):
            gen()
        times.clear()
        for _ in range(args.runs):
            gen()
        st = stats(times)
        row.update({"decode_ms": st["median_ms"], "decode_iqr_ms": st["iqr_ms"], "n": st["n"],
                    "ms_per_token": st["median_ms"] / (N - 1), "tok_s": B * (N - 1) / (st["median_ms"] / 1e3)})
    except Exception as e:
        traceback.print_exc()
        row["error"] = one_line(e)
    return [row]


def decode_markdown(rows, ref):
    lines = ["| model | dtype | batch | prompt | new tokens | ms/token | tok/s | IQR ms (whole decode) |",
             "|" + "---|" * 8]
    for r in rows:
        if "ms_per_token" not in r:
            lines.append(f"| {r['model']} | {r['dtype']} | {r.get('batch', '')} | | | {r.get('error', 'not run')} | | |")
            continue
        lines.append(f"| {r['model']} | {r['dtype']} | {r['batch']} | {r['prompt_len']} | {r['new_tokens']} | "
                     f"{r['ms_per_token']:.3f} | {r['tok_s']:,.0f} | {r['decode_iqr_ms']:.2f} |")
    return "\n".join(lines)


# ---- training ---------------------------------------------------------------------------------
def train_row(item, dtype, args, device):
    """Full optimizer steps (fwd+bwd, grad clip, fused AdamW), with and without the per-layer
    gradient-norm dump, interleaved in rounds in one process so drift hits both alike. All three
    clip through common.scaled_step (the fused optimizer applies the factor in its own pass).
    Variants: nodump (one total-norm pass over the gradients), dump (as train.py: per-layer norms,
    recorded, and the clip's total taken from them), dump_clip (the dump plus a separate
    total-norm pass: what the dump would cost without that reuse)."""
    B, T = args.batch, args.seq
    name, model = build(item, device, T)
    model.train()
    row = {"config": name, "model": pretty(name), "impl": "ours", "dtype": dtype, "batch": B, "seq": T,
           "tokens": B * T, "params": model.num_params(), "flops_per_token_fwd": model.flops_per_token(T)}
    ctx = common.autocast_for(device.type, dtype)   # training keeps fp32 master weights: autocast
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=2e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=device.type == "cuda")
    lgn = common.LayerGradNorms(model.param_groups_by_layer())
    dump = common.GradNormDump(lgn.names, path=None)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randint(1, model.config.vocab_size, (B, T), generator=g).to(device)
    y = torch.randint(1, model.config.vocab_size, (B, T), generator=g).to(device)
    n_step = [0]
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

        def make(mode, fullgraph):
            m = compiled(model, mode, fullgraph)
            def step(variant="nodump"):
                with ctx:
                    _, loss = m(x, y)
                loss.backward()
                grads = [p.grad for p in params if p.grad is not None]
                total = None
                if variant == "dump":   # train.py's code path
                    norms = lgn()
                    dump.record(n_step[0], norms)
                    total = norms.square().sum().sqrt()
                elif variant == "dump_clip":
                    dump.record(n_step[0], lgn())
                if args.grad_clip:
                    if total is None:
                        total = torch.nn.utils.get_total_norm(grads)
                    common.scaled_step(opt, grads, common.clip_coef(total, args.grad_clip))
                else:
                    opt.step()
                opt.zero_grad(set_to_none=True)
                n_step[0] += 1
            return step
        step, row["compile_s"], row["note"] = first_call(make, args.compile, not args.no_fullgraph, f"{name} train ({dtype})")
        variants = ["nodump", "dump", "dump_clip"]
        times = {v: [] for v in variants}
        per_round = max(1, args.runs // args.rounds)
        for v in variants:
            time_calls(lambda: step(v), args.warmup, 0, device, uses_cudagraphs(args.compile))
        for r in range(args.rounds):
            for v in variants:
                times[v] += time_calls(lambda: step(v), 0, per_round, device, uses_cudagraphs(args.compile))
        peak = common.peak_flops(device, dtype)
        profile(lambda: step("dump"), f"{name} train ({dtype})", args, device, n=2)
        for v in variants:
            st = stats(times[v])
            tok_s = B * T / (st["median_ms"] / 1e3)
            row[v] = {"ms_step": st["median_ms"], "iqr_ms": st["iqr_ms"], "n": st["n"], "tok_s": tok_s,
                      "mfu_pct": 100 * 3 * row["flops_per_token_fwd"] * tok_s / peak if peak else None}
        base = row["nodump"]["ms_step"]
        for v in variants[1:]:
            row[v]["overhead_pct"] = 100 * (row[v]["ms_step"] / base - 1)
        if device.type == "cuda":
            row["max_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    except Exception as e:
        traceback.print_exc()
        row["error"] = one_line(e)
    return [row]


def train_markdown(rows, ref):
    lines = ["| model | dtype | batch x seq | variant | ms/step | IQR ms | tok/s | MFU | dump overhead | peak mem GB |",
             "|" + "---|" * 10]
    for r in rows:
        if "nodump" not in r:
            lines.append(f"| {r['model']} | {r['dtype']} | | {r.get('error', 'not run')} | | | | | | |")
            continue
        for v in ("nodump", "dump", "dump_clip"):
            if v in r:
                s = r[v]
                lines.append(f"| {r['model']} | {r['dtype']} | {r['batch']} x {r['seq']} | {v} | {s['ms_step']:.1f} | "
                             f"{s['iqr_ms']:.1f} | {s['tok_s']:,.0f} | {fmt(s['mfu_pct'], '.1f') + (' %' if s['mfu_pct'] is not None else '')} | "
                             f"{fmt(s.get('overhead_pct'), '+.2f')} | {fmt(r.get('max_memory_gb'), '.1f')} |")
    return "\n".join(lines)


# ---- main -----------------------------------------------------------------------------------
def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="*", help="config names/paths or checkpoints (default: Table 2's 11 configs; "
                   "train: vanilla_16l)")
    p.add_argument("--mode", choices=["inference", "decode", "train"], default="inference")
    p.add_argument("--ckpt", action="append", default=[], help="a checkpoint to time (repeatable)")
    p.add_argument("--dtype", default="bfloat16", help="comma list of float32, tf32, bfloat16 (fp32/bf16 too)")
    p.add_argument("--bf16", choices=["cast", "autocast"], default="cast", help="inference/decode bf16: cast the "
                   "weights (default) or autocast over fp32 weights; training always autocasts")
    p.add_argument("--batch", type=int, default=None, help="default 1 (inference, decode), 8 (train)")
    p.add_argument("--seq", type=int, default=2048, help="tokens per sequence (inference, train)")
    p.add_argument("--compile", choices=MODES + ["eager"], default=None,
                   help="torch.compile mode; default: 'default' on CUDA (decode: reduce-overhead), none on CPU")
    p.add_argument("--no_fullgraph", action="store_true", help="allow graph breaks (default fullgraph=True)")
    p.add_argument("--warmup", type=int, default=None, help="default 10 (inference), 3 (decode, train)")
    p.add_argument("--runs", type=int, default=None, help="timed runs: default 100 (inference), 10 generations "
                   "(decode), 20 steps per variant (train)")
    p.add_argument("--rounds", type=int, default=4, help="train: variants interleaved in this many rounds")
    p.add_argument("--grad_clip", type=float, default=1.0, help="train: clip norm (0 = off), as Table 5")
    p.add_argument("--prompt_len", type=int, default=128)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--ref", default="vanilla_15l", help="reference row for the relative columns")
    p.add_argument("--sdpa", choices=["auto", "flash", "cudnn", "efficient", "math"], default="auto",
                   help="inference/train: allow only this SDPA backend (auto: PyTorch's choice)")
    p.add_argument("--profile", action="store_true", help="CUDA: kernel time per call by kind (matmul, attention, "
                   "other, idle between kernels) and the top kernels of a few extra runs")
    p.add_argument("--hf", action="store_true", help="also time HF LlamaForCausalLM for each uniform config")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="JSON file; the markdown table goes beside it (.md)")
    p.add_argument("--cache_dir", default=None, help="inductor + triton on-disk cache (default: torch's)")
    p.add_argument("--deadline", type=float, default=0, help="seconds: skip models not started by then (0 = none)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    a.compile = "none" if a.compile == "eager" else a.compile
    if a.compile is None:
        a.compile = "none" if not a.device.startswith("cuda") else ("reduce-overhead" if a.mode == "decode" else "default")
    defaults = {"inference": (1, 10, 100), "decode": (1, 3, 10), "train": (8, 3, 20)}[a.mode]
    a.batch = defaults[0] if a.batch is None else a.batch
    a.warmup = defaults[1] if a.warmup is None else a.warmup
    a.runs = defaults[2] if a.runs is None else a.runs
    bad = [d for d in a.dtype.split(",") if d not in DTYPES]
    if bad:
        raise UserError(f"--dtype {bad[0]}: use float32, tf32 or bfloat16 (comma-separated)")
    a.dtypes = list(dict.fromkeys(DTYPES[d] for d in a.dtype.split(",")))
    if min(a.batch, a.seq, a.runs, a.rounds, a.prompt_len) < 1 or a.warmup < 0:
        raise UserError("--batch, --seq, --runs, --rounds, --prompt_len must be >= 1 and --warmup >= 0")
    a.items = a.configs + a.ckpt or (["vanilla_16l"] if a.mode == "train" else TABLE2)
    for it in a.items:
        resolve(it)   # fail on a typo now, not after minutes of compiling
    return a


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA GPU is visible: use --device cpu with a tiny config")
    if args.cache_dir:
        os.makedirs(args.cache_dir, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.abspath(args.cache_dir)
        os.environ["TRITON_CACHE_DIR"] = os.path.join(os.path.abspath(args.cache_dir), "triton")
    if args.compile in ("max-autotune", "max-autotune-no-cudagraphs") and len(args.items) > 2:
        print("note: max-autotune benchmarks every GEMM shape; expect minutes per model", flush=True)
    if args.sdpa != "auto" and args.mode != "decode":   # decode masks the cache: leave it to PyTorch
        for b in ("flash", "cudnn", "mem_efficient", "math"):
            fn = getattr(torch.backends.cuda, f"enable_{b}_sdp", None)
            fn and fn(b == {"efficient": "mem_efficient"}.get(args.sdpa, args.sdpa))
    run_one, table = {"inference": (inference_row, inference_markdown), "decode": (decode_row, decode_markdown),
                      "train": (train_row, train_markdown)}[args.mode]
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    meta = {"mode": args.mode, "device": dev_name, "torch": torch.__version__, "cuda": torch.version.cuda,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python bench.py " + " ".join(argv), "compile": args.compile,
            "fullgraph": not args.no_fullgraph, "bf16": args.bf16, "warmup": args.warmup, "runs": args.runs,
            "batch": args.batch, "seq": args.seq, "ref": args.ref, "sdpa": args.sdpa}
    print(f"bench {args.mode} on {dev_name}, torch {torch.__version__}, compile={args.compile}, "
          f"fullgraph={not args.no_fullgraph}, dtypes={args.dtypes}, batch={args.batch}", flush=True)
    t0, rows = time.time(), []

    def report(final=False):
        if args.mode == "inference":
            finish_rows(rows, args.ref, device)
        md = table(rows, args.ref)
        notes = headlines(rows) if args.mode == "inference" else []
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            header = (f"{args.mode} on {dev_name}, torch {torch.__version__}, {meta['date']}\n\n"
                      f"`{meta['command']}`\n\ncompile={args.compile}, fullgraph={meta['fullgraph']}, bf16={args.bf16}, "
                      f"warm-up {args.warmup}, median of {args.runs}\n\n")
            md_path = os.path.splitext(args.out)[0] + ".md"
            common.atomic_write_json({"meta": meta, "rows": rows}, args.out, indent=1, default=str)
            with open(md_path + ".tmp", "w") as f:
                f.write(header + md + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
            os.replace(md_path + ".tmp", md_path)
        if final:
            print("\n" + md)
            for n in notes:
                print(n)
            if args.out:
                print(f"wrote {args.out} and {os.path.splitext(args.out)[0]}.md")

    for dtype in args.dtypes:
        for item in args.items:
            name = resolve(item)[0]
            if args.deadline and time.time() - t0 > args.deadline:
                rows.append({"config": name, "model": pretty(name), "impl": "ours", "dtype": dtype,
                             "error": "skipped: --deadline reached"})
                continue
            torch.manual_seed(args.seed)
            try:
                new = run_one(item, dtype, args, device)
            except (UserError, KeyboardInterrupt):
                raise
            except Exception as e:   # one model failing (OOM, a compile error) must not kill the table
                traceback.print_exc()
                new = [{"config": name, "model": pretty(name), "impl": "ours", "dtype": dtype,
                        "error": one_line(e)}]
            free()
            rows += new
            report()
            done = [r for r in new if "median_ms" in r or "ms_per_token" in r or "nodump" in r]
            for r in done:
                summary = (f"{r['median_ms']:.2f} ms" if "median_ms" in r else
                           f"{r['ms_per_token']:.3f} ms/token" if "ms_per_token" in r else
                           f"{r['nodump']['ms_step']:.1f} ms/step")
                print(f"  {r['model']} ({dtype}): {summary}", flush=True)
    report(final=True)
    return rows


if __name__ == "__main__":
    common.cli(main)
