"""One-off probe behind experiments/bench/README.md's training figures: a Vanilla-16L 8 x 2048 bf16-autocast step
(train.py's path: per-layer norms, clip, fused AdamW) with the clip applied by a separate in-place
multiply ("mul") or folded into fused AdamW by training.scaled_step ("fold"), the two interleaved in
rounds in one process; then the fold again under inductor's coordinate-descent tuning ("cdt",
compiled separately). CUDA only.

    python experiments/bench/probes/train_switches.py
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
from gfa import benchmark  # noqa: E402
from gfa import device as devices, training  # noqa: E402

dev, B, T = torch.device("cuda"), 8, 2048
print(torch.__version__, torch.cuda.get_device_name(), flush=True)


def make_step(coordinate_descent):
    torch._dynamo.reset()
    benchmark.free()
    torch._inductor.config.coordinate_descent_tuning = coordinate_descent
    torch.manual_seed(0)
    _, model = benchmark.build("vanilla_16l", dev, T)
    model.train()
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=2e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    norms_of = training.LayerGradNorms(model.param_groups_by_layer())
    ctx = devices.autocast_for("cuda", "bfloat16")
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randint(1, model.config.vocab_size, (B, T), generator=g).to(dev) for _ in range(2))
    m = torch.compile(model, fullgraph=True)

    def step(variant):
        with ctx:
            _, loss = m(x, y)
        loss.backward()
        grads = [p.grad for p in params if p.grad is not None]
        coef = training.clip_coef(norms_of().square().sum().sqrt(), 1.0)
        if variant == "mul":
            torch._foreach_mul_(grads, coef)
            opt.step()
        else:
            training.scaled_step(opt, grads, coef)
        opt.zero_grad(set_to_none=True)

    t0 = time.time()
    step("fold")
    torch.cuda.synchronize()
    print(f"compiled (coordinate descent {coordinate_descent}) in {time.time() - t0:.0f} s", flush=True)
    return model.flops_per_token(T), step


for cdt, variants in ((False, ["mul", "fold"]), (True, ["cdt"])):
    fpt, step = make_step(cdt)
    times = {v: [] for v in variants}
    run = lambda v: step("fold" if v == "cdt" else v)
    for v in variants:
        benchmark.time_calls(lambda: run(v), 3, 0, dev)
    for _ in range(3):
        for v in variants:
            times[v] += benchmark.time_calls(lambda: run(v), 0, 8, dev)
    for v in variants:
        ms = benchmark.stats(times[v])["median_ms"]
        print(f"{v:5s} median {ms:.1f} ms/step  MFU {100 * 3 * fpt * B * T / (ms / 1e3) / 989e12:.2f} %", flush=True)
    del step
