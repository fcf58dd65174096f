"""The ``cme`` reward manager's settings: the ``reward.cme`` block of the veRL config.

veRL's ``RewardManagerConfig`` has no free-form slot and Hydra's struct mode rejects unknown keys,
so the settings live in a block of their own, ``reward.cme``, beside veRL's ``reward.reward_manager``
(as ``reward.sandbox_fusion`` and ``reward.reward_model`` do). The manager receives the whole config
and reads the block from it. Its keys are generated from the package's option declarations:
:class:`cme_rewards.options.ScorerOptions` (``verifier``, ``dtype``, ``max_length``, ...),
:class:`cme_rewards.batching.BatchLimits` (``max_wait_ms``, ...),
:class:`cme_rewards.remote.RemoteOptions` (``url``, ``model``, ``timeout_s``, ``max_retries``) and
:class:`VerlOptions` (``backend``, ``num_gpus``, ``num_cpus``, the group floor's wait, combined
rewards, per-step metrics). A wrong key or value raises :class:`CMESettingsError` naming
``reward.cme.<key>``.

``python -m cme_rewards.verl yaml`` prints the whole block with its defaults (what
``integrations/verl/config/cme_grpo.yaml`` declares); ``python -m cme_rewards.verl table`` prints the
Markdown tables of ``integrations/verl/README.md``. Tests check that both files agree with the declarations.
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
    finite,
    from_values,
    markdown_table,
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
        check_fields(self)
        names = [term_name(t) for t in self.combine_with]
        clash = next((n for n in names if names.count(n) > 1 or n in RESERVED_TERM_NAMES), None)
        if clash is not None:
            raise OptionError(
                "combine_with", f"two terms, or a term and a cme field, share the name {clash!r}"
            )


RESERVED_TERM_NAMES = ("cme", "n_tokens", "truncated", "error")
BUILTIN_TERMS = ("compute_score", "length_penalty")


def split_term(term: str) -> tuple[float, str]:
    """``(weight, name)`` of a ``combine_with`` entry ``[WEIGHT*]NAME``; ``ValueError`` if bad."""
    weight_text, star, name = term.partition("*")
    if not star:
        weight_text, name = "1", term
    weight = float(weight_text)
    if weight != weight or weight in (float("inf"), float("-inf")):
        raise ValueError("weight must be finite")
    name = name.strip()
    if name in BUILTIN_TERMS:
        return weight, name
    if ":" not in name.removeprefix("pkg://").removeprefix("file://") or name.endswith(":"):
        raise ValueError("unknown term")
    return weight, name


def term_name(term: str) -> str:
    """The name a term is logged under: its built-in name or its function's name."""
    name = split_term(term)[1]
    return name if name in BUILTIN_TERMS else name.rsplit(":", 1)[1]


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


def _get(obj: Any, key: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(key)
    return getattr(obj, key, None)


def options_table() -> str:
    """The Markdown tables of every ``reward.cme`` key (``integrations/verl/README.md``)."""
    titles = {
        ScorerOptions: "Scorer",
        BatchLimits: "Local verifier batching",
        RemoteOptions: "Served verifier (vllm / sglang)",
        VerlOptions: "veRL only",
    }
    return "\n\n".join(f"**{titles[cls]}**\n\n{markdown_table(cls)}" for cls in OPTION_CLASSES)


def yaml_block() -> str:
    """The ``reward.cme`` block with every key at its default, as YAML (``cme_grpo.yaml``)."""
    import yaml

    return yaml.safe_dump({"reward": {"cme": default_block()}}, sort_keys=False)
