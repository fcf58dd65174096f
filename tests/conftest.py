"""Shared fixtures: real verifiers (loaded once per session), shared data, tiny random models."""

from __future__ import annotations

import json
import os
from pathlib import Path

# No model hub is reachable from these machines: fail hub look-ups at once instead of after retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors only through the interpreter, which must be chosen before
    # triton is first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
TEST_DATA = REPO / "tests" / "data"
EXAMPLES = REPO / "examples"


def shared_data_dir() -> Path | None:
    """``../shared/data`` beside the checkout; in CI (``CI=true``) its absence fails the test."""
    path = REPO.parent / "shared" / "data"
    if path.is_dir():
        return path
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{path} is required in CI but missing")
    return None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if path is None:
        pytest.skip("../shared/data is absent (a user's fresh clone); CI requires it")
    return path


@pytest.fixture(scope="session")
def cme_vectors() -> list[dict]:
    """Float64 CME test vectors for both PyPI verifiers (copied from ../shared/data/cme_vectors)."""
    return [json.loads(line) for line in (TEST_DATA / "cme_vectors.jsonl").open()]


@pytest.fixture(scope="session")
def smollm_scorer():
    from cme_rewards import CMEScorer

    return CMEScorer("smollm2-135m-instruct", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def gemma_scorer():
    from cme_rewards import CMEScorer

    return CMEScorer("gemma3-270m", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def smollm_tokenizer(smollm_scorer):
    return smollm_scorer.tokenizer


def tiny_llama(vocab_size: int = 49152, seed: int = 0, **overrides):
    """A random-weight Llama (hidden 64, 2 layers) for quick plumbing tests."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        **overrides,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()
