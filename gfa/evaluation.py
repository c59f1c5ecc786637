"""
Evaluation: held-out perplexity over a fixed token set, and zero-shot multiple-choice scoring.

Perplexity: exp(evaluate(...)), the mean next-token cross-entropy over gfa.data.eval_batches
(the same windows for every run, script and call). Both scores also come per exit (exits=True):
the final norm and LM head after every block, from one forward pass per batch (early exit).

Multiple choice (HellaSwag, OLMo / lm-eval protocol): each ending is scored by the summed
log-probability of its tokens given the context; acc = argmax of that sum, acc_norm = argmax
of the sum divided by the ending's length in characters (lm-eval's acc_norm; a leading joining
space not counted). Rows of HellaSwag itself (they carry activity_label, ctx_a and ctx_b) are
built and cleaned exactly as lm-eval's hellaswag task does: the query is
preprocess("activity_label: ctx_a Ctx_b"), each ending " " + preprocess(ending). Every other
file is scored verbatim: ctx, then each ending as written (so an ending carries its own joining
space). Contexts longer than the model's block_size are left-truncated, with a counted warning.
Tokenizer from the model's vocabulary: 256 -> bytes, >= 50257 -> tiktoken GPT-2 BPE (offline:
set TIKTOKEN_CACHE_DIR); a model imported from HF (hf.py) uses its own tokenizer.json.
"""
import os
import re
from contextlib import nullcontext

import numpy as np
import torch

from gfa.cli import UserError
from gfa.data import eval_batches
from gfa.prepare import jsonl_rows, load_encoding
from model import cross_entropy


@torch.no_grad()
def evaluate(model, data, block_size, batch_size, n_batches, device, ctx=None, exits=False):
    """Mean next-token cross-entropy (nats/token) of model over eval_batches(); ppl = exp(loss).
    exits=True: {block i: the loss of the exit after block i} for every block that runs, from one
    pass per batch (GPT.exit_states; the last one is the model's own loss)."""
    was_training = model.training
    model.eval()
    total, count = None, 0
    for x, y in eval_batches(data, block_size, batch_size, n_batches):
        x, y = x.to(device), y.to(device)
        with ctx or nullcontext():
            if exits:
                states = model.exit_states(x)
                losses = [cross_entropy(model.head(h), y, reduction="sum") for _, h in states]
            else:
                losses = [cross_entropy(model(x)[0], y, reduction="sum")]
        batch = torch.stack(losses).double()
        total = batch if total is None else total + batch
        count += y.numel()
    model.train(was_training)
    mean = (total / count).tolist()
    return dict(zip((i for i, _ in states), mean)) if exits else mean[0]


def get_encoder(vocab_size, tokenizer=None):
    """text -> token ids for a model's vocabulary: 256 -> UTF-8 bytes, >= 50257 -> GPT-2 BPE; or, for a
    model imported from HF, tokenizer: the folder holding its tokenizer.json (gfa.hf_llama.source_tokenizer)."""
    if tokenizer:
        return load_encoding(tokenizer).encode
    if vocab_size == 256:
        return lambda s: list(s.encode("utf-8"))
    if vocab_size >= 50257:
        enc = load_encoding("gpt2")
        return lambda s: enc.encode(s, allowed_special="all")
    raise UserError(f"vocab_size={vocab_size}: no tokenizer known for it (256 = bytes, >= 50257 = GPT-2 BPE; a model "
                    f"imported with hf.py uses the tokenizer.json of the folder it came from, which is gone)")


def hellaswag_preprocess(text):
    """lm-eval's HellaSwag cleaning (WikiHow rows carry markup such as "[header]", "[title]")."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def is_hellaswag_row(row):
    return all(isinstance(row.get(k), str) for k in ("activity_label", "ctx_a", "ctx_b"))


def hellaswag_item(row):
    """(query, continuations) of an official HellaSwag row, as lm-eval builds them: the joined
    "activity_label: ctx_a Ctx_b" is cleaned as one string, each ending on its own."""
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    query = hellaswag_preprocess(row["activity_label"] + ": " + ctx)
    return query, [" " + hellaswag_preprocess(e) for e in row["endings"]]


def load_multiple_choice(path, limit=0):
    """[(context, [4 continuations], label)] from a jsonl with ctx, endings and label per row.
    HellaSwag's own rows are cleaned as lm-eval does; any other row is used verbatim (its
    endings carry their joining space). Malformed rows -> UserError."""
    if not os.path.isfile(path):
        raise UserError(f"HellaSwag file {path} does not exist (run data/hellaswag/prepare.py, or pass "
                        f"any jsonl in HellaSwag layout with --hellaswag)")
    items = []
    for n, row in jsonl_rows(path):
        if not {"ctx", "endings", "label"} <= set(row):
            raise UserError(f"{path}:{n} needs the fields ctx, endings and label")
        ctx, endings, label = row["ctx"], row["endings"], row["label"]
        if not isinstance(ctx, str) or not isinstance(endings, list) or len(endings) != 4 \
                or not all(isinstance(e, str) and e.strip() for e in endings):
            raise UserError(f"{path}:{n} ctx must be a string and endings a list of 4 non-empty strings")
        try:
            label = int(label)
        except (TypeError, ValueError):
            label = -1
        if not 0 <= label < 4:
            raise UserError(f"{path}:{n} label must be 0..3, got {row['label']!r}")
        if is_hellaswag_row(row):
            ctx, endings = hellaswag_item(row)
        items.append((ctx, list(endings), label))
        if limit and len(items) >= limit:
            break
    if not items:
        raise UserError(f"{path} holds no items")
    return items


def _continuation_logprobs(model, x, rows, cols, tgt, exits):
    """[exits, scored tokens] log-prob of each continuation token (rows, cols: where in x; tgt: the
    token): the model's own (one row), or at every exit from one pass (exits=True; the head runs on
    the scored positions only)."""
    if exits:
        logits = [model.head(h[rows, cols]) for _, h in model.exit_states(x)]
    else:
        logits = [model(x)[0][rows, cols]]
    return torch.stack([torch.log_softmax(lg.float(), dim=-1).gather(1, tgt[:, None])[:, 0] for lg in logits])


@torch.no_grad()
def ending_logprobs(model, items, encode, device, ctx, max_tokens=16384, exits=False):
    """[n_items, 4] summed log-prob of each continuation's tokens given its context; exits=True:
    [exits, n_items, 4], at the exit after every block that runs, from one pass per batch.
    All 4 endings of several items go in one right-padded batch (items sorted by length, at most
    max_tokens padded tokens); contexts longer than block_size are left-truncated, and counted in
    a warning."""
    T = model.config.block_size
    seqs = []   # per item: 4 x (tokens, number of continuation tokens)
    truncated = 0
    for c, ends, _ in items:
        ce = encode(c)
        row = []
        for e in ends:
            ee = encode(e)
            toks = (ce + ee)[-(T + 1):]
            row.append((toks, min(len(ee), len(toks) - 1)))
        truncated += any(len(toks) < len(ce) + n for toks, n in row)   # n: the ending's tokens kept
        seqs.append(row)
    if truncated:
        print(f"warning: {truncated} of {len(items)} multiple-choice items are longer than the model's context "
              f"(block_size {T}): their contexts lost their start (left-truncated)")
    order = sorted(range(len(items)), key=lambda i: max(len(t) for t, _ in seqs[i]))
    was_training = model.training
    model.eval()
    cuda = torch.device(device).type == "cuda"
    to_device = lambda t: t.pin_memory().to(device, non_blocking=True) if cuda else t
    scored = []
    i = 0
    while i < len(order):
        j = i + 1
        while j < len(order) and 4 * (j + 1 - i) * (max(len(t) for t, _ in seqs[order[j]]) - 1) <= max_tokens:
            j += 1
        batch = [s for it in order[i:j] for s in seqs[it]]
        L = max(len(t) for t, _ in batch) - 1
        x = torch.zeros(len(batch), L, dtype=torch.long)
        y = torch.full((len(batch), L), -1, dtype=torch.long)   # -1: not a continuation token
        for b, (toks, n) in enumerate(batch):
            t = torch.tensor(toks)
            x[b, :len(toks) - 1] = t[:-1]
            y[b, len(toks) - 1 - n:len(toks) - 1] = t[len(toks) - n:]
        rows, cols = (y >= 0).nonzero(as_tuple=True)   # on the host: no device sync per batch
        x, rows, cols, tgt = (to_device(t) for t in (x, rows, cols, y[rows, cols]))
        with ctx:
            lp = _continuation_logprobs(model, x, rows, cols, tgt, exits)   # [exits, scored tokens]
        per_seq = torch.zeros(len(lp), len(batch), device=device, dtype=torch.float64).index_add_(1, rows, lp.double())
        scored.append((order[i:j], per_seq))
        i = j
    out = np.zeros((len(scored[0][1]), len(items), 4))
    for items_of_batch, per_seq in scored:   # one copy back per batch, after all are queued
        out[:, items_of_batch] = per_seq.view(len(per_seq), -1, 4).cpu().numpy()
    model.train(was_training)
    return out if exits else out[0]


def choice_accuracy(logprobs, items):
    labels = np.array([lab for _, _, lab in items])
    # characters of the ending itself, without a leading " " that joins it to the context (lm-eval)
    chars = np.array([[max(len(e.removeprefix(" ")), 1) for e in ends] for _, ends, _ in items])
    acc = float((logprobs.argmax(1) == labels).mean())
    acc_norm = float(((logprobs / chars).argmax(1) == labels).mean())
    return acc, acc_norm
