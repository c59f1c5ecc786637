"""bench.py on CPU: Table 2's cost column (meta device, no 1.2B allocation), the timing loop's
markdown + JSON output on tiny configs, the static-shape decode step == model.generate(greedy),
and a train-mode smoke run."""
import json

import pytest
import torch

import bench
import common
from model import GPT

# SPEC: Table 2's cost, 2 x (params - input embedding) x 2048 tokens, TFLOP
SPEC_COST = {"vanilla_16l": 4.82, "vanilla_15l": 4.54, "cascade_a2": 4.58}


@pytest.mark.parametrize("name", sorted(SPEC_COST))
def test_cost_matches_spec(name):
    with torch.device("meta"):
        model = GPT(bench.load_config(name))
    assert abs(bench.cost_tflop(model, 2048) - SPEC_COST[name]) < 0.01


def test_names_and_resolution():
    assert bench.pretty("vanilla_15l") == "Vanilla-15L"
    assert bench.pretty("cascade_a2") == "CascadeFormer-A2"
    assert bench.resolve("tiny/cascade_a2")[0] == "tiny/cascade_a2"
    with pytest.raises(bench.UserError):
        bench.resolve("vanila_16l")


def test_inference_table_and_json(tmp_path):
    out = tmp_path / "t.json"
    rows = bench.main(["tiny/vanilla_15l", "tiny/cascade_a2", "--device", "cpu",
                       "--seq", "32", "--warmup", "0", "--runs", "3", "--dtype", "float32,bfloat16",
                       "--out", str(out)])
    d = json.loads(out.read_text())
    assert d["meta"]["mode"] == "inference" and len(d["rows"]) == len(rows) == 4
    for r in d["rows"]:
        assert "error" not in r, r
        assert r["median_ms"] > 0 and r["n"] == 3 and r["tokens"] == 32
        assert r["tok_s"] == pytest.approx(32 / (r["median_ms"] / 1e3))
        assert r["tflops"] == pytest.approx(r["cost_tflop"] / (r["median_ms"] / 1e3))
    for dtype in ("float32", "bfloat16"):   # each row relative to the reference row of its dtype
        ref, a2 = (next(r for r in d["rows"] if r["config"] == c and r["dtype"] == dtype)
                   for c in ("tiny/vanilla_15l", "tiny/cascade_a2"))
        assert a2["latency_vs_ref_pct"] == pytest.approx(100 * (a2["median_ms"] / ref["median_ms"] - 1))
        assert a2["throughput_vs_ref_pct"] == pytest.approx(100 * (ref["median_ms"] / a2["median_ms"] - 1))
    md = out.with_suffix(".md").read_text().splitlines()
    table = [line for line in md if line.startswith("|")]
    assert len(table) == 2 + 4
    assert len({line.count("|") for line in table}) == 1   # every row has the header's columns
    assert any("tiny/CascadeFormer-A2" in line and "bfloat16" in line for line in table)


@pytest.mark.parametrize("name,passthrough", [("tiny/cascade_c2", []), ("tiny/virtual_depth", [2])])
def test_decode_matches_generate(name, passthrough):
    torch.manual_seed(0)
    cfg = bench.load_config(name)
    cfg.passthrough = passthrough
    model = GPT(cfg).eval()
    prompt = torch.randint(1, cfg.vocab_size, (2, 5))
    want = model.generate(prompt, 8, temperature=0)
    got = bench.greedy_decode(model, prompt, 8)
    assert torch.equal(got, want)


def test_decode_and_train_modes_run(tmp_path):
    rows = bench.main(["tiny/vanilla_8l", "--mode", "decode", "--device", "cpu", "--prompt_len", "8",
                       "--new_tokens", "4", "--warmup", "0", "--runs", "2", "--out", str(tmp_path / "d.json")])
    assert rows[0]["ms_per_token"] > 0 and "error" not in rows[0]
    rows = bench.main(["tiny/vanilla_8l", "--mode", "train", "--device", "cpu", "--dtype", "float32",
                       "--batch", "1", "--seq", "16", "--warmup", "0", "--runs", "1", "--rounds", "1"])
    r = rows[0]
    assert "error" not in r, r
    assert r["nodump"]["ms_step"] > 0 and "overhead_pct" in r["dump"]


@pytest.mark.gpu
def test_compiled_decode_matches_generate_gpu():
    """The compiled, CUDA-graphed decode step (bench's decode default) == generate() on the GPU."""
    torch.manual_seed(0)
    cfg = bench.load_config("tiny/cascade_c2")
    model = GPT(cfg).cuda().eval()
    prompt = torch.randint(1, cfg.vocab_size, (2, 9), device="cuda")
    want = model.generate(prompt, 16, temperature=0)
    cache = model.new_kv_cache(2, 25)
    for kv in cache:
        for t in kv:
            torch._dynamo.mark_static_address(t)
    step = torch.compile(lambda t, p, c: bench.decode_step(model, t, p, c), mode="reduce-overhead", fullgraph=True)
    for _ in range(2):   # second pass replays the recorded graph
        assert torch.equal(bench.greedy_decode(model, prompt, 16, step, cache), want)
    torch._dynamo.reset()


def test_profile_kernel_breakdown():
    """--profile's per-call summary on hand-made kernel events: busy time by kind, span, idle gap."""
    from types import SimpleNamespace as Ev
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    def ev(name, start, end, dev=cuda, annotation=False):
        return Ev(name=name, device_type=dev, time_range=Ev(start=start, end=end), is_user_annotation=annotation)   # us
    events = [ev("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_TNT", 0, 600),
              ev("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", 650, 850),
              ev("triton_poi_fused__unsafe_view_mul_silu_split_4", 900, 950),
              ev("triton_poi_fused__scaled_dot_product_cudnn_attention__to_copy_add_cat_mul_2", 950, 1000),   # RoPE
              ev("aten::mm", 0, 5000, cpu),   # host-side op: not GPU time
              ev("Command Buffer Full", 0, 2000),   # CUPTI's marker, not a kernel
              ev("Optimizer.step#AdamW.step", 0, 900, annotation=True)]   # a record_function range on the GPU
    line = bench.kernel_breakdown(events, n=2)   # the events of 2 calls
    assert line == ("per call: 2 kernels, busy 0.450 ms (matmul 0.300, attention 0.100, other 0.050), "
                    "span 0.500 ms, idle between kernels 0.050 ms")
    assert bench.kernel_breakdown([ev("aten::mm", 0, 1, cpu)], 1) == "no CUDA kernels recorded"
    overlap = [ev("nvjet_a", 0, 100), ev("triton_poi_b", 50, 150), ev("triton_poi_c", 200, 300)]   # two streams
    assert bench.kernel_breakdown(overlap, 1).endswith("busy 0.300 ms (other 0.200, matmul 0.100), "
                                                       "span 0.300 ms, idle between kernels 0.050 ms")
    kinds = {"triton_tem_fused_flex_attention_0": "attention", "triton_tem_fused_mm_3": "matmul",
             "void cudnn::fusion::compute_dot_do_o_specialized<true, 64>": "attention",
             "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64>>": "attention",
             "triton_red_fused__fused_rms_norm__unsafe_view_add_9": "other", "Memset (Device)": "other"}
    assert {k: bench.kernel_kind(k) for k in kinds} == kinds


def _clip_step_pair(device, fused):
    """train.py's step (the clip's total from the per-layer norms, applied by common.scaled_step)
    and torch's own clip_grad_norm_ then a single-tensor AdamW step, on copies of one state."""
    torch.manual_seed(0)
    model = GPT(bench.load_config("tiny/cascade_a2")).to(device)
    x = torch.randint(1, model.config.vocab_size, (2, 16), device=device)
    model(x, x)[1].backward()
    params = list(model.parameters())
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for c, p in zip(copies, params):
        c.grad = p.grad.clone()
    hyper = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    total = torch.nn.utils.clip_grad_norm_(copies, 0.05)
    torch.optim.AdamW(copies, foreach=False, **hyper).step()
    norms = common.LayerGradNorms(model.param_groups_by_layer())()
    got_total = norms.square().sum().sqrt()
    opt = torch.optim.AdamW(params, fused=fused, foreach=None if fused else True, **hyper)
    common.scaled_step(opt, [p.grad for p in params], common.clip_coef(got_total, 0.05))
    assert not hasattr(opt, "grad_scale")   # the next step is not scaled again
    assert got_total.item() == pytest.approx(total.item(), rel=1e-5) and total.item() > 0.05   # clipping happened
    for p, c in zip(params, copies):
        torch.testing.assert_close(p.grad, c.grad, rtol=1e-5, atol=1e-8)   # left clipped, as clip_grad_norm_ leaves them
        torch.testing.assert_close(p.detach(), c.detach(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("fused", [True, False])
def test_clipped_step_equals_clip_grad_norm_then_adamw(fused):
    _clip_step_pair("cpu", fused)


@pytest.mark.gpu
def test_clipped_step_equals_clip_grad_norm_then_adamw_gpu():
    _clip_step_pair("cuda", True)
