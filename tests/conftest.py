import os
import tarfile

import pytest

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


@pytest.fixture(scope="session")
def gpt2_cache(tmp_path_factory):
    """A TIKTOKEN_CACHE_DIR holding the GPT-2 encoding, unpacked from tests/data (no network)."""
    d = tmp_path_factory.mktemp("tiktoken_cache")
    with tarfile.open(os.path.join(FIXTURES, "gpt2_tiktoken_cache.tar.xz")) as t:
        t.extractall(d, filter="data")
    return str(d)
