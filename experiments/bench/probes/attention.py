"""One-off probe behind experiments/bench/README.md's attention figures: the SDPA backends and FlexAttention alone
on Vanilla-16L's attention shape (batch 1, 32 heads, 2048 tokens, head dim 64, causal, bf16), and
cuDNN's time for the q/k/v memory layouts the model and HF produce. CUDA only.

    python experiments/bench/probes/attention.py
"""
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
from gfa import benchmark  # noqa: E402

dev, bf = torch.device("cuda"), torch.bfloat16
B, H, T, D = 1, 32, 2048, 64
FLOP = 4 * B * H * T * (T + 1) / 2 * D   # causal QK^T + AV


def median_us(fn, runs=100, warmup=20):
    with torch.no_grad():
        return 1e3 * benchmark.stats(benchmark.time_calls(fn, warmup, runs, dev))["median_ms"]


def show(label, us):
    print(f"{label:60s} {us:7.1f} us {FLOP / us / 1e6:5.0f} TFLOP/s", flush=True)


print(torch.__version__, torch.cuda.get_device_name(), "cudnn", torch.backends.cudnn.version(), flush=True)
r = lambda *shape: torch.randn(*shape, device=dev, dtype=bf)
bhsd = lambda t: t.transpose(1, 2)   # (B,T,H,D) memory -> (B,H,T,D) view
qkv, qk = r(B, T, 3, H, D), r(B, T, 2, H, D)
layouts = {
    "q,k,v views of one (B,T,3,H,D) buffer": [bhsd(t) for t in qkv.unbind(2)],
    "q,k dense (B,T,H,D), v view of (B,T,3,H,D) (model.py)": [bhsd(r(B, T, H, D)), bhsd(r(B, T, H, D)), bhsd(qkv[:, :, 2])],
    "q,k views of (B,T,2,H,D), v view of (B,T,3,H,D)": [bhsd(qk[:, :, 0]), bhsd(qk[:, :, 1]), bhsd(qkv[:, :, 2])],
    "all dense (B,T,H,D)": [bhsd(r(B, T, H, D)) for _ in range(3)],
    "all dense (B,H,T,D) (HF)": [r(B, H, T, D) for _ in range(3)],
}
for name, (q, k, v) in layouts.items():
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        show(f"cudnn, {name}", median_us(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)))

q, k, v = layouts["all dense (B,H,T,D) (HF)"]
for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
    with sdpa_kernel([backend]):
        show(backend.name.lower(), median_us(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)))

mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, T, T, device=dev)
for lname in ("all dense (B,T,H,D)", "all dense (B,H,T,D) (HF)"):
    q, k, v = layouts[lname]
    for opts in (None, {"BLOCK_M": 128, "BLOCK_N": 64}, {"BLOCK_M": 128, "BLOCK_N": 128}, {"BLOCK_M": 64, "BLOCK_N": 128},
                 {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2},
                 {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2}):
        torch._dynamo.reset()
        flex = torch.compile(flex_attention, fullgraph=True)
        try:
            show(f"flex {opts}, {lname}", median_us(lambda: flex(q, k, v, block_mask=mask, kernel_options=opts)))
        except Exception as e:   # a block configuration the Triton template rejects
            print(f"flex {opts}, {lname}: failed ({benchmark.one_line(e, 120)})", flush=True)
