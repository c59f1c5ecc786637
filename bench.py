"""
Latency, throughput and TFLOP/s of the paper's models (Table 2), decode speed, training throughput.

    python bench.py                                  # Table 2: all 11 configs, bf16, one 2048-token forward
    python bench.py --dtype float32,bfloat16 --out out/bench/table2.json
    python bench.py vanilla_16l --hf                 # ours vs HF LlamaForCausalLM, same config, same run
    python bench.py --compile max-autotune           # the paper's exact protocol (slow to compile)
    python bench.py --mode decode --prompt_len 128 --new_tokens 128
    python bench.py out/layerskip --mode decode --exit_layer 4,8 --draft_len 2,4   # self-speculative (LayerSkip)
    python bench.py --mode train vanilla_16l --batch 8      # optimizer steps, MFU, grad-norm dump overhead
    python bench.py --mode train vanilla_16l --hf           # ... and HF LlamaForCausalLM's step, same run
    python bench.py --mode train vanilla_16l --fsdp         # ... and the step under FSDP (train.py --parallel=fsdp)
    python bench.py --mode train vanilla_16l --fused_ce     # ... and the step with train.py's fused_ce=True
    python bench.py tiny/vanilla_16l --device cpu --runs 5  # CPU, tiny configs (tests)
    python bench.py --mode memory --out out/bench/memory.json   # train.py's memory plan against its measured peak,
                                                     # micro_batch='auto' against hand-picked ones (~8 min, H100)

Configs are variant names under config/ (vanilla_16l, cascade_a2: the paper's 1.2B scale),
SCALE/VARIANT for another scale (small/cascade_a2 = config/small.py + config/cascade_a2.py),
paths to *.py files, or run directories (also --ckpt). Weights are random unless a run is given:
timing does not depend on them. Inputs are random token ids in [1, vocab), never zeros.

Inference protocol (the paper's, Section 5): model.eval(), no_grad, torch.compile(mode, fullgraph),
one forward of batch x seq tokens (default 1 x 2048, which is what Table 2's cost column implies),
10 warm-up runs, then the median of 100 runs timed with CUDA events. The forward computes the LM
head over all positions, as the paper's cost does. Cost = 2 x (params - input embedding) x tokens
(Table 2's convention, docs/paper_notes.md); we also report TFLOP/s counting causal attention
(model.flops_per_token).

Compile default: mode='default', fullgraph=True. max-autotune (the paper's) benchmarks every GEMM
shape; a tapered model has many and one model can take minutes, so it is opt-in. Compiled kernels
are cached on disk by inductor (--cache_dir, else torch's default /tmp/torchinductor_$USER).

dtypes: float32 = IEEE fp32 matmuls (TF32 off); tf32 = fp32 weights, TF32 tensor cores; bfloat16 =
weights cast to bf16 (--bf16 cast, default: what an inference deployment runs; the RoPE tables stay
fp32) or fp32 weights under autocast (--bf16 autocast: re-casts every weight on every forward, which
reads ~7.5 GB more per run for a 1.2B model). The paper's A100 "fp32" reaches 54 TFLOP/s, above the
A100's 19.5 TFLOP/s fp32 peak, so its matmuls must have run in TF32: compare its numbers with tf32.
"""
import functools
import os
import shutil
import statistics
import time
import traceback
from contextlib import nullcontext
from datetime import datetime, timezone

import torch

from gfa import rundir, sharding
from gfa.benchmark import (CpuEvent, build, build_hf, compiled, copy_bandwidth, cost_tflop, decode_bytes_per_step,
                           first_call, free, item_params, load_config, one_line, profile, random_tokens, resolve,
                           run_train, set_dtype, stats, time_calls, uniform, uses_cudagraphs)
from gfa.cli import ArgumentParser, UserError, cli, int_list
from gfa.data import REPO, eval_batches, load_tokens, run_dataset_dir
from gfa.device import autocast_for, peak_flops, pick_device, sync
from gfa.training import GradStep, adamw, clip_coef, scaled_step, teardown
from model import GPT, cross_entropy
TABLE2 = ["vanilla_16l", "vanilla_15l", "vanilla_14l", "vanilla_13l", "vanilla_12l",
          "cascade_a1", "cascade_a2", "cascade_f1", "cascade_f2", "cascade_c1", "cascade_c2"]
PAPER = {"latency": -8.6, "throughput": 9.4}   # A2 vs Vanilla-15L, Table 2
DTYPES = {"fp32": "float32", "float32": "float32", "tf32": "tf32", "bf16": "bfloat16", "bfloat16": "bfloat16"}
MODES = ["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs", "none"]
CPU_MAX_PARAMS = 200e6   # above this (the paper's 1.2B models), a CPU run takes hours: refused


def pretty(name):
    """Table 2's row names: vanilla_15l -> Vanilla-15L, cascade_a2 -> CascadeFormer-A2."""
    prefix, stem = os.path.dirname(name), os.path.basename(name)
    for key, label in (("vanilla_", "Vanilla-"), ("cascade_", "CascadeFormer-")):
        if stem.startswith(key):
            stem = label + stem[len(key):].upper()
    return f"{prefix}/{stem}" if prefix else stem


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
    if args.profile:
        profile(fn, label, device, args.out)
    return stats(ms), compile_s, note


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


def hf_twin_row(model, ours, keys, label, device, measure):
    """A row for HF LlamaForCausalLM built with our model's config (uniform configs only), carrying ours'
    keys: measure(hf, row) fills it in; a failure becomes the row's error, and the HF model is freed."""
    row = {k: ours[k] for k in keys}
    row.update(model=f"HF-Llama ({pretty(ours['config'])})", impl="hf-llama")
    try:
        if not uniform(model):
            raise UserError("HF Llama has one width for all layers; this config is tapered")
        hf = build_hf(model, device)
        try:
            row["params"] = sum(p.numel() for p in hf.parameters())
            measure(hf, row)
            import transformers
            row["transformers"] = transformers.__version__
        finally:
            del hf
            free()
    except Exception as e:
        row["error"] = one_line(e)
        print(f"{label}: {row['error']}", flush=True)
    return row


def hf_row(model, idx, ours, dtype, args, device):
    """The same config as HF LlamaForCausalLM, compiled the same way, same input."""
    label = f"HF Llama {ours['config']} ({dtype})"

    def measure(hf, row):
        row["params_non_embedding"] = row["params"] - hf.get_input_embeddings().weight.numel()
        ctx = set_dtype(hf, dtype, args.bf16, device)   # cast: inv_freq too (HF upcasts it in forward)
        st, row["compile_s"], row["note"] = bench_forward(hf, idx, ctx, args, device, label, hf=True)
        row.update(st)
        ours["speedup_vs_hf"] = row["median_ms"] / ours["median_ms"]
    return hf_twin_row(model, ours, ("config", "dtype", "batch", "seq", "tokens", "cost_tflop", "tflop_with_attention"),
                       label, device, measure)


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
            peak = peak_flops(device, r["dtype"])
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
        if r.get("speedup_vs_hf") and "nodump" in r:   # a training step
            s = r["nodump"]
            out.append(f"{r['model']} train ({r['dtype']}): {s['ms_step']:.1f} ms/step" + (
                f", MFU {s['mfu_pct']:.1f} %" if s["mfu_pct"] else "") + f"; {r['speedup_vs_hf']:.2f}x faster than "
                f"HF LlamaForCausalLM (the same step)")
        elif r.get("speedup_vs_hf"):
            out.append(f"{r['model']} ({r['dtype']}): {r['median_ms']:.2f} ms, {r['tflops_with_attention']:.0f} "
                       f"TFLOP/s incl. attn; {r['speedup_vs_hf']:.2f}x faster than HF LlamaForCausalLM")
        if "fused" in r and "dump" in r:
            f, d = r["fused"], r["dump"]
            mem = f", peak memory {d['max_memory_gb']:.1f} -> {f['max_memory_gb']:.1f} GB" if f["max_memory_gb"] else ""
            out.append(f"{r['model']} train ({r['dtype']}): fused LM head + CE {f['ms_step']:.1f} ms/step vs "
                       f"{d['ms_step']:.1f} ({f['overhead_pct']:+.1f} %){mem}")
        if r.get("note"):
            out.append(f"{r['model']} ({r['dtype']}): {r['note']}")
        if r["config"].endswith("cascade_a2") and r.get("latency_vs_ref_pct") is not None:
            out.append(f"{r['model']} vs reference ({r['dtype']}): latency {r['latency_vs_ref_pct']:+.1f} % "
                       f"(paper {PAPER['latency']:+.1f} %), throughput {r['throughput_vs_ref_pct']:+.1f} % "
                       f"(paper {PAPER['throughput']:+.1f} %)")
    return out


# ---- decode -----------------------------------------------------------------------------------
def greedy_decode(model, prompt, new_tokens, step=None, cache=None, ctx=nullcontext(), events=None):
    """Prefill with GPT.forward, then new_tokens - 1 decode steps: the same tokens as
    model.generate(prompt, new_tokens, temperature=0). events=(start, end) bracket the decode steps."""
    B, P = prompt.shape
    step = step or model.decode_step
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
    """Rows of greedy KV-cache decoding, one per --batch: ms/token, tok/s, and the bytes a step must read
    (weights + the whole static cache) per second, against the device-copy bandwidth measured in this run."""
    P, N = args.prompt_len, args.new_tokens
    if N < 2:
        raise UserError("--new_tokens must be >= 2 (the first new token comes from the prefill)")
    name, model = build(item, device, P + N)
    model.eval()
    ctx = set_dtype(model, dtype, args.bf16, device)
    rows = []
    for B in args.batches:
        row = {"config": name, "model": pretty(name), "impl": "ours", "dtype": dtype, "batch": B,
               "prompt_len": P, "new_tokens": N, "params": model.num_params()}
        try:
            row.update(time_decode(model, name, B, dtype, ctx, args, device))
        except Exception as e:
            traceback.print_exc()
            row["error"] = one_line(e)
        rows.append(row)
        free()   # the compiled step of this batch size goes before the next compiles its own
    return rows + (speculative_rows(item, name, model, dtype, ctx, args) if args.exit_layers else [])


def static_cache(model, batch, length, dtype, compile_mode):
    """The model's KV cache for static-shape steps. Under CUDA graphs it is marked static: the steps
    write it in place, so the graphs must not copy it in as an input."""
    cache = model.new_kv_cache(batch, length, dtype=dtype)
    if uses_cudagraphs(compile_mode):
        for kv in cache:
            for t in kv:
                torch._dynamo.mark_static_address(t)
    return cache


def time_decode(model, name, B, dtype, ctx, args, device):
    P, N = args.prompt_len, args.new_tokens
    g = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(1, model.config.vocab_size, (B, P), generator=g).to(device)
    kv_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    cache = static_cache(model, B, P + N, kv_dtype, args.compile)
    Event = (lambda: torch.cuda.Event(enable_timing=True)) if device.type == "cuda" else CpuEvent
    ev, times = (Event(), Event()), []

    def make(mode, fullgraph):
        step = compiled(model.decode_step, mode, fullgraph)

        def gen():
            greedy_decode(model, prompt, N, step, cache, ctx, ev)
            sync()
            times.append(ev[0].elapsed_time(ev[1]))
        return gen
    gen, compile_s, note = first_call(make, args.compile, not args.no_fullgraph, f"{name} decode, batch {B} ({dtype})")
    for _ in range(args.warmup):
        gen()
    times.clear()
    for _ in range(args.runs):
        gen()
    st = stats(times)
    if args.profile:   # one whole generation: its kernels divided by N - 1 are a step's
        profile(gen, f"{name} decode batch {B} ({dtype}), one call = {N - 1} decode steps", device, args.out, n=1)
    ms_token = st["median_ms"] / (N - 1)
    read_gbps = decode_bytes_per_step(model, B, P + N, kv_dtype.itemsize) / (ms_token / 1e3) / 1e9
    return {"compile_s": compile_s, "note": note, "decode_ms": st["median_ms"], "decode_iqr_ms": st["iqr_ms"],
            "n": st["n"], "ms_per_token": ms_token, "tok_s": B * (N - 1) / (st["median_ms"] / 1e3),
            "read_gbps": read_gbps, "copy_gbps": args.copy_gbps, "pct_of_copy_bw": 100 * read_gbps / args.copy_gbps}


# ---- self-speculative decoding (LayerSkip) ------------------------------------------------------
def replayed(fn):
    """fn as CUDA-graph replay needs it: a new step marked, its outputs copied out (the graph reuses them)."""
    mark = getattr(torch.compiler, "cudagraph_mark_step_begin", lambda: None)

    def call(*a):
        mark()
        out = fn(*a)
        return tuple(t.clone() for t in out) if isinstance(out, tuple) else out.clone()
    return call


def decode_prompts(item, vocab_size, n, P, seed, device):
    """n prompts of P tokens, and where they come from: windows of the held-out text of a run whose
    dataset is here (what a trained model's acceptance rate is about), else random ids."""
    run = resolve(item)[2]
    folder = run and run_dataset_dir(rundir.read_checkpoint(run).get("train_config"))
    val = folder and os.path.join(folder, "val.bin")
    if val and os.path.isfile(val):
        x, _ = next(eval_batches(load_tokens(val, vocab_size), P, n, 1))
        return [x[i:i + 1].to(device) for i in range(n)], val
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab_size, (1, P), generator=g).to(device) for _ in range(n)], "random ids"


def time_generations(gen, prompts):
    """(seconds of each generation, outputs) of gen(prompt) for every prompt: host clock after a device
    sync on both ends, so the prefill and the per-round host syncs of self-speculation count."""
    times, outs = [], []
    for p in prompts:
        sync()
        t = time.perf_counter()
        outs.append(gen(p))
        sync()
        times.append(time.perf_counter() - t)
    return times, outs


def speculative_rows(item, name, model, dtype, ctx, args):
    """Self-speculative decoding at every (--exit_layer E, --draft_len d): acceptance rate (drafts kept
    / drafted) and tok/s against plain greedy decoding, both compiled alike (draft_step, verify_step and
    decode_step) and timed per whole generation on the same --runs prompts, batch 1; and on how many
    prompts the tokens equal plain greedy decoding's."""
    P, N = args.prompt_len, args.new_tokens
    device = model.lm_head.weight.device
    prompts, source = decode_prompts(item, model.config.vocab_size, args.runs, P, args.seed, device)
    cache = static_cache(model, 1, P + N + max(args.draft_lens), torch.bfloat16 if dtype == "bfloat16" else
                         torch.float32, args.compile)
    base = {"config": name, "model": pretty(name), "dtype": dtype, "prompts": len(prompts), "prompt_source": source,
            "prompt_len": P, "new_tokens": N}

    def timed(label, make_gen):
        """Compile (first_call) and warm up on the first prompt, then time every prompt."""
        gen = [None]

        def make(mode, fullgraph):
            gen[0] = make_gen(mode, fullgraph)
            return lambda: gen[0](prompts[0])
        _, compile_s, note = first_call(make, args.compile, not args.no_fullgraph, label)
        for _ in range(args.warmup):
            gen[0](prompts[0])
        times, outs = time_generations(gen[0], prompts)
        return {"tok_s": len(prompts) * N / sum(times), "compile_s": compile_s, "note": note}, outs

    def plain_gen(mode, fullgraph):
        step = compiled(model.decode_step, mode, fullgraph)
        return lambda p: greedy_decode(model, p, N, step, cache, ctx)
    plain, plain_out = timed(f"{name} plain decode ({dtype})", plain_gen)
    rows = [dict(base, impl="plain", **plain)]
    for E in args.exit_layers:
        for d in args.draft_lens:
            row = dict(base, impl="self-spec", exit_layer=E, draft_len=d)
            try:
                free()   # every (E, d) compiles its own graphs
                def make_gen(mode, fullgraph):
                    draft = replayed(compiled(model.draft_step, mode, fullgraph))
                    verify = replayed(compiled(model.verify_step, mode, fullgraph))
                    return lambda p: model.generate_self_speculative(p, N, E, d, draft, verify, cache)
                with ctx:
                    res, outs = timed(f"{name} self-speculative E={E} d={d} ({dtype})", make_gen)
                rounds, drafted, accepted = (sum(s[k] for _, s in outs) for k in ("rounds", "drafted", "accepted"))
                row.update(res, acceptance=accepted / drafted, tokens_per_round=(rounds + accepted) / rounds,
                           speedup=res["tok_s"] / plain["tok_s"],
                           same_tokens=sum(torch.equal(t, want) for (t, _), want in zip(outs, plain_out)))
            except Exception as e:
                traceback.print_exc()
                row["error"] = one_line(e)
            rows.append(row)
    return rows


def decode_markdown(rows, ref):
    spec = [r for r in rows if r.get("impl") in ("plain", "self-spec")]
    rows = [r for r in rows if r not in spec]
    lines = ["| model | dtype | batch | prompt | new tokens | ms/token | tok/s | IQR ms (whole decode) "
             "| GB/s read | % of copy bandwidth |", "|" + "---|" * 10]
    for r in rows:
        if "ms_per_token" not in r:
            lines.append(f"| {r['model']} | {r['dtype']} | {r.get('batch', '')} | | | {r.get('error', 'not run')} "
                         f"| | | | |")
            continue
        lines.append(f"| {r['model']} | {r['dtype']} | {r['batch']} | {r['prompt_len']} | {r['new_tokens']} | "
                     f"{r['ms_per_token']:.3f} | {r['tok_s']:,.0f} | {r['decode_iqr_ms']:.2f} | "
                     f"{r['read_gbps']:,.0f} | {r['pct_of_copy_bw']:.1f} |")
    if any("copy_gbps" in r for r in rows):
        lines += ["", f"Device-copy bandwidth, this run: {next(r['copy_gbps'] for r in rows if 'copy_gbps' in r):,.0f} "
                  "GB/s (read + written). GB/s read: the weights (all but the embedding table) and the whole "
                  "static KV cache, once per step."]
    if spec:
        lines += ["", "Self-speculative decoding (batch 1, whole generations incl. prefill, "
                  f"{spec[0]['prompts']} prompts from {spec[0]['prompt_source']}):", "",
                  "| model | dtype | decoding | exit layer E | draft d | acceptance | tokens/round | tok/s | speed-up "
                  "| same tokens as plain |", "|" + "---|" * 10]
        for r in spec:
            what = "plain greedy" if r["impl"] == "plain" else "self-speculative"
            if "tok_s" not in r:
                lines.append(f"| {r['model']} | {r['dtype']} | {what} | {r.get('exit_layer', '')} | "
                             f"{r.get('draft_len', '')} | {r.get('error', 'not run')} | | | | |")
            elif r["impl"] == "plain":
                lines.append(f"| {r['model']} | {r['dtype']} | {what} | | | | 1 | {r['tok_s']:,.1f} | 1.00x | |")
            else:
                lines.append(f"| {r['model']} | {r['dtype']} | {what} | {r['exit_layer']} | {r['draft_len']} | "
                             f"{100 * r['acceptance']:.1f} % | {r['tokens_per_round']:.2f} | {r['tok_s']:,.1f} | "
                             f"{r['speedup']:.2f}x | {r['same_tokens']}/{r['prompts']} |")
    return "\n".join(lines)


# ---- training ---------------------------------------------------------------------------------
def train_steps(model, loss_of, ctx, args, device):
    """make(mode, fullgraph) -> step(variant): one full optimizer step (fwd+bwd, grad clip, fused
    AdamW) in one of four variants; loss_of(compiled model) is the forward and loss. dump:
    train.py's own code path (gfa.training.GradStep: per-layer norms, recorded, the clip's total
    taken from them); nodump: one total-norm pass instead; dump_clip: the dump plus that separate
    total-norm pass (what the dump would cost without the reuse); fused: dump with train.py's
    fused_ce=True (GPT.set_fused_ce; a second compiled graph, the switch being a static attribute).
    All clip through gfa.training.scaled_step. A model without per-layer groups (HF Llama) has nodump only."""
    opt = adamw(model.parameters(), 2e-4, (0.9, 0.95), 0.1, fused=device.type == "cuda")
    params = [p for p in model.parameters() if p.requires_grad]
    grad_step = GradStep(model.param_groups_by_layer(), opt, args.grad_clip) if isinstance(model, GPT) else None
    dump = rundir.GradNormDump(grad_step.norms.names, path=None) if grad_step else None
    n_step = [0]

    def make(mode, fullgraph):
        m = compiled(model, mode, fullgraph)

        def step(variant="nodump"):
            if grad_step:
                model.set_fused_ce(args.fused_ce_chunk if variant == "fused" else 0)
            with ctx:
                loss = loss_of(m)
            loss.backward()
            if variant in ("dump", "fused"):
                dump.record(n_step[0], grad_step()[0])
            else:
                if variant == "dump_clip":
                    dump.record(n_step[0], grad_step.norms())
                grads = [p.grad for p in params if p.grad is not None]
                if args.grad_clip:
                    scaled_step(opt, grads, clip_coef(torch.nn.utils.get_total_norm(grads), args.grad_clip))
                else:
                    opt.step()
                opt.zero_grad(set_to_none=True)
            n_step[0] += 1
        return step
    return make


def time_train_variants(make, variants, label, args, device):
    """Compile, then time the step variants interleaved in args.rounds rounds (drift hits all alike).
    Returns (step, {variant: ms per step}, {variant: peak GB over its timed steps (CUDA) or None}, compile s, note)."""
    step, compile_s, note = first_call(make, args.compile, not args.no_fullgraph, label)
    times, peak = {v: [] for v in variants}, {v: None for v in variants}
    per_round = max(1, args.runs // args.rounds)
    for v in variants:
        time_calls(lambda: step(v), args.warmup, 0, device, uses_cudagraphs(args.compile))
    for r in range(args.rounds):
        for v in variants:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            times[v] += time_calls(lambda: step(v), 0, per_round, device, uses_cudagraphs(args.compile))
            if device.type == "cuda":
                peak[v] = max(peak[v] or 0, torch.cuda.max_memory_allocated() / 1e9)
    return step, times, peak, compile_s, note


def step_stats(ms, tokens, flops_per_token, peak):
    st = stats(ms)
    tok_s = tokens / (st["median_ms"] / 1e3)
    return {"ms_step": st["median_ms"], "iqr_ms": st["iqr_ms"], "n": st["n"], "tok_s": tok_s,
            "mfu_pct": 100 * 3 * flops_per_token * tok_s / peak if peak else None}


def train_row(item, dtype, args, device):
    """The three train_steps variants, interleaved in rounds in one process so drift hits all alike."""
    B, T = args.batch, args.seq
    name, model = build(item, device, T)
    model.train()
    row = {"config": name, "model": pretty(name), "impl": "ours", "dtype": dtype, "batch": B, "seq": T,
           "tokens": B * T, "params": model.num_params(), "flops_per_token_fwd": model.train_flops_per_token(T)}
    ctx = autocast_for(device.type, dtype)   # training keeps fp32 master weights: autocast
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randint(1, model.config.vocab_size, (B, T), generator=g).to(device)
    y = torch.randint(1, model.config.vocab_size, (B, T), generator=g).to(device)
    try:   # peak memory: time_train_variants' own, per variant
        make = train_steps(model, lambda m: m(x, y)[1], ctx, args, device)
        variants = ["nodump", "dump", "dump_clip"] + (["fused"] if args.fused_ce else [])
        step, times, peak, row["compile_s"], row["note"] = time_train_variants(
            make, variants, f"{name} train ({dtype})", args, device)
        if args.profile:
            profile(functools.partial(step, "dump"), f"{name} train ({dtype})", device, args.out, n=2)
        del make, step   # the optimizer state goes before HF Llama's comes
        for v in variants:
            row[v] = step_stats(times[v], B * T, row["flops_per_token_fwd"], peak_flops(device, dtype))
            row[v]["max_memory_gb"] = peak[v]
        for v in variants[1:]:   # the fused step against the same step unfused (dump), the others against nodump
            base = row["dump" if v == "fused" else "nodump"]["ms_step"]
            row[v]["overhead_pct"] = 100 * (row[v]["ms_step"] / base - 1)
    except Exception as e:
        traceback.print_exc()
        row["error"] = one_line(e)
        return [row]
    free()
    return ([row] + ([hf_train_row(model, x, y, ctx, row, args, device)] if args.hf else [])
            + ([fsdp_train_row(item, x, y, ctx, row, args, device)] if args.fsdp else []))


def fsdp_train_row(item, x, y, ctx, ours, args, device):
    """The same model and step under train.py's parallel=fsdp (gfa.sharding over a process group of one:
    compiled per block, bf16 gathering), timed as our dump step (train.py's), against which it is reported."""
    row = {k: ours[k] for k in ("config", "dtype", "batch", "seq", "tokens", "params", "flops_per_token_fwd")}
    row.update(model=f"{ours['model']} FSDP", impl="ours-fsdp")
    d = sharding.setup("fsdp", args.device)
    try:
        torch.manual_seed(args.seed)
        _, model = build(item, torch.device("cpu"), args.seq)   # fully_shard moves each shard to the device
        model.train()
        sharding.shard(model, d, ours["dtype"], compile=args.compile != "none")
        make = train_steps(model, lambda m: m(x, y)[1], ctx, args, device)
        _, times, peak, row["compile_s"], row["note"] = time_train_variants(
            lambda mode, fullgraph: make("none", fullgraph),   # compiled per block by shard()
            ["dump"], f"{ours['model']} FSDP train ({ours['dtype']})", args, device)
        row["dump"] = step_stats(times["dump"], ours["tokens"], ours["flops_per_token_fwd"],
                                 peak_flops(device, ours["dtype"]))
        row["dump"]["overhead_pct"] = 100 * (row["dump"]["ms_step"] / ours["dump"]["ms_step"] - 1)
        row["dump"]["max_memory_gb"] = peak["dump"]
    except Exception as e:
        traceback.print_exc()
        row["error"] = one_line(e)
    finally:
        teardown(d)
    return row


def hf_train_row(model, x, y, ctx, ours, args, device):
    """HF LlamaForCausalLM with the same config, its training step timed as our nodump step: the
    same batch, the same loss (model.cross_entropy over every position), compile, fused AdamW, clip."""
    label = f"HF Llama {ours['config']} train ({ours['dtype']})"

    def measure(hf, row):
        hf.train()
        make = train_steps(hf, lambda m: cross_entropy(m(input_ids=x, use_cache=False).logits, y), ctx, args, device)
        _, times, peak, row["compile_s"], row["note"] = time_train_variants(make, ["nodump"], label, args, device)
        row["nodump"] = step_stats(times["nodump"], ours["tokens"], ours["flops_per_token_fwd"],
                                   peak_flops(device, ours["dtype"]))
        row["nodump"]["max_memory_gb"] = peak["nodump"]
        ours["speedup_vs_hf"] = row["nodump"]["ms_step"] / ours["nodump"]["ms_step"]
    return hf_twin_row(model, ours, ("config", "dtype", "batch", "seq", "tokens", "flops_per_token_fwd"), label,
                       device, measure)


def train_markdown(rows, ref):
    lines = ["| model | dtype | batch x seq | variant | ms/step | IQR ms | tok/s | MFU | overhead % | peak mem GB |",
             "|" + "---|" * 10]
    for r in rows:   # overhead: vs the model's nodump step; fused and an FSDP row's dump step vs our (DDP-path) dump step
        if not any(v in r for v in ("nodump", "dump")):
            lines.append(f"| {r['model']} | {r['dtype']} | | {r.get('error', 'not run')} | | | | | | |")
            continue
        for v in ("nodump", "dump", "dump_clip", "fused"):
            if v in r:
                s = r[v]
                lines.append(f"| {r['model']} | {r['dtype']} | {r['batch']} x {r['seq']} | {v} | {s['ms_step']:.1f} | "
                             f"{s['iqr_ms']:.1f} | {s['tok_s']:,.0f} | {fmt(s['mfu_pct'], '.1f') + (' %' if s['mfu_pct'] is not None else '')} | "
                             f"{fmt(s.get('overhead_pct'), '+.2f')} | {fmt(s.get('max_memory_gb'), '.1f')} |")
    return "\n".join(lines)


# ---- memory: train.py's plan against its measured peak; micro_batch='auto' against hand-picked ----------
# item:dtype:variant:micro. variant: plain (one process), ddp (torchrun, one rank), ckpt (activation checkpointing),
# fsdp (--parallel=fsdp, one process);
# micro: auto, a number, or half (half of what auto picked for the same item, dtype and variant)
MEMORY_SET = ["small/vanilla_16l:float32:ddp:auto", "small/vanilla_16l:bfloat16:ckpt:auto",
              "vanilla_16l:bfloat16:plain:auto", "vanilla_16l:bfloat16:plain:half",
              "vanilla_16l:float32:plain:auto", "vanilla_16l:float32:plain:half",
              "small/vanilla_16l:bfloat16:fsdp:auto", "small/vanilla_16l:float32:plain:auto"]


def memory_row(spec, args, data, picked):
    """One train.py run (a subprocess, as a user runs it: compiled, the default allocator setting) on random
    tokens: args.runs steps of global batch args.batch, lr 0 (nothing to save); the plan's peak against
    torch.cuda.max_memory_allocated from its log, and the median step time from step 2 on."""
    item, dtype, variant, micro = spec.split(":")
    if micro == "half":
        micro = str(max(1, picked.get((item, dtype, variant), 2) // 2))
    name, files, _ = resolve(item)
    row = {"config": name, "model": pretty(name), "dtype": dtype, "variant": variant, "requested": micro,
           "batch": args.batch}
    flags = [f"--data_dir={data}", f"--out_dir={os.path.join(data, 'run')}", "--overwrite=True", f"--dtype={dtype}",
             f"--batch_size={args.batch}", f"--max_iters={args.runs}", "--eval_iters=1", "--log_interval=1",
             "--learning_rate=0.0", "--min_lr=0.0", "--warmup_iters=0", "--always_save_checkpoint=False",
             f"--micro_batch={micro}", f"--activation_checkpointing={variant == 'ckpt'}",
             f"--parallel={'fsdp' if variant == 'fsdp' else 'ddp'}"]
    log, row["wall_s"] = run_train(files + flags, torchrun=variant == "ddp", timeout=300)
    row.update({k: log[k] for k in ("plan_gib", "micro", "accum", "error")})
    timed = [s for i, s in log["steps"].items() if i >= 2]
    if log["steps"]:
        row["measured_gib"] = max(s["peak_gib"] or 0 for s in log["steps"].values())
    if row.get("measured_gib") and row["plan_gib"]:
        row["plan_error_pct"] = 100 * (row["plan_gib"] / row["measured_gib"] - 1)
    if timed:
        row["ms_step"] = statistics.median(s["ms"] for s in timed)
        row["tok_s"] = args.batch * load_config(item).block_size / (row["ms_step"] / 1e3)
        row["mfu"] = timed[-1]["mfu"]
    if micro == "auto" and row["micro"]:
        picked[(item, dtype, variant)] = row["micro"]
    shutil.rmtree(os.path.join(data, "run"), ignore_errors=True)
    return row


def memory_markdown(rows):
    lines = ["| model | dtype | variant | micro-batch | plan peak GiB | measured GiB | plan error | ms/step | tok/s | MFU "
             "| vs best of its group |", "|" + "---|" * 11]
    best = {}
    for r in rows:   # throughput: each run against the fastest of the same model, dtype and variant
        if r.get("tok_s"):
            key = (r["config"], r["dtype"], r["variant"])
            best[key] = max(best.get(key, 0), r["tok_s"])
    for r in rows:
        if r.get("error") and not r.get("tok_s"):
            lines.append(f"| {r['model']} | {r['dtype']} | {r['variant']} | {r['requested']} | "
                         f"{fmt(r.get('plan_gib'), '.2f')} | | | {r['error']} | | | |")
            continue
        rel = 100 * (r["tok_s"] / best[(r["config"], r["dtype"], r["variant"])] - 1) if r.get("tok_s") else None
        micro = f"{r['micro']} x {r['accum']}" + (" (auto)" if r["requested"] == "auto" else "")
        lines.append(f"| {r['model']} | {r['dtype']} | {r['variant']} | {micro} | {fmt(r.get('plan_gib'), '.2f')} | "
                     f"{fmt(r.get('measured_gib'), '.2f')} | {fmt(r.get('plan_error_pct'), '+.1f')}{' %' * ('plan_error_pct' in r)} | "
                     f"{fmt(r.get('ms_step'), '.1f')} | {fmt(r.get('tok_s'), ',.0f')} | {r.get('mfu', '')} | "
                     f"{fmt(rel, '+.1f')}{' %' * (rel is not None)} |")
    return "\n".join(lines)


def memory_main(args, argv):
    """bench.py --mode memory: MEMORY_SET (or --specs), each a train.py run; the table, and --out."""
    if not args.device.startswith("cuda"):
        raise UserError("--mode memory measures GPU memory: it needs a CUDA GPU")
    dev_name = torch.cuda.get_device_name(0)
    rows, picked, t0 = [], {}, time.time()
    data = random_tokens(os.path.join(REPO, "out/bench/memory_data"), 50257)
    print(f"bench memory on {dev_name}, torch {torch.__version__}: {len(args.specs)} train.py runs", flush=True)
    for spec in args.specs:
        if args.deadline and time.time() - t0 > args.deadline:
            rows.append({"model": spec, "dtype": "", "variant": "", "requested": "", "error": "skipped: --deadline"})
            continue
        rows.append(memory_row(spec, args, data, picked))
        r = rows[-1]
        print(f"  {spec}: micro {r.get('micro')} x {r.get('accum')}, plan {r.get('plan_gib')} GiB, measured "
              f"{r.get('measured_gib')} GiB, {fmt(r.get('ms_step'), '.1f')} ms/step ({r['wall_s']:.0f} s)"
              + (f"; {r['error']}" if r.get("error") else ""), flush=True)
    md = memory_markdown(rows)
    print("\n" + md)
    if args.out:
        meta = {"mode": "memory", "device": dev_name, "torch": torch.__version__, "command": "python bench.py " +
                " ".join(argv), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        rundir.atomic_write_json({"meta": meta, "rows": rows}, args.out, indent=1, default=str)
        rundir.atomic_write_text(f"memory on {dev_name}, torch {torch.__version__}, {meta['date']}\n\n"
                                 f"`{meta['command']}`\n\n{md}\n", os.path.splitext(args.out)[0] + ".md")
    return rows


# ---- main -----------------------------------------------------------------------------------
def parser():
    """bench.py's options (--help lists them with their defaults)."""
    p = ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("configs", nargs="*", help="config names/paths or checkpoints (default: Table 2's 11 configs; "
                   "train: vanilla_16l)")
    p.add_argument("--mode", choices=["inference", "decode", "train", "memory"], default="inference",
                   help="inference: Table 2's forward; decode: KV-cache generation; train: optimizer steps")
    p.add_argument("--ckpt", action="append", default=[], help="a run directory to time (repeatable)")
    p.add_argument("--dtype", default="bfloat16", help="comma list of float32, tf32, bfloat16 (fp32/bf16 too)")
    p.add_argument("--bf16", choices=["cast", "autocast"], default="cast", help="inference/decode bf16: cast the "
                   "weights (default) or autocast over fp32 weights; training always autocasts")
    p.add_argument("--batch", default=None, help="default 1 (inference, decode), 8 (train), 16 (memory: the global "
                   "batch of each train.py run); decode: a comma list, e.g. 1,16 (a row each)")
    p.add_argument("--seq", type=int, default=2048, help="tokens per sequence (inference, train)")
    p.add_argument("--compile", choices=MODES + ["eager"], default=None,
                   help="torch.compile mode; default: 'default' on CUDA (decode: reduce-overhead), none on CPU")
    p.add_argument("--no_fullgraph", action="store_true", help="allow graph breaks (default fullgraph=True)")
    p.add_argument("--warmup", type=int, default=None, help="default 10 (inference), 3 (decode, train)")
    p.add_argument("--runs", type=int, default=None, help="timed runs: default 100 (inference), 10 generations "
                   "(decode), 20 steps per variant (train), 6 train.py steps (memory)")
    p.add_argument("--rounds", type=int, default=4, help="train: variants interleaved in this many rounds")
    p.add_argument("--grad_clip", type=float, default=1.0, help="train: clip norm (0 = off), as Table 5")
    p.add_argument("--prompt_len", type=int, default=128, help="decode: prompt tokens (prefilled)")
    p.add_argument("--new_tokens", type=int, default=128, help="decode: tokens generated")
    p.add_argument("--exit_layer", default="", help="decode: also self-speculative decoding (LayerSkip), drafting "
                   "with the first E layers; a comma list sweeps, e.g. 4,6,8 (batch 1, prompts: --runs)")
    p.add_argument("--draft_len", default="4", help="decode with --exit_layer: tokens drafted per round, a comma "
                   "list sweeps, e.g. 2,4,6")
    p.add_argument("--ref", default="vanilla_15l", help="reference row for the relative columns")
    p.add_argument("--sdpa", choices=["auto", "flash", "cudnn", "efficient", "math"], default="auto",
                   help="inference/train: allow only this SDPA backend (auto: PyTorch's choice)")
    p.add_argument("--profile", action="store_true", help="CUDA: kernel time per call by kind (matmul, attention, "
                   "other, idle between kernels) and the top kernels of a few extra runs (decode: of one whole generation)")
    p.add_argument("--hf", action="store_true", help="also time HF LlamaForCausalLM for each uniform config (inference: "
                   "the forward; train: the same training step)")
    p.add_argument("--fsdp", action="store_true", help="train: also time the step under train.py's parallel=fsdp "
                   "(one process, compiled per block); its overhead is against our dump step")
    p.add_argument("--fused_ce", action="store_true", help="train: also time train.py's step with fused_ce=True "
                   "(the LM head and cross-entropy fused and chunked), interleaved; its overhead is against dump")
    p.add_argument("--fused_ce_chunk", type=int, default=8192, help="train --fused_ce: tokens per chunk "
                   "(train.py's fused_ce_chunk)")
    p.add_argument("--device", default="", help="default cuda when available, else cpu")
    p.add_argument("--out", default=None, help="JSON file; the markdown table goes beside it (.md)")
    p.add_argument("--tune_kernels", action="store_true", help="inductor's coordinate-descent tuning of the kernels it "
                   "generates (gpt-fast sets it): the best decode switch of experiments/bench/probes/decode_switches.py on an H200, "
                   "-4 to -5 %% ms/token for twice the compile time")
    p.add_argument("--cache_dir", default=None, help="inductor + triton on-disk cache (default: torch's)")
    p.add_argument("--deadline", type=float, default=0, help="seconds: skip models not started by then (0 = none)")
    p.add_argument("--seed", type=int, default=0, help="random weights and token ids")
    p.add_argument("--specs", default="", help="memory: a comma list of item:dtype:variant:micro runs of train.py "
                   "(default: bench.py's MEMORY_SET; variant plain, ddp, ckpt or fsdp; micro auto, half or a number)")
    return p


def parse(argv):
    """The options, checked and completed with each mode's defaults."""
    a = parser().parse_args(argv)
    a.device = pick_device(a.device)
    a.compile = "none" if a.compile == "eager" else a.compile
    if a.compile is None:
        a.compile = "none" if not a.device.startswith("cuda") else ("reduce-overhead" if a.mode == "decode" else "default")
    defaults = {"inference": (1, 10, 100), "decode": (1, 3, 10), "train": (8, 3, 20), "memory": (16, 0, 6)}[a.mode]
    a.batches = int_list(a.batch, "--batch", "1,16") if a.batch is not None else [defaults[0]]
    if len(a.batches) > 1 and a.mode != "decode":
        raise UserError(f"--batch {a.batch}: several batch sizes are for --mode decode; give one")
    a.batch = a.batches[0]
    a.warmup = defaults[1] if a.warmup is None else a.warmup
    a.runs = defaults[2] if a.runs is None else a.runs
    bad = [d for d in a.dtype.split(",") if d not in DTYPES]
    if bad:
        raise UserError(f"--dtype {bad[0]}: use float32, tf32 or bfloat16 (comma-separated)")
    a.dtypes = list(dict.fromkeys(DTYPES[d] for d in a.dtype.split(",")))
    if min(a.batch, a.seq, a.runs, a.rounds, a.prompt_len, a.fused_ce_chunk) < 1 or a.warmup < 0:
        raise UserError("--batch, --seq, --runs, --rounds, --prompt_len, --fused_ce_chunk must be >= 1 and --warmup >= 0")
    a.exit_layers = int_list(a.exit_layer, "--exit_layer", "4,8")
    a.draft_lens = int_list(a.draft_len, "--draft_len", "2,4")
    if a.exit_layers and (a.mode != "decode" or a.batches != [1] or not a.draft_lens):
        raise UserError("--exit_layer (self-speculative decoding) needs --mode decode, --batch 1 and a --draft_len")
    a.specs = [s for s in a.specs.split(",") if s] or MEMORY_SET
    if a.mode == "memory":
        for spec in a.specs:
            parts = spec.split(":")
            if len(parts) != 4 or parts[1] not in DTYPES.values() or parts[2] not in ("plain", "ddp", "ckpt", "fsdp") \
                    or not (parts[3] in ("auto", "half") or parts[3].isdigit()):
                raise UserError(f"--specs {spec!r}: give item:dtype:variant:micro, e.g. vanilla_16l:bfloat16:plain:auto "
                                f"(variant plain, ddp, ckpt or fsdp; micro auto, half or a number)")
            resolve(parts[0])
        return a
    a.items = a.configs + a.ckpt or (["vanilla_16l"] if a.mode == "train" else TABLE2)
    for it in a.items:
        resolve(it)   # fail on a typo now, not after minutes of compiling
        params = item_params(it)
        if a.device == "cpu" and params > CPU_MAX_PARAMS:
            raise UserError(f"{it} has {params / 1e6:,.0f}M parameters: too big to time on the CPU (no GPU is in use); "
                            f"on a CPU time the tiny models, e.g. python bench.py tiny/vanilla_16l tiny/cascade_a2")
    return a


def main(argv):
    args = parse(argv)
    device = torch.device(args.device)
    if args.cache_dir:   # (memory: the train.py runs inherit it)
        os.makedirs(args.cache_dir, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.abspath(args.cache_dir)
        os.environ["TRITON_CACHE_DIR"] = os.path.join(os.path.abspath(args.cache_dir), "triton")
    if args.mode == "memory":
        return memory_main(args, argv)
    if args.compile in ("max-autotune", "max-autotune-no-cudagraphs") and len(args.items) > 2:
        print("note: max-autotune benchmarks every GEMM shape; expect minutes per model", flush=True)
    if args.sdpa != "auto" and args.mode != "decode":   # decode masks the cache: leave it to PyTorch
        for b in ("flash", "cudnn", "mem_efficient", "math"):
            fn = getattr(torch.backends.cuda, f"enable_{b}_sdp", None)
            fn and fn(b == {"efficient": "mem_efficient"}.get(args.sdpa, args.sdpa))
    run_one, table = {"inference": (inference_row, inference_markdown), "decode": (decode_row, decode_markdown),
                      "train": (train_row, train_markdown)}[args.mode]
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if args.mode == "decode":   # the ceiling the decode rows are read against, measured in this run
        args.copy_gbps = copy_bandwidth(device, 1024 if device.type == "cuda" else 64)
        print(f"device-copy bandwidth: {args.copy_gbps:,.0f} GB/s", flush=True)
    meta = {"mode": args.mode, "device": dev_name, "torch": torch.__version__, "cuda": torch.version.cuda,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python bench.py " + " ".join(argv), "compile": args.compile,
            "fullgraph": not args.no_fullgraph, "bf16": args.bf16, "warmup": args.warmup, "runs": args.runs,
            "batch": args.batches if args.mode == "decode" else args.batch, "seq": args.seq, "ref": args.ref,
            "sdpa": args.sdpa, "tune_kernels": args.tune_kernels, "copy_gbps": getattr(args, "copy_gbps", None)}
    print(f"bench {args.mode} on {dev_name}, torch {torch.__version__}, compile={args.compile}, "
          f"fullgraph={not args.no_fullgraph}, dtypes={args.dtypes}, batch={args.batch}", flush=True)
    rows = []

    def report(final=False):
        if args.mode == "inference":
            finish_rows(rows, args.ref, device)
        md = table(rows, args.ref)
        notes = headlines(rows)
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            header = (f"{args.mode} on {dev_name}, torch {torch.__version__}, {meta['date']}\n\n"
                      f"`{meta['command']}`\n\ncompile={args.compile}, fullgraph={meta['fullgraph']}, bf16={args.bf16}, "
                      f"{'coordinate-descent kernel tuning, ' if args.tune_kernels else ''}"
                      f"warm-up {args.warmup}, median of {args.runs}\n\n")
            md_path = os.path.splitext(args.out)[0] + ".md"
            rundir.atomic_write_json({"meta": meta, "rows": rows}, args.out, indent=1, default=str)
            rundir.atomic_write_text(header + md + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n", md_path)
        if final:
            print("\n" + md)
            for n in notes:
                print(n)
            if args.out:
                print(f"wrote {args.out} and {os.path.splitext(args.out)[0]}.md")

    from torch._inductor import config as inductor_config
    with inductor_config.patch(coordinate_descent_tuning=args.tune_kernels):   # this call's compiles only
        run_all(args, device, run_one, rows, report)
    report(final=True)
    failed = [r for r in rows if "error" in r and not r["error"].startswith("skipped")
              and "this config is tapered" not in r["error"]]   # HF Llama cannot taper: expected, not a failure
    if failed:   # the table is written; the exit status still says that it is incomplete
        raise UserError(f"{len(failed)} of {len(rows)} rows failed, e.g. {failed[0]['model']} ({failed[0]['dtype']}): "
                        f"{failed[0]['error']}; the traceback is above")
    return rows


def run_all(args, device, run_one, rows, report):
    """Every item at every dtype; one model failing (OOM, a compile error) is a row with its error."""
    t0 = time.time()
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
            except Exception as e:
                traceback.print_exc()
                new = [{"config": name, "model": pretty(name), "impl": "ours", "dtype": dtype,
                        "error": one_line(e)}]
            free()
            rows += new
            report()
            for r in new:
                if "median_ms" in r or "ms_per_token" in r or "dump" in r or "nodump" in r:
                    summary = (f"{r['median_ms']:.2f} ms" if "median_ms" in r else
                               f"{r['ms_per_token']:.3f} ms/token" if "ms_per_token" in r else
                               f"{r.get('nodump', r.get('dump'))['ms_step']:.1f} ms/step")
                    print(f"  {r['model']} ({dtype}): {summary}", flush=True)

if __name__ == "__main__":
    cli(main)
