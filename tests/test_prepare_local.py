"""data/prepare_local.py in process, bytes tokenizer: jsonl edge cases and clean failure
(tests/test_train.py runs the script end to end with both tokenizers)."""
import json
import os
import sys

import numpy as np
import pytest

from common import UserError

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data"))
import prepare_local  # noqa: E402


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


@pytest.mark.parametrize("bad, msg", [("{not json", "is not a JSON object per line"),
                                      ('{"text": 7}', "field 'text' is a int, not text")], ids=["not_json", "not_text"])
@pytest.mark.parametrize("workers", [1, 2])
def test_bad_line_mid_stream_leaves_no_files(tmp_path, bad, msg, workers):
    lines = [json.dumps({"text": f"document {i}"}) for i in range(40)]
    src = _jsonl(tmp_path / "c.jsonl", lines[:30] + [bad] + lines[30:])
    out = tmp_path / "out"
    # one document per batch: the first windows are tokenised and written before the bad line is read
    docs = prepare_local.iter_documents([src])
    with pytest.raises(UserError, match=f"c.jsonl:31.*{msg}") as e:
        prepare_local.write_bins(docs, str(out), "bytes", val_fraction=0.1, workers=workers, batch_docs=1)
    assert "\n" not in str(e.value)
    assert os.listdir(out) == []          # no train.bin / val.bin, no .tmp<pid> files
