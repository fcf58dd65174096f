"""The ``cme`` reward manager's settings: the ``reward.cme`` block of the veRL config.

Generated from ``ScorerOptions``, ``BatchLimits``, ``RemoteOptions`` and :class:`VerlOptions`
(Hydra's struct mode rejects unknown keys in ``reward.reward_manager``); a bad key or value raises
:class:`CMESettingsError` naming ``reward.cme.<key>``.
``python -m cme_rewards.verl yaml|table`` prints the block with its defaults or its Markdown tables.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cme_rewards.batching import BatchLimits
from cme_rewards.options import (
    CheckedOptions,
    OptionError,
    ScorerOptions,
    at_least,
    field_names,
    finite,
    from_values,
    markdown_table,
    option,
)
from cme_rewards.remote import RemoteOptions

CONFIG_PATH = "reward.cme"  # where the settings live in the veRL config


def config_key(name: str) -> str:
    """The veRL spelling of an option: ``reward.cme.<name>``."""
    return f"{CONFIG_PATH}.{name}"


def config_get(config: Any, *keys: str) -> Any:
    """``config.<keys...>`` of a veRL config (``DictConfig``, mappings or objects), ``None`` if unset."""
    for key in keys:
        if config is None:
            return None
        config = config.get(key) if hasattr(config, "get") else getattr(config, key, None)
    return config


class CMESettingsError(OptionError):
    """A ``reward.cme.*`` setting is wrong; the message names the key."""


@dataclass(frozen=True)
class VerlOptions(CheckedOptions):
    """Options only the veRL manager has."""

    backend: str = option(
        "local",
        "local: one verifier actor per node; vllm / sglang: a served verifier (url, or veRL's "
        "reward-model router)",
        choices=("local", "vllm", "sglang"),
    )
    num_gpus: float = option(
        0.0,
        "GPUs the local verifier actor reserves per node (a fraction shares one; 0: CPU)",
        check=at_least(0),
    )
    num_cpus: float = option(1.0, "CPUs the local verifier actor reserves", check=at_least(0))
    group_wait_s: float = option(
        300.0,
        "a sample that cannot be scored waits this long for the rest of its group (veRL's uid, "
        "actor_rollout_ref.rollout.n samples) to get the floor just below the group's worst "
        "scored member; after it, the fixed floor (0: never wait, always the fixed floor)",
        unit="s",
        check=at_least(0),
    )
    cme_weight: float = option(
        1.0, "weight of CME in the reward (TRL's reward_weights[0])", check=finite
    )
    combine_with: tuple[str, ...] = option(
        default_factory=tuple,
        help="other rewards added to the weighted CME, each [WEIGHT*]NAME: compute_score (the "
        "function veRL hands the manager: reward.custom_reward_function, else veRL's "
        "default_compute_score by data_source), length_penalty (-policy tokens / "
        "data.max_response_length), or pkg://module:function / path.py:function with veRL's "
        "compute_score signature",
        check=lambda terms: next((r for t in terms if (r := term_problem(t))), None),
    )
    metrics_logger: tuple[str, ...] = option(
        ("console",),
        "veRL tracking backends (trainer.logger names) that receive the per-step cme/* metrics, "
        "as the run <trainer.experiment_name>-cme; [] logs none",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        names = [split_term(t)[2] for t in self.combine_with]
        clash = next((n for n in names if names.count(n) > 1 or n in RESERVED_TERM_NAMES), None)
        if clash is not None:
            raise OptionError(
                "combine_with", f"two terms, or a term and a cme field, share the name {clash!r}"
            )


RESERVED_TERM_NAMES = ("cme", "n_tokens", "truncated", "error")
BUILTIN_TERMS = ("compute_score", "length_penalty")


def split_term(term: str) -> tuple[float, str, str]:
    """``(weight, NAME, logged name)`` of a ``combine_with`` entry ``[WEIGHT*]NAME``; ``ValueError``
    if bad. A term is logged under its built-in name or its function's name."""
    weight_text, star, name = term.partition("*")
    if not star:
        weight_text, name = "1", term
    weight = float(weight_text)
    if not math.isfinite(weight):
        raise ValueError("weight must be finite")
    name = name.strip()
    if name not in BUILTIN_TERMS and (
        ":" not in name.removeprefix("pkg://").removeprefix("file://") or name.endswith(":")
    ):
        raise ValueError("unknown term")
    return weight, name, name if name in BUILTIN_TERMS else name.rsplit(":", 1)[1]


def term_problem(term: str) -> str | None:
    """Why ``term`` is not a valid ``combine_with`` entry, or ``None``."""
    try:
        split_term(term)
    except ValueError:
        return (
            f"{term!r} is not [WEIGHT*]NAME with NAME one of {', '.join(BUILTIN_TERMS)}, "
            "pkg://module:function or path.py:function (e.g. 0.1*length_penalty)"
        )
    return None


OPTION_CLASSES = (ScorerOptions, BatchLimits, RemoteOptions, VerlOptions)


@dataclass(frozen=True)
class CMESettings:
    """Everything in ``reward.cme``, checked. ``verifier_given``: ``reward.cme.verifier`` was set
    (else a served verifier may take its tokenizer from ``reward.reward_model.model_path``)."""

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
        block = config_get(config, "reward", "cme")
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
        parts = (self.scorer, self.batch, self.verl.num_gpus, self.verl.num_cpus)
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


def options_table() -> str:
    """The Markdown tables of every ``reward.cme`` key (``integrations/verl/README.md``)."""
    titles = ("Scorer", "Local verifier batching", "Served verifier (vllm / sglang)", "veRL only")
    tables = zip(titles, OPTION_CLASSES, strict=True)
    return "\n\n".join(f"**{title}**\n\n{markdown_table(cls)}" for title, cls in tables)


def yaml_block() -> str:
    """The ``reward.cme`` block with every key at its default, as YAML (``cme_grpo.yaml``)."""
    import yaml

    return yaml.safe_dump({"reward": {"cme": default_block()}}, sort_keys=False)
