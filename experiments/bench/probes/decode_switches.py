"""One-off probe behind experiments/bench/README.md's decode figures: where a batch-1 bf16 decode step of Vanilla-15L
goes, and which compiler or attention switch moves it towards the copy bandwidth. Each variant
compiles GPT.decode_step as bench.py does (reduce-overhead: one CUDA graph per step), times
`new` steps of a 128-token prompt and prints ms/token, the share of the device-copy bandwidth a step's
reads reach (gfa.benchmark.decode_bytes_per_step) and the kernel breakdown of one generation.

    base      bench.py's decode step
    cdt       + inductor's coordinate-descent tuning of its own kernels (gpt-fast sets it)
    autotune  torch.compile mode max-autotune (GEMV candidates benchmarked per shape, CUDA graphs)
    blaslt    cuBLASLt preferred over cuBLAS for the matmuls
    math      SDPA replaced by q k^T, mask, softmax, v written out, so inductor can fuse attention
              over the cache with its neighbours instead of calling a kernel for it

CUDA only.   python experiments/bench/probes/decode_switches.py [base cdt autotune blaslt math base]
"""
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
from gfa import benchmark  # noqa: E402

SDPA = F.scaled_dot_product_attention


def math_sdpa(q, k, v, attn_mask=None, is_causal=False, scale=None):
    s = (q @ k.transpose(-2, -1)) * (scale or q.size(-1) ** -0.5)
    if is_causal:
        attn_mask = torch.ones(q.size(-2), k.size(-2), dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None:   # boolean (True: attend) or additive, as SDPA takes either
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask
    return s.float().softmax(-1).to(q.dtype) @ v


def run(variant, dev, copy_gbps, P=128, N=128):
    torch._dynamo.reset()
    benchmark.free()
    torch._inductor.config.coordinate_descent_tuning = variant == "cdt"
    torch.backends.cuda.preferred_blas_library("cublaslt" if variant == "blaslt" else "cublas")
    F.scaled_dot_product_attention = math_sdpa if variant == "math" else SDPA
    torch.manual_seed(0)
    _, model = benchmark.build("vanilla_15l", dev, P + N)
    benchmark.set_dtype(model, "bfloat16", "cast", dev)
    model.eval()
    cache = model.new_kv_cache(1, P + N, dtype=torch.bfloat16)
    for kv in cache:
        for t in kv:
            torch._dynamo.mark_static_address(t)
    step = torch.compile(model.decode_step, mode="max-autotune" if variant == "autotune" else "reduce-overhead",
                         fullgraph=True)
    prompt = torch.randint(1, model.config.vocab_size, (1, P), device=dev)
    positions = torch.arange(P, P + N, device=dev)
    ev = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []

    def gen():
        with torch.no_grad():
            tok = model(prompt, kv_cache=cache, pos=0, last_only=True)[0][:, -1].argmax(-1, keepdim=True)
            ev[0].record()
            for s in range(N - 1):
                torch.compiler.cudagraph_mark_step_begin()
                tok = step(tok, positions[s], cache).clone()
            ev[1].record()
        torch.cuda.synchronize()
        times.append(ev[0].elapsed_time(ev[1]) / (N - 1))

    t0 = time.time()
    gen()
    compile_s = time.time() - t0
    for _ in range(13):
        gen()
    st = benchmark.stats(times[4:])
    gbps = benchmark.decode_bytes_per_step(model, 1, P + N, 2) / (st["median_ms"] / 1e3) / 1e9
    print(f"{variant:9s} compile {compile_s:4.0f} s  {st['median_ms']:.4f} ms/token (IQR {st['iqr_ms']:.4f})  "
          f"{gbps:,.0f} GB/s read = {100 * gbps / copy_gbps:.1f} % of copy bandwidth", flush=True)
    benchmark.profile(gen, f"{variant}: one generation = {N - 1} decode steps", dev, n=1)


if __name__ == "__main__":
    dev = torch.device("cuda")
    copy_gbps = benchmark.copy_bandwidth(dev)
    print(torch.__version__, torch.cuda.get_device_name(), f"copy bandwidth {copy_gbps:,.0f} GB/s", flush=True)
    for v in sys.argv[1:] or ["base", "cdt", "autotune", "blaslt", "math", "base"]:
        run(v, dev, copy_gbps)
