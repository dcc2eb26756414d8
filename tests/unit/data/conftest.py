import pytest

from tests.unit.data.tiny_tokenizer import make_tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tiny_tokenizer()
