"""Shared test set-up: offline hub, quiet tokenizers, and session-scoped tiny models."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest  # noqa: E402

# Tests use a larger init than Qwen's 0.02 so logits are O(1): parity checks then discriminate real errors.
TEST_INIT_STD = 0.2


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Factory: tiny_model("qwen3_moe", num_layers=4, tie_word_embeddings=True) -> path of an HF folder.

    Models are made once per session per distinct (arch, size) and are read-only for tests.
    """
    from megatron_rl.models.tiny import TinySize, make_tiny_model

    cache: dict = {}

    def make(arch: str = "qwen3", **size) -> str:
        size.setdefault("initializer_range", TEST_INIT_STD)
        key = (arch, tuple(sorted(size.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"tiny_{arch}")
            cache[key] = make_tiny_model(arch, out, size=TinySize(**size))
        return cache[key]

    return make
