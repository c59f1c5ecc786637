"""
The paper's training data: Dolma, streamed through `datasets`, tokenised with tiktoken's GPT-2
encoding in parallel, written as nanoGPT-style uint16 data/dolma/train.bin and val.bin with an
EOT token (50256) after each document. Stops at a token budget (the paper: one epoch of 7B).

    python data/dolma/prepare.py                        # 7B tokens of allenai/dolma v1_6-sample
    python data/dolma/prepare.py --tokens 1e8           # a quick 100M-token slice
    python data/dolma/prepare.py --dataset allenai/dolma --name v1_7 --workers 32

Needs network access to the Hugging Face Hub (or a local mirror via HF_HOME / HF_DATASETS_OFFLINE)
and tiktoken's gpt2 files (TIKTOKEN_CACHE_DIR for an offline cache). 7B tokens are 14 GB on disk.
Already have Dolma's .json.gz shards locally? `python data/dolma/prepare.py --data_files shards/*.json.gz`
streams them through the same `datasets` code (so does data/prepare_local.py, without `datasets`). The tokenise-and-write code is gfa/prepare.py's write_bins().
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))   # the repo root
from gfa.cli import ArgumentParser, UserError, cli  # noqa: E402
from gfa.prepare import write_bins  # noqa: E402


def main(argv=None):
    ap = ArgumentParser(description="Stream Dolma, tokenise (GPT-2 BPE), write train.bin / val.bin")
    ap.add_argument("--dataset", default="allenai/dolma", help="Hugging Face dataset id")
    ap.add_argument("--name", default="v1_6-sample", help="dataset config (Dolma version)")
    ap.add_argument("--split", default="train", help="the dataset split to stream")
    ap.add_argument("--data_files", nargs="+", help="local Dolma shards (*.json.gz / *.jsonl / *.parquet) instead "
                    "of the Hub; streamed through the same `datasets` code")
    ap.add_argument("--text_key", default="text", help="the field holding each document's text")
    ap.add_argument("--tokens", type=float, default=7e9, help="token budget, train + val (paper: 7B)")
    ap.add_argument("--val_fraction", type=float, default=0.0005, help="share of documents held out")
    ap.add_argument("--workers", type=int, default=None, help="tokeniser processes (default: all cores)")
    ap.add_argument("--out_dir", default=os.path.dirname(os.path.abspath(__file__)),
                    help="where train.bin / val.bin go (data/dolma_100m for config/small.py)")
    args = ap.parse_args(argv)

    try:
        import datasets   # imported here so the rest of the repo (and its tests) never needs it
    except ImportError:
        raise UserError("data/dolma/prepare.py needs the `datasets` package: pip install datasets") from None
    try:
        # allenai/dolma is a loading script: datasets < 4 runs it with trust_remote_code
        if args.data_files:   # local shards: the generic json / parquet builders, streamed
            builder = "parquet" if all(f.endswith(".parquet") for f in args.data_files) else "json"
            ds = datasets.load_dataset(builder, data_files=args.data_files, split="train", streaming=True)
        else:
            extra = {"trust_remote_code": True} if int(datasets.__version__.split(".")[0]) < 4 else {}
            ds = datasets.load_dataset(args.dataset, name=args.name, split=args.split, streaming=True, **extra)
    except Exception as e:
        raise UserError(f"cannot open {args.dataset} ({args.name}) for streaming: {type(e).__name__}: "
                        f"{(str(e).splitlines() or [''])[0]} (with local shards use data/prepare_local.py)") from None
    docs = ((ex[args.text_key] or "", True) for ex in ds)
    return write_bins(docs, args.out_dir, "gpt2", args.val_fraction, int(args.tokens), args.workers)


if __name__ == "__main__":
    cli(main)
