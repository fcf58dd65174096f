"""The ``cme`` reward manager's settings: the ``reward.cme`` block of the veRL config.

veRL's ``RewardManagerConfig`` has no free-form slot and Hydra's struct mode rejects unknown keys,
so the settings live in a block of their own, ``reward.cme``, beside veRL's ``reward.reward_manager``
(as ``reward.sandbox_fusion`` and ``reward.reward_model`` do). The manager receives the whole config
and reads the block from it. Its keys are generated from the package's option declarations:
:class:`cme_rewards.options.ScorerOptions` (``verifier``, ``dtype``, ``max_length``, ...),
:class:`cme_rewards.batching.BatchLimits` (``max_wait_ms``, ...),
:class:`cme_rewards.remote.RemoteOptions` (``url``, ``model``, ``timeout_s``, ``max_retries``) and
:class:`VerlOptions` (``backend``, ``num_gpus``, ``num_cpus``). A wrong key or value raises
:class:`CMESettingsError` naming ``reward.cme.<key>``.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cme_rewards.batching import BatchLimits
from cme_rewards.options import (
    OptionError,
    ScorerOptions,
    at_least,
    check_fields,
    field_names,
    from_values,
    option,
)
from cme_rewards.remote import RemoteOptions

CONFIG_PATH = "reward.cme"
"""Where the settings live in the veRL config."""

BACKENDS = ("local", "vllm", "sglang")


def config_key(name: str) -> str:
    """The veRL spelling of an option: ``reward.cme.<name>``."""
    return f"{CONFIG_PATH}.{name}"


class CMESettingsError(OptionError):
    """A ``reward.cme.*`` setting is wrong; the message names the key."""


@dataclass(frozen=True)
class VerlOptions:
    """Options only the veRL manager has."""

    backend: str = option(
        "local",
        "local: one verifier actor per node; vllm / sglang: a served verifier (url, or veRL's "
        "reward-model router)",
        choices=BACKENDS,
    )
    num_gpus: float = option(
        0.0,
        "GPUs the local verifier actor reserves per node (a fraction shares one; 0: CPU)",
        check=at_least(0),
    )
    num_cpus: float = option(1.0, "CPUs the local verifier actor reserves", check=at_least(0))

    def __post_init__(self) -> None:
        check_fields(self)


OPTION_CLASSES = (ScorerOptions, BatchLimits, RemoteOptions, VerlOptions)


@dataclass(frozen=True)
class CMESettings:
    """Everything in ``reward.cme``, checked: the scorer's options, batch limits, remote, veRL.

    ``verifier_given`` says whether ``reward.cme.verifier`` was set (a remote backend behind veRL's
    own reward-model servers may take the tokenizer from ``reward.reward_model.model_path``).
    """

    scorer: ScorerOptions = dataclasses.field(default_factory=ScorerOptions)
    batch: BatchLimits = dataclasses.field(default_factory=BatchLimits)
    remote: RemoteOptions = dataclasses.field(default_factory=RemoteOptions)
    verl: VerlOptions = dataclasses.field(default_factory=VerlOptions)
    verifier_given: bool = False

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> CMESettings:
        """Settings from the ``reward.cme`` block; unknown keys and bad values name the key."""
        values = dict(values or {})
        try:
            scorer, batch, remote, verl = from_values(OPTION_CLASSES, values, config_key)
        except OptionError as exc:
            raise CMESettingsError(exc.option, exc.reason) from None
        return cls(scorer, batch, remote, verl, verifier_given="verifier" in values)

    @classmethod
    def from_verl_config(cls, config: Any) -> CMESettings:
        """Settings from a whole veRL config (``DictConfig`` or nested mappings)."""
        reward = _get(config, "reward")
        block = _get(reward, "cme") if reward is not None else None
        try:
            from omegaconf import Container, OmegaConf

            if isinstance(block, Container):  # DictConfig / ListConfig -> plain Python
                block = OmegaConf.to_container(block, resolve=True)
        except ValueError as exc:
            raise CMESettingsError(CONFIG_PATH, f"cannot be resolved: {exc}") from exc
        if block is not None and not isinstance(block, Mapping):
            raise CMESettingsError(CONFIG_PATH, f"must be a mapping of settings, got {block!r}")
        # Keys declared null in a YAML (cme_grpo.yaml lists every key) mean "not set".
        return cls.from_mapping({k: v for k, v in (block or {}).items() if v is not None})

    def actor_key(self) -> str:
        """Part of the verifier actor's name: settings that change what the actor computes."""
        parts = (self.scorer, self.batch, self.verl)
        return hashlib.sha256(repr(parts).encode()).hexdigest()[:12]


def default_block() -> dict[str, Any]:
    """Every ``reward.cme`` key with its default (``null`` where none): the YAML block's content."""
    out: dict[str, Any] = {}
    for cls in OPTION_CLASSES:
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out[f.name] = list(default) if isinstance(default, tuple) else default
    assert list(out) == field_names(*OPTION_CLASSES)
    return out


def _get(obj: Any, key: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(key)
    return getattr(obj, key, None)
