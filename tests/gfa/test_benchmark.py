"""gfa/benchmark.py: Table 2's cost column (meta device, no 1.2B allocation), config names
(a variant, scale/variant, a run), and the kernel profile's per-call summary on hand-made events."""
import pytest
import torch

from gfa import benchmark
from gfa.cli import UserError
from helpers import tiny_model, write_run
from model import GPT

# Table 2's cost, 2 x (params - input embedding) x 2048 tokens, TFLOP (docs/paper_notes.md)
PAPER_COST = {"vanilla_16l": 4.82, "vanilla_15l": 4.54, "cascade_a2": 4.58}


@pytest.mark.parametrize("name", sorted(PAPER_COST))
def test_cost_matches_the_paper(name):
    with torch.device("meta"):
        model = GPT(benchmark.load_config(name))
    assert abs(benchmark.cost_tflop(model, 2048) - PAPER_COST[name]) < 0.01


def test_names_and_resolution(tmp_path):
    name, files, run = benchmark.resolve("tiny/cascade_a2")
    assert name == "tiny/cascade_a2" and [f.rsplit("/", 2)[-2:] for f in files] == [["config", "tiny.py"],
                                                                                    ["config", "cascade_a2.py"]]
    assert benchmark.load_config("tiny/cascade_a2").d_model == 128 and benchmark.load_config("cascade_a2").d_model == 2048
    with pytest.raises(UserError, match="no run directory, and no config file .*vanila_16l.py"):
        benchmark.resolve("vanila_16l")
    run = write_run(tmp_path / "myrun", tiny_model(seed=4))
    name, model = benchmark.build(run, "cpu", 16)
    assert name == "myrun" and torch.equal(model.lm_head.weight, tiny_model(seed=4).lm_head.weight)
    with pytest.raises(UserError, match="holds no checkpoint"):
        benchmark.resolve(str(tmp_path))
    with pytest.raises(UserError, match="pass the run directory that holds it"):
        benchmark.resolve(f"{run}/ckpt.pt")
    with pytest.raises(UserError, match="no run directory there"):
        benchmark.resolve(str(tmp_path / "not_yet_trained"))


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
    line = benchmark.kernel_breakdown(events, n=2)   # the events of 2 calls
    assert line == ("per call: 2 kernels, busy 0.450 ms (matmul 0.300, attention 0.100, other 0.050), "
                    "span 0.500 ms, idle between kernels 0.050 ms")
    assert benchmark.kernel_breakdown([ev("aten::mm", 0, 1, cpu)], 1) == "no CUDA kernels recorded"
    overlap = [ev("nvjet_a", 0, 100), ev("triton_poi_b", 50, 150), ev("triton_poi_c", 200, 300)]   # two streams
    assert benchmark.kernel_breakdown(overlap, 1).endswith("busy 0.300 ms (other 0.200, matmul 0.100), "
                                                       "span 0.300 ms, idle between kernels 0.050 ms")
    kinds = {"triton_tem_fused_flex_attention_0": "attention", "triton_tem_fused_mm_3": "matmul",
             "void cudnn::fusion::compute_dot_do_o_specialized<true, 64>": "attention",
             "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64>>": "attention",
             "triton_red_fused__fused_rms_norm__unsafe_view_add_9": "other", "Memset (Device)": "other"}
    assert {k: benchmark.kernel_kind(k) for k in kinds} == kinds




def test_hf_twin_computes_our_model():
    """bench.py --hf's LlamaForCausalLM (random weights) has our config: with our weights it gives our logits."""
    pytest.importorskip("transformers")
    from gfa.hf_llama import state_to_hf
    _, model = benchmark.build("tiny/vanilla_8l", torch.device("cpu"), 32)
    twin = benchmark.build_hf(model, "cpu")
    assert sum(p.numel() for p in twin.parameters()) == model.num_params()
    twin.load_state_dict(state_to_hf(model))
    x = torch.randint(0, 256, (1, 32))
    with torch.no_grad():
        torch.testing.assert_close(twin.eval()(input_ids=x, use_cache=False).logits, model.eval()(x)[0],
                                   rtol=1e-5, atol=1e-5)


def test_decode_bytes_per_step_by_hand():
    """The bytes a static-shape decode step reads: every weight but the embedding table (tied: the table
    once, as the head) plus K and V of the whole cache of every virtual layer that runs, counted by hand."""
    m = tiny_model(n_layer=3, n_kv_head=2, repeats=[1, 2, 1])
    c = m.config
    blocks = sum(p.numel() for p in m.blocks.parameters())
    weights = (blocks + c.d_model + c.vocab_size * c.d_model) * 4   # blocks, final norm, head (fp32)
    kv = 2 * 2 * c.head_dim * 10 * 3 * (1 + 2 + 1) * 2                # K+V, kv heads, len 10, batch 3, 4 virtual, bf16
    assert benchmark.decode_bytes_per_step(m, 3, 10, 2) == weights + kv
    m.set_passthrough([1])                                             # a skipped layer's cache is not read
    assert benchmark.decode_bytes_per_step(m, 3, 10, 2) == weights + kv // 4 * 2
    tied = tiny_model(n_layer=3, tie_embeddings=True).to(torch.bfloat16)
    t = tied.config
    want = (sum(p.numel() for p in tied.blocks.parameters()) + t.d_model + t.vocab_size * t.d_model) * 2
    heads = t.d_attn0 // t.head_dim                                  # no GQA, no taper in TINY
    assert benchmark.decode_bytes_per_step(tied, 1, 1, 2) == want + 2 * heads * t.head_dim * 3 * 2


def test_copy_bandwidth_is_positive_and_finite():
    gbps = benchmark.copy_bandwidth(torch.device("cpu"), mib=4, runs=3)
    assert 0 < gbps < 1e5
