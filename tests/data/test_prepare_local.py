"""The data recipes in process: data/prepare_local.py with both tokenizers (document split by
hand, GPT-2 ids from tiktoken itself), jsonl edge cases and clean failure, and
data/dolma/prepare.py's real `datasets` streaming path on local shards."""
import gzip
import importlib.util
import json
import os
import sys

import numpy as np
import pytest

from gfa.cli import UserError
from gfa.data import DATA
from gfa.prepare import write_bins
from helpers import write_word_level_tokenizer

sys.path.insert(0, DATA)
import prepare_local  # noqa: E402


def _load_script(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_local_preparer_bytes_and_gpt2(tmp_path, gpt2_cache, monkeypatch):
    src = tmp_path / "corpus.jsonl"
    docs = [f"Document number {i}: to be, or not to be. ü" for i in range(20)]
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prepare_local.main(["--out_dir", str(tmp_path / "bytes"), "--tokenizer", "bytes", "--val_fraction", "0.1",
                        "--workers", "2", str(src)])
    train_ids = np.fromfile(tmp_path / "bytes/train.bin", dtype=np.uint16)
    val_ids = np.fromfile(tmp_path / "bytes/val.bin", dtype=np.uint16)
    n = [len(d.encode()) + 1 for d in docs]
    assert len(val_ids) == n[9] + n[19] and len(train_ids) == sum(n) - len(val_ids)   # docs 9 and 19 held out
    assert bytes(train_ids[:n[0] - 1].astype(np.uint8)).decode() == docs[0] and train_ids[n[0] - 1] == 0
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", gpt2_cache)
    prepare_local.main(["--out_dir", str(tmp_path / "gpt2"), "--val_fraction", "0.1", "--workers", "2", str(src)])
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    val_ids = np.fromfile(tmp_path / "gpt2/val.bin", dtype=np.uint16)
    assert list(val_ids) == enc.encode_ordinary(docs[9]) + [50256] + enc.encode_ordinary(docs[19]) + [50256]


def test_dolma_preparer_streams_through_datasets(tmp_path, gpt2_cache, monkeypatch):
    """data/dolma/prepare.py's real `datasets` streaming path, on local jsonl.gz shards."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", gpt2_cache)
    docs = [f"Shard document {i}: the quick brown fox." for i in range(30)]
    shard = tmp_path / "shard-0000.json.gz"
    with gzip.open(shard, "wt") as f:
        f.write("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    dolma = _load_script(os.path.join(DATA, "dolma", "prepare.py"), "dolma_prepare")
    dolma.main(["--data_files", str(shard), "--out_dir", str(tmp_path / "dolma"), "--val_fraction", "0.1",
                "--workers", "2"])
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    ids = lambda ds: [t for d in ds for t in enc.encode_ordinary(d) + [50256]]
    val = np.fromfile(tmp_path / "dolma/val.bin", dtype=np.uint16).tolist()
    train = np.fromfile(tmp_path / "dolma/train.bin", dtype=np.uint16).tolist()
    assert sorted(val + train) == sorted(ids(docs)) and len(val) > 0
    assert train[:len(ids(docs[:1]))] == ids(docs[:1])


def _jsonl(path, lines):
    path.write_text("".join(l + "\n" for l in lines))
    return str(path)


def test_null_text_is_an_empty_document(tmp_path):
    src = _jsonl(tmp_path / "c.jsonl", [json.dumps({"text": t}) for t in ["ab", None, "cd", None]])
    prepare_local.main([src, "--out_dir", str(tmp_path / "out"), "--tokenizer", "bytes",
                        "--val_fraction", "0.5", "--workers", "2"])
    # documents 1 and 3 (both null) go to val: each is just the end-of-document byte
    assert np.fromfile(tmp_path / "out/train.bin", np.uint16).tolist() == [97, 98, 0, 99, 100, 0]
    assert np.fromfile(tmp_path / "out/val.bin", np.uint16).tolist() == [0, 0]


@pytest.mark.parametrize("bad, msg", [("{not json", "is not a JSON object"),
                                      ('{"text": 7}', "field 'text' is a int, not text")], ids=["not_json", "not_text"])
@pytest.mark.parametrize("workers", [1, 2])
def test_bad_line_mid_stream_leaves_no_files(tmp_path, bad, msg, workers):
    lines = [json.dumps({"text": f"document {i}"}) for i in range(40)]
    src = _jsonl(tmp_path / "c.jsonl", lines[:30] + [bad] + lines[30:])
    out = tmp_path / "out"
    # one document per batch: the first windows are tokenised and written before the bad line is read
    docs = prepare_local.iter_documents([src])
    with pytest.raises(UserError, match=f"c.jsonl:31.*{msg}") as e:
        write_bins(docs, str(out), "bytes", val_fraction=0.1, workers=workers, batch_docs=1)
    assert "\n" not in str(e.value)
    assert not out.exists()          # no train.bin / val.bin, no .tmp<pid> files: not even the folder it made


def test_hf_tokenizer_folder(tmp_path):
    """--tokenizer <an HF model's folder>: its tokenizer.json's ids (a word-level vocabulary written here,
    so the expected ids are known by hand) and its eos token after each document; the multiple-choice
    encoder of an imported model uses the same tokenizer."""
    pytest.importorskip("tokenizers")
    from gfa.evaluation import Tokenizer
    model = tmp_path / "model"
    write_word_level_tokenizer(str(model))
    src = tmp_path / "corpus.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["to be or not to be", "not to be", "be xyz"]))
    prepare_local.main(["--out_dir", str(tmp_path / "out"), "--tokenizer", str(model), "--val_fraction", "0.34",
                        "--workers", "1", str(src)])
    assert np.fromfile(tmp_path / "out/train.bin", dtype=np.uint16).tolist() == [2, 3, 4, 5, 2, 3, 1, 5, 2, 3, 1]
    assert np.fromfile(tmp_path / "out/val.bin", dtype=np.uint16).tolist() == [3, 0, 1]   # the third document
    assert Tokenizer(6, str(model)).encode("not to be") == [5, 2, 3]
    (model / "tokenizer_config.json").unlink()
    with pytest.raises(UserError, match="no eos token"):
        prepare_local.main(["--out_dir", str(tmp_path / "o2"), "--tokenizer", str(model), str(src)])
    with pytest.raises(UserError, match="holds no tokenizer.json"):
        prepare_local.main(["--out_dir", str(tmp_path / "o3"), "--tokenizer", str(tmp_path), str(src)])


def test_a_vocabulary_over_16_bits_writes_uint32_token_files(tmp_path):
    """An HF tokenizer of more than 65,536 ids (Llama-3 has 128,256): train.bin / val.bin in uint32 with a
    tokens.json saying so, read back by load_tokens with the ids intact; 16-bit data written into the folder
    again drops the marker."""
    tokenizers = pytest.importorskip("tokenizers")
    from gfa.data import TOKEN_FORMAT, load_tokens
    vocab = {"[UNK]": 0, "</s>": 1} | {f"w{i}": i + 2 for i in range(70_000)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    model = tmp_path / "big"
    model.mkdir()
    tok.save(str(model / "tokenizer.json"))
    (model / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["w69999 w3", "w65534 w65535", "w0"]))
    out = tmp_path / "out"
    prepare_local.main(["--out_dir", str(out), "--tokenizer", str(model), "--val_fraction", "0.34", "--workers", "1",
                        str(src)])
    assert json.loads((out / TOKEN_FORMAT).read_text()) == {"dtype": "uint32"}
    assert load_tokens(str(out / "train.bin"), 70_002).tolist() == [70_001, 5, 1, 65_536, 65_537, 1]
    assert load_tokens(str(out / "val.bin")).tolist() == [2, 1]
    with pytest.raises(UserError, match="vocab_size is 65536"):
        load_tokens(str(out / "train.bin"), 65_536)
    prepare_local.main(["--out_dir", str(out), "--tokenizer", "bytes", "--workers", "1", str(src)])
    assert not (out / TOKEN_FORMAT).exists() and load_tokens(str(out / "train.bin")).dtype == np.uint16
