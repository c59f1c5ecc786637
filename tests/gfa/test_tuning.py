"""gfa/tuning.py through train.py: partial tuning leaves every frozen parameter bit-identical and moves the
trained ones; LoRA leaves the base weights unchanged, its merged model computes what the adapted one does,
and its checkpoint is the plain (merged) model; bad settings are one-line errors."""
import os

import pytest
import torch

import train
from gfa import rundir
from gfa.tuning import apply_tuning, merge, plain_state_dict
from helpers import one_line_error, tiny_model
from model import GPT

TINY = ["--dataset=shakespeare", "--n_layer=3", "--d_model=32", "--head_dim=8", "--d_attn0=32", "--S_d=8",
        "--d_ffn0=64", "--vocab_size=256", "--block_size=32", "--batch_size=8", "--eval_iters=1",
        "--eval_batch_size=4", "--warmup_iters=0", "--learning_rate=3e-3", "--log_interval=1", "--device=cpu",
        "--eval_interval=1000", "--compile=False"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tune") / "src")
    train.main(TINY + [f"--out_dir={out}", "--max_iters=1"])
    return out


def test_partial_tuning_trains_the_head_and_last_layers_only(source, tmp_path):
    out = str(tmp_path / "partial")
    train.main(TINY + [f"--init_from={source}", f"--out_dir={out}", "--max_iters=3", "--tune=partial", "--tune_last=1"])
    before, after = rundir.load_gpt(source)[0].state_dict(), rundir.load_gpt(out)[0].state_dict()
    trained = ("blocks.2.", "lm_head.", "norm_f.")
    for k, v in before.items():
        if k.startswith(trained):
            assert not torch.equal(v, after[k]), k   # trained (RMSNorm gains move too: lr 3e-3)
        else:
            assert torch.equal(v, after[k]), k   # frozen: bit for bit
    assert "layers 2..2 trained" in open(os.path.join(out, "log.txt")).read()


def test_lora_base_unchanged_and_the_merged_model_computes_the_adapted_one(source, tmp_path):
    model = rundir.load_gpt(source)[0]
    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_tuning(model, "lora", rank=2, alpha=4.0)
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():   # B = 0: the adapted model starts as the base
        torch.testing.assert_close(model(x)[0], _plain(model.config, base)(x)[0], rtol=0, atol=1e-6)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(x, x)[1].backward()
        opt.step()
        opt.zero_grad()
    for k, v in base.items():
        assert torch.equal(model.state_dict()[k], v), k   # base weights untouched before the merge
    with torch.no_grad():
        adapted = model(x)[0]
        loaded = _plain(model.config, plain_state_dict(model))(x)[0]   # what a checkpoint holds
        merged = merge(model)(x)[0]
    assert not torch.allclose(adapted, _plain(model.config, base)(x)[0], atol=1e-4)   # the adapters did learn
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loaded, adapted, rtol=1e-5, atol=1e-5)
    assert not any("lora" in k for k in model.state_dict())


def _plain(cfg, sd):
    m = GPT(cfg).eval()
    m.load_state_dict(sd)
    return m


def test_lora_through_train_py_writes_the_plain_merged_model(source, tmp_path, capsys):
    out = str(tmp_path / "lora")
    train.main(TINY + [f"--init_from={source}", f"--out_dir={out}", "--max_iters=2", "--tune=lora", "--lora_rank=2"])
    healed = rundir.load_gpt(out)[0]   # loads as the plain model: merged weights, no adapters
    changed = [k for k, v in rundir.load_gpt(source)[0].state_dict().items() if not torch.equal(v, healed.state_dict()[k])]
    assert changed and all(k.startswith("blocks.") and "norm" not in k for k in changed)   # block linears only
    err = lambda *a: one_line_error(train.main, [*TINY, f"--out_dir={out}", "--max_iters=3", *a], capsys)
    assert "cannot resume" in err("--tune=lora", "--init_from=resume")
    assert "tune='bad'" in err(f"--init_from={source}", "--tune=bad", "--overwrite=True")
    assert "tune_last=5" in err(f"--init_from={source}", "--tune=partial", "--tune_last=5", "--overwrite=True")
