"""What several test files share: the tiny model config, run directories written through
gfa.rundir as train.py writes them, a local lm-eval task, train.py on forked gloo ranks, and the
in-process check of a one-line error."""
import json
import os
import socket
import time
import traceback
import zlib

import numpy as np
import pytest
import torch

from gfa import rundir
from gfa.cli import cli
from model import GPT, GPTConfig

# the shared tiny shape: 4 layers of 4 heads x 8, d_model 32, bytes
TINY = dict(vocab_size=256, block_size=32, d_model=32, n_layer=4, head_dim=8, d_attn0=32, S_d=8, d_ffn0=64)


def tiny_config(**over):
    return GPTConfig(**(TINY | over))


def tiny_model(seed=0, **over):
    torch.manual_seed(seed)
    return GPT(tiny_config(**over)).eval()


def zero_branch(model, layer):
    """Block `layer` made an identity: its attention and MLP outputs are zero (the residual passes through)."""
    with torch.no_grad():
        model.blocks[layer].attn.proj.weight.zero_()
        model.blocks[layer].ffn.down.weight.zero_()


def text_tokens(n, seed):
    """Byte 'text' with structure (repeated words), so a model's numbers are not degenerate."""
    rng = np.random.default_rng(seed)
    words = [b"the ", b"cat ", b"sat ", b"on ", b"a ", b"mat. ", b"dog ", b"ran "]
    out = b"".join(words[i] for i in rng.integers(0, len(words), n))
    return np.frombuffer(out[:n], dtype=np.uint8).astype(np.uint16)


def write_run(path, model, data_dir=None, rows=None, iter_num=5, dump=True, train_config=None, sublayers=False):
    """A run directory as train.py writes it (gfa.rundir): model_config.json, ckpt.pt, grad_norms.npz.
    rows: the per-step norm rows, [steps, groups] (default: 5 random rows); sublayers: the groups are
    attention and MLP sub-blocks (train.py's dump), else whole layers (the dump of earlier versions)."""
    names = list(model.param_groups_by_layer(sublayers))
    d = rundir.GradNormDump(names, rundir.file(str(path), rundir.GRAD_DUMP))
    if rows is None:
        rows = 1.0 + np.random.default_rng(0).random((5, len(names)))
    for step, row in enumerate(rows):
        d.record(step, torch.tensor(row, dtype=torch.float32))
    # each run its own seed (from its folder's name), as seeds of one config have: pooling refuses a seed twice
    seed = zlib.crc32(os.path.basename(os.path.normpath(str(path))).encode())
    tc = {"dataset": "", "data_dir": str(data_dir or ""), "batch_size": 4, "seed": seed} | (train_config or {})
    rundir.save_gpt(str(path), model, tc, iter_num, grad_dump=d.state_dict() if dump else None)
    if dump:
        d.flush()
    return str(path)


def write_jsonl(path, rows):
    """rows: dicts (written as JSON) or raw lines."""
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


# an lm-eval multiple-choice task over a local jsonl: the head every local task shares, then its fields
TASK_HEAD = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {path}
  cache_dir: {cache}
validation_split: validation
output_type: multiple_choice
"""
# the in-house layout: the endings carry their joining space (the in-house verbatim reading), the task trims
# them and joins them with " ", so both score the same text
LOCAL_TASK = TASK_HEAD + """doc_to_text: "{{{{ctx}}}}"
doc_to_choice: "{{{{endings | map('trim') | list}}}}"
doc_to_target: label
target_delimiter: " "
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def write_local_task(folder, data_path, name="tiny_mc", template=LOCAL_TASK):
    """folder/<name>.yaml, an lm-eval task over data_path (a jsonl of ctx, endings, label, or the rows the
    template reads): --include_path folder. The datasets cache goes beside it, not into the home folder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.yaml").write_text(template.format(name=name, path=data_path, cache=folder / "hf_cache"))
    return str(folder)


WORD_VOCAB = {"[UNK]": 0, "</s>": 1, "to": 2, "be": 3, "or": 4, "not": 5}


def write_word_level_tokenizer(folder):
    """An HF tokenizer folder (tokenizer.json + tokenizer_config.json, eos '</s>') over WORD_VOCAB, so the
    ids a test expects are known by hand; needs the tokenizers package (the caller importorskips it)."""
    import tokenizers
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(WORD_VOCAB, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "</s>"}, f)
    return folder


def one_line_error(main, argv, capsys):
    """Run main(argv) as its __main__ does (gfa.cli.cli); assert it exits 2 with one stderr line
    'error: ...' and no traceback. Returns that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli(lambda _: main([str(a) for a in argv]))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def train_on_forked_ranks(n, argv, stdout=None, timeout=120):
    """train.main(argv) as n ranks of a gloo group, in processes forked from this one (no torch import
    to repeat per rank: seconds faster than torchrun, which tests/test_train.py's DDP test runs).
    stdout: a file for rank 0's output (the other ranks' is dropped). 0 when every rank exits cleanly."""
    import torch._dynamo, torch.distributed.checkpoint, torch.distributed.fsdp  # noqa: F401, E401  (once, not per rank)
    import train
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pids = []
    for rank in range(n):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                # first, while this is the child's only thread: rebuilds the thread pool fork invalidated (else
                # two threads can race to rebuild it: "Invalid thread pool!")
                torch.set_num_threads(1)
                os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(n), MASTER_ADDR="127.0.0.1",
                                  MASTER_PORT=str(port))
                if stdout:
                    with open(stdout if rank == 0 else os.devnull, "w") as f:
                        os.dup2(f.fileno(), 1)
                train.main(argv)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        pids.append(pid)
    codes, deadline = {}, time.time() + timeout
    while len(codes) < n:
        for p in set(pids) - set(codes):
            done, status = os.waitpid(p, os.WNOHANG)
            if done:
                codes[p] = os.waitstatus_to_exitcode(status)
        if len(codes) < n and time.time() > deadline:
            for p in set(pids) - set(codes):
                os.kill(p, 9)
                os.waitpid(p, 0)
            pytest.fail(f"{n}-rank run did not finish in {timeout} s")
        time.sleep(0.05)
    return int(any(codes.values()))


class Exited:
    """A child process that has already exited with `returncode` (a script run in this process instead)."""

    def __init__(self, returncode):
        self.returncode = returncode

    def poll(self):
        return self.returncode

    def wait(self):
        return self.returncode


def scripts_in_process(monkeypatch, module, run):
    """module.start_script (prune.py's) runs run(script, argv) -> exit status in this process, writing the
    log file a child would have written."""
    def start(script, argv, log=None):
        if log:
            open(log, "w").close()
        return Exited(run(script, argv))
    monkeypatch.setattr(module, "start_script", start)
