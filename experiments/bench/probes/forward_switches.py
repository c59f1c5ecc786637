"""One-off probe behind experiments/bench/README.md's forward figures: the compiled Vanilla-16L bf16 forward
(batch 1 x 2048) as bench.py runs it ("base"), under inductor's coordinate-descent tuning ("cdt"),
with cuBLASLt preferred over cuBLAS ("blaslt"), and HF LlamaForCausalLM for scale, one process.
CUDA only.

    python experiments/bench/probes/forward_switches.py [base cdt blaslt hf base]
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
from gfa import benchmark  # noqa: E402

dev = torch.device("cuda")
print(torch.__version__, torch.cuda.get_device_name(), flush=True)
for variant in sys.argv[1:] or ["base", "cdt", "blaslt", "hf", "base"]:
    torch._dynamo.reset()
    benchmark.free()
    torch._inductor.config.coordinate_descent_tuning = variant == "cdt"
    torch.backends.cuda.preferred_blas_library("cublaslt" if variant == "blaslt" else "cublas")
    torch.manual_seed(0)
    _, model = benchmark.build("vanilla_16l", dev, 2048)
    benchmark.set_dtype(model, "bfloat16", "cast", dev)
    idx = torch.randint(1, model.config.vocab_size, (1, 2048), device=dev)
    hf = variant == "hf"
    if hf:
        model = benchmark.build_hf(model, dev)
        benchmark.set_dtype(model, "bfloat16", "cast", dev)
    model.eval()
    m = torch.compile(model, fullgraph=True)

    def fwd():
        with torch.no_grad():
            return m(input_ids=idx, use_cache=False).logits if hf else m(idx)[0]

    t0 = time.time()
    fwd()
    torch.cuda.synchronize()
    st = benchmark.stats(benchmark.time_calls(fwd, 10, 200, dev))
    print(f"{variant:7s} compile {time.time() - t0:4.0f} s  median {st['median_ms']:.3f} ms  IQR {st['iqr_ms']:.3f}", flush=True)
    del model, m
