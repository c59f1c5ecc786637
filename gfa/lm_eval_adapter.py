"""
lm-evaluation-harness for this codebase's checkpoints: the model "gfa", registered with lm-eval.

    python -m gfa.lm_eval_adapter --model gfa --model_args ckpt=out/s1,device=cuda \
        --tasks piqa,winogrande,hellaswag,arc_easy,arc_challenge          # the hub's tasks: needs the web
    python -m gfa.lm_eval_adapter --model gfa --model_args ckpt=out/s1 --tasks my_task \
        --include_path my_tasks/                                          # task YAMLs over local files: offline

lm-eval is optional (pip install -r requirements-extra.txt). Run from the repository root, this
module registers "gfa" and hands every argument to lm-eval's own command line, so all of lm_eval's
options work (--limit, --output_path, --log_samples, ...); `lm_eval` itself does not import
project code, hence the wrapper. In Python, `import gfa.lm_eval_adapter` registers it for
lm_eval.simple_evaluate(model="gfa", ...).

model_args: ckpt (a run directory, or its ckpt.pt: passthrough layers in its config are skipped,
a physically pruned model loads as saved), device (default cuda when available), dtype (float32,
tf32 or bfloat16), max_tokens (padded tokens per batch, default 16384; lm-eval's batch_size is
not used: batches are packed by length up to max_tokens), tokenizer (an HF model folder whose
tokenizer.json encodes the text; default: the folder an hf.py-imported run came from, else the
vocabulary's: bytes or GPT-2).

  loglikelihood          gfa.evaluation.continuation_logprobs: lm-eval's tokenisation of each
                         (context, continuation), batched by length on the device
  loglikelihood_rolling  lm-eval's rolling windows of block_size tokens (EOT first), scored the same way
  generate_until         greedy, through the KV cache (model.decode_step), until a stop string or EOT

prune.py --tasks uses load_tasks() and evaluate_tasks() on the models it prunes.
"""
import difflib
import os
import sys

import numpy as np
import torch

from gfa import rundir
from gfa.cli import UserError
from gfa.device import autocast_for, pick_device
from gfa.evaluation import Tokenizer, continuation_logprobs, warn_truncated
from gfa.hf_llama import source_tokenizer

try:
    import lm_eval.models  # noqa: F401  (the built-in models first: a registry holding only ours would hide them)
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import get_model, register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, simple_parse_args_string
except ImportError as e:
    _MISSING = (f"lm-eval is not installed ({e}): pip install -r requirements-extra.txt (or pip install lm-eval); "
                f"without it, leave out --tasks (the in-house multiple-choice scorer needs nothing)")
    if __name__ == "__main__":
        sys.exit(f"error: {_MISSING}")
    raise UserError(_MISSING) from None

NAME = "gfa"


class GFALM(TemplateLM):
    """A GPT of this codebase as an lm-eval model: from a run directory (ckpt=...) or a model object
    (model=..., prune.py's passthrough-pruned models)."""

    def __init__(self, ckpt=None, device="", dtype="float32", max_tokens=16384, tokenizer=None, model=None, tok=None,
                 **lm_eval_args):
        super().__init__()   # lm_eval_args: batch_size, max_batch_size, ... that lm-eval passes to every model
        self._device = pick_device(str(device or ""))
        if model is None:
            if not ckpt:
                raise UserError("--model_args needs ckpt=<run directory or its ckpt.pt>")
            run = (os.path.dirname(ckpt) or ".") if str(ckpt).endswith(".pt") else ckpt
            model, loaded = rundir.load_gpt(run, self._device)
            # an imported HF model's text goes through its own tokenizer.json (tokenizer=<folder> overrides)
            tok = Tokenizer(model.config.vocab_size, source_tokenizer(loaded, tokenizer))
        self.model = model
        self.ctx = autocast_for(torch.device(self._device).type, dtype)
        self.tok = tok or Tokenizer(model.config.vocab_size, tokenizer)
        self.max_tokens = int(max_tokens)

    @classmethod
    def create_from_arg_string(cls, arg_string, additional_config=None):
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    MODEL_ARGS = ("ckpt", "device", "dtype", "max_tokens", "tokenizer")   # what --model_args may set

    @classmethod
    def create_from_arg_obj(cls, arg_dict, additional_config=None):
        """--model_args win over what lm-eval's command line adds for every model (its --device default);
        a key the gfa model does not take is a one-line error (not silently dropped)."""
        unknown = sorted(set(arg_dict) - set(cls.MODEL_ARGS))
        if unknown:
            close = difflib.get_close_matches(unknown[0], cls.MODEL_ARGS, n=1)
            raise UserError(f"--model_args {unknown[0]}=...: the gfa model takes {', '.join(cls.MODEL_ARGS)}"
                            + (f" (did you mean {close[0]}?)" if close else ""))
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @property
    def eot_token_id(self):
        return self.tok.eot

    @property
    def max_length(self):
        return self.model.config.block_size

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        return self.tok.encode(string)

    def tok_decode(self, tokens, **kwargs):
        return self.tok.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
        """requests: ((context, continuation), context ids, continuation ids), tokenised by TemplateLM.
        Requests longer than the model's context lose the start of their context: counted in a warning."""
        warn_truncated([(c, e) for _, c, e in requests], self.model.config.block_size, "lm-eval requests")
        lp, greedy = continuation_logprobs(self.model, [(c, e) for _, c, e in requests], self._device, self.ctx,
                                              self.max_tokens)
        out = [(float(a), bool(b)) for a, b in zip(lp, greedy)]
        for (key, _, _), result in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", key, result)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        """The log-likelihood of each whole string: lm-eval's disjoint windows, all scored in one pass."""
        windows, owner = [], []
        for i, req in enumerate(requests):
            ids = self.tok_encode(req.args[0])
            for w in get_rolling_token_windows(ids, self.prefix_token_id, self.max_length, context_len=1):
                windows.append(make_disjoint_window(w))
                owner.append(i)
        lp, _ = continuation_logprobs(self.model, windows, self._device, self.ctx, self.max_tokens)
        totals = np.zeros(len(requests))
        np.add.at(totals, np.array(owner, dtype=np.int64), lp)
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), float(total))
        return [float(t) for t in totals]

    def generate_until(self, requests, disable_tqdm=False):
        out, self._cut = [], 0
        for req in requests:
            context, gen_kwargs = req.args
            out.append(self.greedy_until(context, dict(gen_kwargs or {})))
            self.cache_hook.add_partial("generate_until", req.args, out[-1])
        if self._cut:
            print(f"warning: {self._cut} of {len(requests)} lm-eval generation contexts are longer than the model's "
                  f"context leaves room for (block_size {self.max_length}): they lost their start (left-truncated)")
        return out

    @torch.no_grad()
    def greedy_until(self, context, gen_kwargs):
        """Greedy continuation of context through the KV cache: max_gen_toks tokens (default 256), cut
        before the first of gen_kwargs['until'] or at EOT. Sampling is not supported."""
        if gen_kwargs.get("do_sample") or float(gen_kwargs.get("temperature") or 0) > 0:
            raise UserError("the gfa model generates greedily only: drop do_sample / temperature from the task")
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        T = self.max_length
        new = max(1, min(int(gen_kwargs.get("max_gen_toks", 256)), T - 1))
        ids = self.tok_encode(context)
        self._cut = getattr(self, "_cut", 0) + (len(ids) > T - new)   # counted for generate_until's warning
        ids = ids[-(T - new):] or [self.tok.eot]
        model, dev = self.model, self._device   # no dropout: train or eval mode computes the same
        cache = model.new_kv_cache(1, len(ids) + new)
        with self.ctx:
            logits, _ = model(torch.tensor([ids], device=dev), kv_cache=cache, pos=0, last_only=True)
            nxt = logits[:, -1].float().argmax(dim=-1, keepdim=True)
            out, positions = [], torch.arange(len(ids), len(ids) + new, device=dev)
            for step in range(new):
                t = int(nxt)   # the stop strings are checked on text: one host sync per token
                if t == self.tok.eot:
                    break
                out.append(t)
                if until and any(u in self.tok.decode(out) for u in until):
                    break
                if step + 1 < new:
                    nxt = model.decode_step(nxt, positions[step], cache)
        text = self.tok.decode(out)
        for u in until:
            text = text.split(u)[0]
        return text


def _registered():
    try:
        get_model(NAME)
        return True
    except (ValueError, KeyError):
        return False


if not _registered():   # once: `python -m` runs this file as __main__, and lm-eval may import it again
    register_model(NAME)(GFALM)


# ---- prune.py's use: tasks loaded once, every pruned model scored on them ----------------------------
def load_tasks(names, include_path=None):
    """lm-eval's task dict for `names` (built-in tasks, or task YAMLs in include_path), data loaded
    now: an unknown task or data that cannot be read is a one-line error before any model work."""
    from lm_eval.tasks import TaskManager
    if include_path and not os.path.isdir(include_path):
        raise UserError(f"--include_path {include_path} is not a folder (of lm-eval task YAMLs)")
    manager = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    if manager is None or not set(names) <= set(manager.all_tasks):   # indexing the built-ins takes seconds
        manager = TaskManager(include_path=include_path)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise UserError(f"lm-eval task {unknown[0]!r} is unknown: not one of lm-eval's tasks nor a task YAML in "
                        f"--include_path (`lm_eval ls tasks` lists them)")
    try:
        return manager.load(list(names))
    except Exception as e:   # lm-eval and datasets raise anything here: a missing file, the hub out of reach
        raise UserError(f"lm-eval cannot load the data of {', '.join(names)} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else ''}): a local task's data_files are "
                        f"missing, or the hub is out of reach (offline, use task YAMLs over local files)") from None


def evaluate_tasks(model, tasks, device, dtype="float32", limit=0, max_tokens=16384, tok=None):
    """{task: {metric: value}} of a model (its passthrough as set) on load_tasks()' tasks, zero-shot.
    Metrics are lm-eval's (acc, acc_norm, ...; a filter other than 'none' is kept in the name).
    tok: the model's Tokenizer (default: its vocabulary's)."""
    from lm_eval.evaluator import evaluate
    lm = GFALM(model=model, device=device, dtype=dtype, max_tokens=max_tokens, tok=tok)
    res = evaluate(lm, tasks, limit=limit or None, log_samples=False, bootstrap_iters=0)
    out = {}
    for task, metrics in res["results"].items():
        out[task] = {}
        for key, value in metrics.items():
            name, _, filt = key.partition(",")
            if filt and isinstance(value, (int, float)) and "stderr" not in name:
                out[task][name if filt == "none" else key] = float(value)
    return out


if __name__ == "__main__":   # lm-eval's command line, with "gfa" registered; our mistakes as one line
    from lm_eval.__main__ import cli_evaluate
    from gfa.cli import cli
    cli(lambda argv: cli_evaluate())
