"""
Evaluation: held-out perplexity over a fixed token set, and zero-shot log-likelihood scoring.

Perplexity: exp(evaluate(...)), the mean next-token cross-entropy over gfa.data.eval_batches
(the same windows for every run, script and call); mean_loss() gives it over any batches as a
device tensor (prune.py's calibration perplexity, without a host sync per call). Every score also
comes per exit (exits=True): the final norm and LM head after every block, from one forward pass
per batch (early exit).

Log-likelihood (continuation_logprobs): the summed log-probability of a continuation given its
context, and whether greedy decoding would produce it, for many (context, continuation) pairs at
once, batched by length. Pairs are tokenised as lm-eval tokenises a loglikelihood request
(encode_pair), so this scorer and the lm-eval adapter (gfa/lm_eval_adapter.py) score the same
tokens. Sequences longer than the model's block_size lose the start of their context.

Multiple choice (HellaSwag, OLMo / lm-eval protocol), any number of endings per item (2 for
WinoGrande-style sets, 4 for HellaSwag, ...): each ending is scored by the summed log-probability
of its tokens given the context; acc = argmax of that sum, acc_norm = argmax of the sum divided by
the ending's length in characters (lm-eval's acc_norm; a leading joining space not counted). Rows
of HellaSwag itself (they carry activity_label, ctx_a and ctx_b) are built and cleaned exactly as
lm-eval's hellaswag task does: the query is preprocess("activity_label: ctx_a Ctx_b"), each ending
" " + preprocess(ending). Every other file is scored verbatim: ctx, then each ending as written (so
an ending carries its own joining space). Truncated items are counted in a warning.

Partial scoring (WinoGrande, as lm-eval scores it): one context per option and one continuation shared by
all, scored under each context; acc = argmax of its log-prob (acc_norm equals acc: the continuation is the
same). Rows of WinoGrande itself (sentence with "_", option1, option2, answer "1"/"2") are built as
lm-eval's winogrande task builds them: context i = the sentence up to "_" with option i, continuation =
" " + the rest of the sentence, stripped; any other row gives contexts (a list), continuation and label.

Tokenizer from the model's vocabulary: 256 -> UTF-8 bytes (EOT byte 0), >= 50257 -> tiktoken's
GPT-2 BPE (EOT 50256; offline: set TIKTOKEN_CACHE_DIR), as gfa/prepare.py tokenises the data; a
model imported from HF (hf.py) uses its own tokenizer.json (gfa.hf_llama.source_tokenizer).
"""
import os
import re
from contextlib import nullcontext

import numpy as np
import torch

from gfa.cli import UserError
from gfa.data import eval_batches
from gfa.prepare import eot_token, jsonl_rows, load_encoding
from model import cross_entropy


# ---- perplexity ---------------------------------------------------------------------------------
def _batch_losses(model, x, y, exits):
    """[exits] summed next-token cross-entropy of one batch: the model's own (one row), or at the exit
    after every block that runs (exits=True), from one pass."""
    if exits:
        return torch.stack([cross_entropy(model.head(h), y, reduction="sum") for _, h in model.exit_states(x)])
    return cross_entropy(model(x)[0], y, reduction="sum")[None]


@torch.no_grad()
def mean_loss(model, batches, device, ctx=None, exits=False):
    """Mean next-token cross-entropy (nats/token) over (x, y) batches, as a float64 tensor on the
    device (no host sync, so many of them can be queued and read at once): 0-d, or [exits] with
    exits=True (one per block that runs, in model.exit_states' order)."""
    was_training = model.training
    model.eval()
    total, count = 0, 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with ctx or nullcontext():
            total = total + _batch_losses(model, x, y, exits).double()
        count += y.numel()
    model.train(was_training)
    return total / count if exits else total[0] / count


def evaluate(model, data, block_size, batch_size, n_batches, device, ctx=None, exits=False):
    """Mean next-token cross-entropy (nats/token) of model over eval_batches(); ppl = exp(loss).
    exits=True: {block i: the loss of the exit after block i} for every block that runs (GPT.exit_states;
    the last one is the model's own loss)."""
    loss = mean_loss(model, eval_batches(data, block_size, batch_size, n_batches), device, ctx, exits)
    if not exits:
        return loss.item()
    blocks_that_run = [i for i in range(model.config.n_layer) if i not in model.passthrough]
    return dict(zip(blocks_that_run, loss.tolist()))


# ---- tokens -------------------------------------------------------------------------------------
class Tokenizer:
    """The tokenizer of a model's vocabulary: 256 -> UTF-8 bytes, >= 50257 -> GPT-2 BPE; or, for a model
    imported from HF, hf_folder: the folder holding its tokenizer.json (gfa.hf_llama.source_tokenizer)."""

    def __init__(self, vocab_size, hf_folder=None):
        if hf_folder:
            self.name, self.enc = hf_folder, load_encoding(hf_folder)
            self.eot = self.enc.eot
            return
        if vocab_size == 256:
            self.name, self.enc = "bytes", None
        elif vocab_size >= 50257:
            self.name, self.enc = "gpt2", load_encoding("gpt2")
        else:
            raise UserError(f"vocab_size={vocab_size}: no tokenizer known for it (256 = bytes, >= 50257 = GPT-2 BPE; a "
                            f"model imported with hf.py uses the tokenizer.json of the folder it came from: "
                            f"pass --tokenizer=<that folder>)")
        self.eot = eot_token(self.name)

    def encode(self, text):
        return list(text.encode("utf-8")) if self.enc is None else self.enc.encode(text, allowed_special="all")

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace") if self.enc is None else self.enc.decode(ids)


def encode_pair(tok, context, continuation):
    """(context ids, continuation ids) as lm-eval's TemplateLM tokenises a loglikelihood request:
    trailing whitespace of the context moves to the continuation, the pair is encoded whole and
    split after the context's own tokens; an empty context is the EOT token."""
    if not context:
        cont = tok.encode(continuation)
        return ([tok.eot], cont) if cont[:1] != [tok.eot] else (cont[:1], cont[1:])
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    ctx = tok.encode(context)
    return ctx, tok.encode(context + continuation)[len(ctx):]


@torch.no_grad()
def continuation_logprobs(model, pairs, device, ctx=None, max_tokens=16384, exits=False):
    """For each (context ids, continuation ids): the summed log-prob of the continuation given the
    context, and whether greedy decoding would produce it: (float64 [n], bool [n]); exits=True: the
    log-probs at the exit after every block that runs, [exits, n], from one pass (greedy: the model's own). Sequences longer
    than block_size + 1 lose the start of their context (and a continuation longer than block_size its
    first tokens). Pairs are sorted by length and packed into right-padded batches of at most
    max_tokens padded tokens; results stay on the device until every batch is queued (one copy back
    per batch, no sync between batches)."""
    T = model.config.block_size
    seqs = []   # (tokens, number of continuation tokens scored)
    for c, e in pairs:
        toks = (list(c) + list(e))[-(T + 1):]
        seqs.append((toks, min(len(e), len(toks) - 1)))
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))
    was_training = model.training
    model.eval()
    cuda = torch.device(device).type == "cuda"
    to_device = lambda t: t.pin_memory().to(device, non_blocking=True) if cuda else t
    scored, i = [], 0
    while i < len(order):
        j = i + 1
        while j < len(order) and (j + 1 - i) * (len(seqs[order[j]][0]) - 1) <= max_tokens:
            j += 1
        batch = [seqs[b] for b in order[i:j]]
        L = max(len(t) for t, _ in batch) - 1
        x = torch.zeros(len(batch), L, dtype=torch.long)
        y = torch.full((len(batch), L), -1, dtype=torch.long)   # -1: not a continuation token
        for b, (toks, n) in enumerate(batch):
            t = torch.tensor(toks)
            x[b, :len(toks) - 1] = t[:-1]
            y[b, len(toks) - 1 - n:len(toks) - 1] = t[len(toks) - n:]
        rows, cols = (y >= 0).nonzero(as_tuple=True)   # on the host: no device sync per batch
        x, rows, cols, tgt = (to_device(t) for t in (x, rows, cols, y[rows, cols]))
        lp = []
        with ctx or nullcontext():
            for logits in _scored_logits(model, x, rows, cols, exits):   # per exit: [scored tokens, vocab]
                lp.append(torch.log_softmax(logits.float(), dim=-1).gather(1, tgt[:, None])[:, 0])
        lp = torch.stack(lp)
        per_seq = torch.zeros(len(lp), len(batch), device=device, dtype=torch.float64).index_add_(1, rows, lp.double())
        # greedy check on `logits` as the loop left them: the last exit's, i.e. the model's own output
        misses = torch.zeros(len(batch), device=device).index_add_(0, rows, (logits.argmax(-1) != tgt).float())
        scored.append((order[i:j], per_seq, misses))
        i = j
    logprob, greedy = np.zeros((len(scored[0][1]) if scored else 1, len(seqs))), np.zeros(len(seqs), dtype=bool)
    for idx, per_seq, misses in scored:   # one copy back per batch, after all are queued
        logprob[:, idx] = per_seq.cpu().numpy()
        greedy[idx] = misses.cpu().numpy() == 0
    model.train(was_training)
    return (logprob if exits else logprob[0]), greedy


def _scored_logits(model, x, rows, cols, exits):
    """Logits at the scored positions (rows, cols of x): [the model's own], or one per exit from one pass
    (exits=True; the head runs on the scored positions only, one exit at a time: a generator, so only one
    exit's [scored tokens, vocab] logits live at once)."""
    if exits:
        return (model.head(h[rows, cols]) for _, h in model.exit_states(x))
    return [model(x)[0][rows, cols]]


# ---- multiple choice ----------------------------------------------------------------------------
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


def is_winogrande_row(row):
    return all(isinstance(row.get(k), str) for k in ("sentence", "option1", "option2")) and "_" in row["sentence"] \
        and str(row.get("answer")) in ("1", "2")


def winogrande_item(row):
    """(contexts, [continuation] x 2, label) of an official WinoGrande row, as lm-eval's winogrande task
    (preprocess_winogrande.py) builds it: partial scoring."""
    idx = row["sentence"].index("_")
    contexts = [row["sentence"][:idx] + opt for opt in (row["option1"], row["option2"])]
    cont = " " + row["sentence"][idx + 1:].strip()
    return contexts, [cont, cont], int(row["answer"]) - 1


def partial_item(row, where):
    """(contexts, [continuation] x n, label) of a partial-scoring row: contexts (2 or more), continuation, label."""
    contexts, cont = row["contexts"], row["continuation"]
    if not isinstance(contexts, list) or len(contexts) < 2 or not all(isinstance(c, str) for c in contexts) \
            or not isinstance(cont, str) or not cont.strip():
        raise UserError(f"{where} contexts must be a list of 2 or more strings and continuation a non-empty string")
    return contexts, [cont] * len(contexts), _label(row["label"], len(contexts), where)


def _label(value, n, where):
    try:
        label = int(value)
    except (TypeError, ValueError):
        label = -1
    if not 0 <= label < n:
        raise UserError(f"{where} label must be 0..{n - 1} (one per option), got {value!r}")
    return label


def load_multiple_choice(path, limit=0):
    """[(context, [continuations], label)] from a jsonl with ctx, endings (2 or more) and label per
    row. HellaSwag's own rows are cleaned as lm-eval does; any other row is used verbatim (its
    endings carry their joining space). Partial scoring: a WinoGrande row, or one with contexts,
    continuation and label, gives ([contexts], [the continuation per context], label). Malformed rows
    -> UserError."""
    if not os.path.isfile(path):
        raise UserError(f"multiple-choice file {path} does not exist (run data/hellaswag/prepare.py, or pass "
                        f"any jsonl with ctx, endings and label per row with --hellaswag)")
    items = []
    for n, row in jsonl_rows(path):
        if is_winogrande_row(row) or {"contexts", "continuation", "label"} <= set(row):
            items.append(winogrande_item(row) if is_winogrande_row(row) else partial_item(row, f"{path}:{n}"))
            if limit and len(items) >= limit:
                break
            continue
        if not {"ctx", "endings", "label"} <= set(row):
            raise UserError(f"{path}:{n} needs the fields ctx, endings and label (multiple choice), contexts, "
                            f"continuation and label (partial scoring), or WinoGrande's sentence, option1, option2, "
                            f"answer")
        ctx, endings, label = row["ctx"], row["endings"], row["label"]
        if not isinstance(ctx, str) or not isinstance(endings, list) or len(endings) < 2 \
                or not all(isinstance(e, str) and e.strip() for e in endings):
            raise UserError(f"{path}:{n} ctx must be a string and endings a list of 2 or more non-empty strings")
        # an integer, or its digits as a string (1.7 or true are not a label, whatever int() makes of them)
        label = label if isinstance(label, int) and not isinstance(label, bool) else \
            int(label) if isinstance(label, str) and label.strip().isdigit() else -1
        if not 0 <= label < len(endings):
            raise UserError(f"{path}:{n} label must be 0..{len(endings) - 1} (an integer, one per ending), "
                            f"got {row['label']!r}")
        if is_hellaswag_row(row):
            ctx, endings = hellaswag_item(row)
        if not ctx.strip():
            raise UserError(f"{path}:{n} has an empty context (ctx): every item needs the text its endings continue")
        items.append((ctx, list(endings), label))
        if limit and len(items) >= limit:
            break
    if not items:
        raise UserError(f"{path} holds no items")
    return items


def encode_items(items, tok):
    """Per item, its (context ids, ending ids) pairs (encode_pair): tokenised once, scored for every
    model. A partial-scoring item pairs each of its contexts with its ending."""
    return [[encode_pair(tok, c, e) for c, e in zip([ctx] * len(ends) if isinstance(ctx, str) else ctx, ends)]
            for ctx, ends, _ in items]


def ending_logprobs(model, encoded, device, ctx, max_tokens=16384, exits=False):
    """[n_items, most endings] summed log-prob of each ending's tokens given its context (-inf past
    an item's last ending), for encode_items' pairs; exits=True: [exits, n_items, most endings], at
    the exit after every block that runs, from one pass per batch. Items longer than the model's
    context lose the start of their context, and are counted in a warning."""
    lp, _ = continuation_logprobs(model, [p for pairs in encoded for p in pairs], device, ctx, max_tokens, exits)
    lp = lp if exits else lp[None]
    out = np.full((len(lp), len(encoded), max(len(pairs) for pairs in encoded)), -np.inf)
    i = 0
    for row, pairs in enumerate(encoded):
        out[:, row, :len(pairs)] = lp[:, i:i + len(pairs)]
        i += len(pairs)
    warn_truncated(encoded, model.config.block_size, "multiple-choice items")
    return out if exits else out[0]


def warn_truncated(items, T, what):
    """Warn with a count when items (each a (context ids, continuation ids) pair, or a list of them)
    are longer than the model's context T (+1: the last token is not fed): continuation_logprobs
    keeps their end, so their contexts lose their start. Returns the count."""
    long = lambda p: len(p[0]) + len(p[1]) > T + 1
    n = sum(any(long(p) for p in item) if isinstance(item, list) else long(item) for item in items)
    if n:
        print(f"warning: {n} of {len(items)} {what} are longer than the model's context (block_size {T}): their "
              f"contexts lost their start (left-truncated)")
    return n


def choice_accuracy(logprobs, items):
    """(acc, acc_norm) of ending_logprobs' scores: argmax of the summed log-prob, and of the log-prob
    per character of the ending itself (without a leading " " that joins it to the context, lm-eval)."""
    labels = np.array([lab for _, _, lab in items])
    chars = np.ones(logprobs.shape)
    for row, (_, ends, _) in enumerate(items):
        chars[row, :len(ends)] = [max(len(e.removeprefix(" ")), 1) for e in ends]
    acc = float((logprobs.argmax(1) == labels).mean())
    acc_norm = float(((logprobs / chars).argmax(1) == labels).mean())
    return acc, acc_norm
