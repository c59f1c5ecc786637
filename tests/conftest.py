import os
import tarfile

import pytest
import torch

from helpers import text_tokens

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models are dominated by per-op overhead: one thread is faster, above all on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def gpt2_cache(tmp_path_factory):
    """A TIKTOKEN_CACHE_DIR holding the GPT-2 encoding, unpacked from tests/fixtures (no network)."""
    d = tmp_path_factory.mktemp("tiktoken_cache")
    with tarfile.open(os.path.join(FIXTURES, "gpt2_tiktoken_cache.tar.xz")) as t:
        t.extractall(d, filter="data")
    return str(d)


@pytest.fixture
def byte_data(tmp_path):
    """A dataset folder (train.bin, val.bin) of byte 'text' with structure."""
    d = tmp_path / "bytes"
    d.mkdir()
    text_tokens(6000, 1).tofile(d / "train.bin")
    text_tokens(3000, 2).tofile(d / "val.bin")
    return d
