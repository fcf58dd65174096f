"""The ``cme`` reward manager's settings: the ``reward.cme`` block of the veRL config.

veRL's ``RewardManagerConfig`` has no free-form slot and Hydra's struct mode rejects unknown keys,
so the settings live in a block of their own, ``reward.cme``, beside veRL's ``reward.reward_manager``
(as ``reward.sandbox_fusion`` and ``reward.reward_model`` do). The manager receives the whole config
and reads the block from it. On the command line add it with ``+``::

    reward.reward_manager.name=cme +reward.cme.verifier=smollm2-135m-instruct +reward.cme.num_gpus=0.1

or in a YAML file composed over veRL's ``ppo_trainer`` (no ``+`` needed there)::

    reward:
      reward_manager: {name: cme}
      cme: {verifier: /models/gemma-3-1b-it, dtype: bfloat16, num_gpus: 0.2}

Every key is checked at start-up; a wrong one raises :class:`CMESettingsError` naming
``reward.cme.<key>``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cme_rewards.reductions import REDUCTIONS
from cme_rewards.results import FLOOR_REWARD

CONFIG_PATH = "reward.cme"
"""Where the settings live in the veRL config."""

BACKENDS = ("local", "vllm", "sglang")


class CMESettingsError(ValueError):
    """A ``reward.cme.*`` setting is missing or wrong; the message names the key."""


@dataclass(frozen=True)
class CMESettings:
    """Settings of the ``cme`` reward manager (``reward.cme.<field>`` in the veRL config).

    Attributes:
        verifier: the verifier, named as SPEC.md says (built-in name, ``.gguf`` path, transformers
            folder, hub id, ``random:...``). Required for ``backend=local``; for a remote backend it
            names the tokenizer, and may be left out when veRL's own reward model serves it
            (``reward.reward_model.model_path`` then gives the tokenizer).
        backend: ``local`` (one verifier actor per node), ``vllm`` or ``sglang`` (a server).
        url: remote server base URL; ``None`` uses veRL's reward-model router
            (``reward.reward_model.enable=true``).
        model: vLLM's ``model`` request field; ``None``: ``reward.reward_model.model_path`` behind
            veRL's router, else the first model the server lists.
        dtype, device: of the local verifier (``device=auto``: the GPU Ray gives the actor, else CPU).
        max_length: most verifier tokens per sample (prompt cut from the left first).
        floor: reward (nats) of a sample that cannot be scored (empty response, ...).
        token_budget: most padded verifier tokens per local forward batch.
        batch_wait_ms: how long the local verifier lets a sample wait for others to batch with.
        reduction: ``mean`` (CME) or ``sum`` of the response's token log-probs.
        min_tokens: responses with fewer scored tokens get ``floor``.
        num_gpus: GPUs the local verifier actor reserves per node (a fraction shares a GPU; 0: CPU).
        num_cpus: CPUs the local verifier actor reserves.
        timeout_s: per-request timeout (remote) and the longest wait for the verifier to start.
        max_retries: tries of a failing request (remote) or a transient local error.
    """

    verifier: str | None = None
    backend: str = "local"
    url: str | None = None
    model: str | None = None
    dtype: str = "float32"
    device: str = "auto"
    max_length: int = 2048
    floor: float = FLOOR_REWARD
    token_budget: int = 16384
    batch_wait_ms: float = 10.0
    reduction: str = "mean"
    min_tokens: int = 1
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    timeout_s: float = 600.0
    max_retries: int = 5

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> CMESettingsError:
            return CMESettingsError(f"{CONFIG_PATH}.{key}: {why}")

        if self.backend not in BACKENDS:
            raise bad("backend", f"must be one of {BACKENDS}, got {self.backend!r}")
        if self.backend == "local" and not self.verifier:
            raise bad(
                "verifier",
                "is required: name the verifier, e.g. +reward.cme.verifier=smollm2-135m-instruct "
                "(a built-in name, a .gguf path, a transformers folder or a hub id)",
            )
        if self.reduction not in REDUCTIONS:
            raise bad("reduction", f"must be one of {REDUCTIONS}, got {self.reduction!r}")
        if self.max_length < 2:
            raise bad("max_length", f"must be at least 2, got {self.max_length}")
        if self.token_budget < 1:
            raise bad("token_budget", f"must be at least 1, got {self.token_budget}")
        if self.batch_wait_ms < 0:
            raise bad("batch_wait_ms", f"must be >= 0, got {self.batch_wait_ms}")
        if self.min_tokens < 1:
            raise bad("min_tokens", f"must be at least 1, got {self.min_tokens}")
        if not math.isfinite(self.floor):
            raise bad("floor", f"must be a finite number, got {self.floor}")
        if self.num_gpus < 0 or self.num_cpus < 0:
            raise bad("num_gpus" if self.num_gpus < 0 else "num_cpus", "must be >= 0")
        if self.timeout_s <= 0:
            raise bad("timeout_s", f"must be > 0, got {self.timeout_s}")
        if self.max_retries < 1:
            raise bad("max_retries", f"must be at least 1, got {self.max_retries}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> CMESettings:
        """Settings from the ``reward.cme`` block; unknown keys and wrong types name the key."""
        values = dict(values or {})
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise CMESettingsError(
                f"{CONFIG_PATH}.{unknown[0]}: unknown setting; known settings: {', '.join(fields)}"
            )
        kwargs = {key: _coerce(key, fields[key].type, value) for key, value in values.items()}
        return cls(**kwargs)

    @classmethod
    def from_verl_config(cls, config: Any) -> CMESettings:
        """Settings from a whole veRL config (``DictConfig`` or nested mappings)."""
        reward = _get(config, "reward")
        block = _get(reward, "cme") if reward is not None else None
        if block is not None and not isinstance(block, Mapping):
            try:
                from omegaconf import OmegaConf

                block = OmegaConf.to_container(block, resolve=True)
            except ValueError as exc:
                raise CMESettingsError(f"{CONFIG_PATH}: must be a mapping of settings") from exc
        if block is not None and not isinstance(block, Mapping):
            raise CMESettingsError(f"{CONFIG_PATH}: must be a mapping of settings, got {block!r}")
        return cls.from_mapping(block)

    def actor_key(self) -> str:
        """Part of the verifier actor's name: settings that change what the actor computes."""
        parts = (
            self.verifier,
            self.dtype,
            self.device,
            self.max_length,
            self.floor,
            self.token_budget,
            self.batch_wait_ms,
            self.reduction,
            self.min_tokens,
            self.num_gpus,
            self.num_cpus,
        )
        return hashlib.sha256(repr(parts).encode()).hexdigest()[:12]


def _get(obj: Any, key: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(key)
    return getattr(obj, key, None)


def _coerce(key: str, annotation: str, value: Any) -> Any:
    """Check one setting's type (Hydra gives ints for ``1``, strings for ``a``); return it typed."""
    where = f"{CONFIG_PATH}.{key}"
    optional = "None" in annotation
    if value is None:
        if optional:
            return None
        raise CMESettingsError(f"{where}: must not be null")
    base = annotation.replace(" | None", "")
    accepted = {"str": (str, int, float), "int": (int,), "float": (int, float)}[base]
    if isinstance(value, accepted) and not isinstance(value, bool):
        return {"str": str, "int": int, "float": float}[base](value)
    raise CMESettingsError(f"{where}: expected {base}, got {value!r} ({type(value).__name__})")
