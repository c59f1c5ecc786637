"""bench.py on CPU: the timing loop's markdown + JSON output on tiny configs, the greedy decode
loop == model.generate, a train-mode smoke run, and (gpu) the compiled CUDA-graphed decode."""
import json

import pytest
import torch
from torch._inductor import config as inductor_config

import bench
from gfa.benchmark import load_config
from helpers import one_line_error, tiny_model, write_run
from model import GPT


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
    cfg = load_config(name)
    cfg.passthrough = passthrough
    model = GPT(cfg).eval()
    prompt = torch.randint(1, cfg.vocab_size, (2, 5))
    want = model.generate(prompt, 8, temperature=0)
    got = bench.greedy_decode(model, prompt, 8)
    assert torch.equal(got, want)


def test_decode_and_train_modes_run(tmp_path, capsys):
    rows = bench.main(["tiny/vanilla_8l", "--mode", "decode", "--device", "cpu", "--prompt_len", "8",
                       "--new_tokens", "4", "--warmup", "0", "--runs", "2", "--batch", "1,3", "--profile",
                       "--tune_kernels", "--out", str(tmp_path / "d.json")])
    assert json.loads((tmp_path / "d.json").read_text())["meta"]["tune_kernels"]
    assert not inductor_config.coordinate_descent_tuning   # the switch held for that call only
    assert [r["batch"] for r in rows] == [1, 3] and all("error" not in r and r["ms_per_token"] > 0 for r in rows)
    for r in rows:   # the share of the copy bandwidth is the bytes read per step over the step time
        assert r["copy_gbps"] > 0 and r["pct_of_copy_bw"] == pytest.approx(100 * r["read_gbps"] / r["copy_gbps"])
    assert "Device-copy bandwidth, this run:" in (tmp_path / "d.md").read_text()
    assert "for --mode decode" in one_line_error(bench.main, ["tiny/vanilla_8l", "--mode", "train", "--batch", "1,2"],
                                                 capsys)
    rows = bench.main(["tiny/vanilla_8l", "--mode", "train", "--device", "cpu", "--dtype", "float32",
                       "--batch", "1", "--seq", "16", "--warmup", "0", "--runs", "1", "--rounds", "1"])
    r = rows[0]
    assert "error" not in r, r
    assert r["nodump"]["ms_step"] > 0 and "overhead_pct" in r["dump"] and "fused" not in r   # --fused_ce: opt-in


def test_self_speculative_rows(tmp_path, byte_data, capsys):
    """decode --exit_layer: a trained-run item takes its prompts from the run's val.bin; at E = N every
    draft is accepted (d + 1 tokens a round); every generation equals plain greedy decoding."""
    run = write_run(tmp_path / "run", tiny_model(n_layer=4, block_size=64), byte_data)
    rows = bench.main([run, "--mode", "decode", "--device", "cpu", "--dtype", "float32", "--prompt_len", "8",
                       "--new_tokens", "7", "--warmup", "0", "--runs", "2", "--exit_layer", "1,4", "--draft_len", "2",
                       "--out", str(tmp_path / "d.json")])
    plain, early, full = rows[1:]
    assert [r["impl"] for r in rows] == ["ours", "plain", "self-spec", "self-spec"] and "error" not in early
    assert plain["prompt_source"] == str(byte_data / "val.bin")
    assert full["acceptance"] == 1.0 and full["tokens_per_round"] == 3.0 and 0 <= early["acceptance"] < 1
    assert early["same_tokens"] == full["same_tokens"] == 2
    assert "| self-speculative | 4 | 2 | 100.0 % | 3.00 |" in (tmp_path / "d.md").read_text()
    assert "--exit_layer 'two'" in one_line_error(bench.main, [run, "--mode", "decode", "--exit_layer", "two"], capsys)
    assert "--batch 1" in one_line_error(bench.main, [run, "--mode", "decode", "--exit_layer", "2", "--batch", "2"],
                                         capsys)


def gpu_case(name, batch, spare=0):
    """A random model of config `name` on the GPU, a 9-token prompt, generate()'s 16 greedy tokens after
    it, and a KV cache at fixed addresses (CUDA graphs write it in place), `spare` positions longer."""
    torch.manual_seed(0)
    cfg = load_config(name)
    model = GPT(cfg).cuda().eval()
    prompt = torch.randint(1, cfg.vocab_size, (batch, 9), device="cuda")
    cache = model.new_kv_cache(batch, 9 + 16 + spare)
    for kv in cache:
        for t in kv:
            torch._dynamo.mark_static_address(t)
    return model, prompt, model.generate(prompt, 16, temperature=0), cache


@pytest.mark.gpu
def test_compiled_self_speculative_matches_generate_gpu():
    """Compiled, CUDA-graphed draft and verify steps (bench's decode default) give generate()'s tokens."""
    model, prompt, want, cache = gpu_case("tiny/vanilla_8l", 1, spare=3)
    draft = bench.replayed(torch.compile(model.draft_step, mode="reduce-overhead", fullgraph=True))
    verify = bench.replayed(torch.compile(model.verify_step, mode="reduce-overhead", fullgraph=True))
    for _ in range(2):   # second pass replays the recorded graphs
        got, _ = model.generate_self_speculative(prompt, 16, 3, 3, draft, verify, cache)
        assert torch.equal(got, want)
    torch._dynamo.reset()


@pytest.mark.gpu
def test_compiled_decode_matches_generate_gpu():
    """The compiled, CUDA-graphed decode step (bench's decode default) == generate() on the GPU."""
    model, prompt, want, cache = gpu_case("tiny/cascade_c2", 2)
    for tune in (False, True):   # bench.py --tune_kernels too
        with inductor_config.patch(coordinate_descent_tuning=tune):
            step = torch.compile(model.decode_step, mode="reduce-overhead", fullgraph=True)
            for _ in range(2):   # second pass replays the recorded graph
                assert torch.equal(bench.greedy_decode(model, prompt, 16, step, cache), want), tune
        torch._dynamo.reset()




def test_train_mode_times_hf_llama_the_same_way(tmp_path):
    """--hf in train mode: HF LlamaForCausalLM's step timed like ours (nodump), its row in the table and
    our speedup over it in the headline (transformers is optional: skipped without it)."""
    pytest.importorskip("transformers")
    out = tmp_path / "t.json"
    rows = bench.main(["tiny/vanilla_8l", "--mode", "train", "--device", "cpu", "--dtype", "float32", "--hf",
                       "--batch", "1", "--seq", "16", "--warmup", "0", "--runs", "2", "--rounds", "1", "--out", str(out)])
    ours, hf = rows
    assert hf["impl"] == "hf-llama" and "error" not in hf, hf
    assert hf["params"] == ours["params"] and hf["nodump"]["n"] == 2
    assert ours["speedup_vs_hf"] == pytest.approx(hf["nodump"]["ms_step"] / ours["nodump"]["ms_step"])
    md = out.with_suffix(".md").read_text()
    assert "HF-Llama (tiny/Vanilla-8L) | float32 | 1 x 16 | nodump" in md and "faster than HF LlamaForCausalLM" in md


def test_train_mode_times_the_fsdp_step():
    """--fsdp: the same step under train.py's parallel=fsdp (a process group of one), against our dump step."""
    rows = bench.main(["tiny/vanilla_8l", "--mode", "train", "--device", "cpu", "--dtype", "float32", "--fsdp",
                       "--batch", "1", "--seq", "16", "--warmup", "0", "--runs", "2", "--rounds", "1"])
    ours, fsdp = rows
    assert fsdp["impl"] == "ours-fsdp" and "error" not in fsdp, fsdp
    assert fsdp["dump"]["overhead_pct"] == pytest.approx(100 * (fsdp["dump"]["ms_step"] / ours["dump"]["ms_step"] - 1))
    assert not torch.distributed.is_initialized()   # its group of one is gone


def test_train_mode_times_the_fused_ce_step_beside_the_others(monkeypatch):
    """--fused_ce: a fourth variant, train.py's step with fused_ce=True, interleaved with the others: the fused loss
    runs on its steps and on no other, its overhead is against the unfused dump step."""
    import model
    calls = []
    plain_apply = model.LinearCrossEntropy.apply
    monkeypatch.setattr(model.LinearCrossEntropy, "apply", lambda *a: calls.append(a[3]) or plain_apply(*a))
    rows = bench.main(["tiny/vanilla_8l", "--mode", "train", "--device", "cpu", "--dtype", "float32", "--fused_ce",
                       "--fused_ce_chunk", "5", "--batch", "1", "--seq", "16", "--warmup", "0", "--runs", "2",
                       "--rounds", "1"])
    r = rows[0]
    assert calls == [5, 5] and r["fused"]["n"] == r["dump"]["n"] == 2   # one loss per fused step, chunks of 5
    assert r["fused"]["overhead_pct"] == pytest.approx(100 * (r["fused"]["ms_step"] / r["dump"]["ms_step"] - 1))
