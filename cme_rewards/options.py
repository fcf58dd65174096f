"""Every option declared once, and each surface generated from that declaration.

An options class is a frozen dataclass whose fields carry their help, unit, choices and check in
``metadata`` (:func:`option`). From it come command-line flags (:func:`add_arguments`,
:func:`from_namespace`), environment variables (:func:`from_env`), config mappings such as veRL's
``reward.cme`` (:func:`from_mapping`) and keyword arguments. A bad value raises
:class:`OptionError`, which each surface prints under its own spelling of the name
(``--max-length``, ``CME_REWARDS_MAX_LENGTH``, ``reward.cme.max_length``, ``max_length``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from cme_rewards.verifier_names import DEFAULT_VERIFIER, verifier_name_problem

T = TypeVar("T")
Check = Callable[[Any], "str | None"]
Spell = Callable[[str], str]

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


def _same(name: str) -> str:
    return name


class OptionError(ValueError):
    """A bad option value: ``str(error)`` is ``"<option>: <reason>"``; :meth:`on` re-spells it."""

    def __init__(self, option: str, reason: str) -> None:
        super().__init__(f"{option}: {reason}")
        self.option = option
        self.reason = reason

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:  # picklable across Ray and processes
        return type(self), (self.option, self.reason)

    def on(self, spell: Spell) -> OptionError:
        """The same error with the option spelled as a surface spells it (``--max-length``)."""
        return OptionError(spell(self.option), self.reason)


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",  # noqa: A002 - the name TRL and HfArgumentParser use
    *,
    unit: str | None = None,
    choices: tuple[Any, ...] | None = None,
    check: Check | None = None,
    default_factory: Callable[[], Any] | Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field with ``help``, ``unit``, ``choices`` and ``check`` in its metadata.

    ``check(value)`` returns ``None`` when the value is good, else the reason it is not.
    """
    metadata = {"help": help, "unit": unit, "choices": choices, "check": check}
    return field(default=default, default_factory=default_factory, metadata=metadata)


# -- checks ---------------------------------------------------------------------------------------


def at_least(low: float) -> Check:
    """A check: a number ``>= low``."""
    return lambda v: None if v is None or v >= low else f"must be at least {low:g}, got {v!r}"


def above(low: float) -> Check:
    """A check: a number ``> low``."""
    return lambda v: None if v is None or v > low else f"must be greater than {low:g}, got {v!r}"


def finite(v: Any) -> str | None:
    """A check: a finite number."""
    return None if v is None or math.isfinite(v) else f"must be a finite number, got {v!r}"


# -- one field's type -----------------------------------------------------------------------------


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """``(type without None, whether None is allowed)`` of a field annotation."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return annotation, False


def _kinds(cls: type) -> dict[str, tuple[Any, bool]]:
    """Field name -> :func:`_base_type` of its annotation."""
    return {name: _base_type(hint) for name, hint in typing.get_type_hints(cls).items()}


def _is_tuple(kind: Any) -> bool:
    return typing.get_origin(kind) is tuple


def _kind_error(name: str, kind: Any, value: Any) -> OptionError:
    what = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    expected = "list of strings" if _is_tuple(kind) else what[kind]
    return OptionError(name, f"expected {expected}, got {value!r}")


def _from_string(kind: Any, raw: str) -> Any:
    """Parse a command-line or environment string as ``kind``; ``ValueError`` on bad text."""
    text = raw.strip()
    if kind is bool:
        if text.lower() not in TRUE_WORDS + FALSE_WORDS:
            raise ValueError
        return text.lower() in TRUE_WORDS
    if kind in (int, float):
        return kind(text)
    if _is_tuple(kind):
        if not text.startswith("["):
            return tuple(text.split())
        value = json.loads(text)
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise ValueError
        return tuple(value)
    return raw


def _coerce(kind: Any, value: Any) -> Any:
    """A typed value (Python, YAML, JSON) as ``kind``; ``ValueError`` when it is not one."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if _is_tuple(kind):
        if isinstance(value, str):
            return (value,)
        if isinstance(value, list | tuple) and all(isinstance(s, str) for s in value):
            return tuple(value)
    elif kind is float and number:
        return float(value)
    elif kind is int and number and (isinstance(value, int) or value.is_integer()):
        return int(value)
    elif kind in (bool, str) and isinstance(value, kind):
        return value
    raise ValueError


def check_fields(obj: Any) -> None:
    """Type-check and ``check`` every field of a dataclass instance (call it in ``__post_init__``).

    Coerces lossless conversions in place (an int where a float is declared, a list where a tuple
    is); raises :class:`OptionError` naming the first bad field.
    """
    kinds = _kinds(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        kind, optional = kinds[f.name]
        if value is None:
            if not optional:
                raise OptionError(f.name, "must not be empty (null)")
            continue
        try:
            value = _coerce(kind, value)
        except ValueError:
            raise _kind_error(f.name, kind, value) from None
        object.__setattr__(obj, f.name, value)
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            raise OptionError(
                f.name, f"must be one of {', '.join(map(str, choices))}; got {value!r}"
            )
        check = f.metadata.get("check")
        if check is not None and (reason := check(value)) is not None:
            raise OptionError(f.name, reason)


class CheckedOptions:
    """Base of an options dataclass: every field is type-checked and checked when it is made."""

    def __post_init__(self) -> None:
        check_fields(self)


# -- surfaces -------------------------------------------------------------------------------------


def _default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def describe(f: dataclasses.Field) -> str:
    """A field's help with its unit and default, as every surface shows it."""
    unit = f.metadata.get("unit")
    shown = "none" if _default(f) in (None, ()) else _default(f)
    return f"{f.metadata.get('help', '')}{f' ({unit})' if unit else ''} [default: {shown}]"


def flag(name: str) -> str:
    """The command-line spelling of a field name: ``max_length`` -> ``--max-length``."""
    return "--" + name.replace("_", "-")


def add_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    exclude: tuple[str, ...] = (),
) -> None:
    """Add one flag per field of ``cls`` (``--max-length``; booleans as ``--x/--no-x``).

    Values are kept as given (strings) and default to ``None`` (not given), so that
    :func:`from_namespace` parses and checks them exactly as every other surface does.
    """
    kinds = _kinds(cls)
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        kind, _ = kinds[f.name]
        kwargs: dict[str, Any] = {"default": None, "help": describe(f), "dest": f.name}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif _is_tuple(kind):
            kwargs.update(nargs="*", metavar="TOKEN")
        else:
            kwargs["metavar"] = f.name.upper()
        parser.add_argument(flag(f.name), **kwargs)


def _build(cls: type[T], values: Mapping[str, Any], spell: Spell) -> T:
    try:
        return cls(**values)
    except OptionError as exc:
        raise exc.on(spell) from None


def from_strings(cls: type[T], raw: Mapping[str, Any], spell: Spell = _same) -> T:
    """``cls`` from field name -> string (or already typed) values; errors spelled by ``spell``."""
    kinds = _kinds(cls)
    values: dict[str, Any] = {}
    for name, value in raw.items():
        kind, _ = kinds[name]
        if isinstance(value, str) and kind is not str:
            try:
                value = _from_string(kind, value)
            except ValueError:
                raise _kind_error(spell(name), kind, value) from None
        values[name] = value
    return _build(cls, values, spell)


def from_namespace(cls: type[T], args: argparse.Namespace, **fixed: Any) -> T:
    """``cls`` from the flags :func:`add_arguments` added (flags not given keep their defaults)."""
    names = set(field_names(cls))
    given = {n: v for n, v in vars(args).items() if n in names and v is not None}
    return from_strings(cls, {**given, **fixed}, flag)


def env_name(prefix: str, name: str) -> str:
    """The environment variable of a field: ``env_name("CME_REWARDS_", "max_length")``."""
    return prefix + name.upper()


def from_env(cls: type[T], prefix: str, environ: Mapping[str, str] | None = None) -> T:
    """``cls`` from ``<prefix><FIELD>`` variables; unset or blank ones keep their defaults."""
    return from_strings(cls, env_values((cls,), prefix, environ), lambda n: env_name(prefix, n))


def from_mapping(cls: type[T], values: Mapping[str, Any] | None, spell: Spell = _same) -> T:
    """``cls`` from a typed mapping (YAML, JSON, Hydra); unknown keys are named with the known ones."""
    return from_values((cls,), dict(values or {}), spell)[0]


def field_names(*classes: type) -> list[str]:
    """Field names of option classes, in declaration order."""
    return [f.name for cls in classes for f in dataclasses.fields(cls)]


def _reject_unknown(classes: tuple[type, ...], names: Any, spell: Spell) -> None:
    known = field_names(*classes)
    if unknown := sorted(set(names) - set(known)):
        raise OptionError(spell(unknown[0]), f"unknown option; known options: {', '.join(known)}")


def from_values(
    classes: tuple[type, ...],
    values: Mapping[str, Any],
    spell: Spell = _same,
    *,
    strings: bool = False,
) -> list[Any]:
    """One instance per option class from one flat mapping (``reward.cme``, env, flags).

    Keys belong to exactly one class; an unknown key is named with the known ones. With
    ``strings=True`` string values are parsed as each field's type (command line, environment).
    """
    _reject_unknown(classes, values, spell)
    out = []
    for cls in classes:
        names = set(field_names(cls))
        mine = {k: v for k, v in values.items() if k in names}
        out.append(from_strings(cls, mine, spell) if strings else _build(cls, mine, spell))
    return out


def env_values(
    classes: tuple[type, ...], prefix: str, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Field name -> value of every set, non-blank ``<prefix><FIELD>`` variable."""
    env = os.environ if environ is None else environ
    raw = {name: env.get(env_name(prefix, name)) for name in field_names(*classes)}
    return {name: value for name, value in raw.items() if value is not None and value.strip()}


def markdown_table(cls: type) -> str:
    """A Markdown table of ``cls``'s options: name, type, default, unit, meaning (for the docs)."""
    kinds = _kinds(cls)
    lines = ["| option | type | default | unit | meaning |", "| --- | --- | --- | --- | --- |"]
    for f in dataclasses.fields(cls):
        kind, optional = kinds[f.name]
        kind_text = "list of strings" if _is_tuple(kind) else kind.__name__
        kind_text += " or none" if optional else ""
        shown = "none" if _default(f) in (None, ()) else f"`{_default(f)}`"
        meaning = f.metadata.get("help", "")
        if choices := f.metadata.get("choices"):
            meaning += f" (one of {', '.join(f'`{c}`' for c in choices)})"
        lines.append(
            f"| `{f.name}` | {kind_text} | {shown} | {f.metadata.get('unit') or ''} | {meaning} |"
        )
    return "\n".join(lines)


# -- the scorer's options -----------------------------------------------------------------------------

DTYPES = ("auto", "float32", "bfloat16", "float16", "float64")
IMPLS = ("auto", "torch", "triton")
REDUCTIONS = ("mean", "sum", "min_k", "pmi", "pmi_sum")


def _triton_problem(on_cuda: bool) -> str | None:
    """Why ``impl="triton"`` cannot run (on CUDA or not), or ``None``."""
    if not on_cuda and not os.environ.get("TRITON_INTERPRET"):
        return "triton needs a CUDA device (or TRITON_INTERPRET=1 to interpret on CPU)"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install triton)"
    return None


def _check_device(device: str) -> str | None:
    if device == "auto":
        return None
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        return f"not a device: {device!r} (use auto, cpu, cuda, cuda:0, ...)"
    if dev.type not in ("cpu", "cuda", "mps", "xpu"):
        return f"unsupported device type {dev.type!r} (use auto, cpu or cuda[:k])"
    return None


def device_unavailable(device: str) -> str | None:
    """Why ``device`` cannot be used on this machine (no CUDA, no such GPU), or ``None``."""
    if device == "auto":
        return None
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return f"{device!r} asked for, but no CUDA device is available here (use auto or cpu)"
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            return f"{device!r}: only {torch.cuda.device_count()} CUDA device(s) here"
    return None


def _check_prompt_template(template: str) -> str | None:
    if "{prompt}" not in template:
        return "must contain the field {prompt}"
    try:
        template.format(prompt="x")
    except (IndexError, KeyError, ValueError) as exc:
        return (
            f"is not a valid format string with only the field {{prompt}} ({exc}); "
            "write literal braces as {{ and }}"
        )
    return None


def _check_chat_template(template: str) -> str | None:
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        ImmutableSandboxedEnvironment().from_string(template)
    except TemplateSyntaxError as exc:
        return f"is not a valid Jinja template: {exc}"
    return None


@dataclass(frozen=True)
class ScorerOptions(CheckedOptions):
    """Every option of the CME scorer (``docs/options.md``): ``CMEScorer(max_length=...)``,
    ``--max-length``, ``CME_REWARDS_MAX_LENGTH``, ``reward.cme.max_length``, ``--cme_max_length``.
    """

    verifier: str = option(
        DEFAULT_VERIFIER,
        "verifier: built-in name, .gguf path, transformers folder, hub id, or random:<one of those>",
        check=verifier_name_problem,
    )
    device: str = option(
        "auto",
        "device of a local verifier: auto (CUDA when available), cpu, cuda, cuda:1",
        check=_check_device,
    )
    dtype: str = option(
        "auto",
        "verifier weights: auto (bf16 on CUDA and on CPUs that multiply bf16 natively, "
        "else float32), float32 (exact path), bfloat16, float16, float64",
        choices=DTYPES,
    )
    max_length: int = option(
        2048,
        "most verifier tokens per sample; the prompt is cut from the left first",
        unit="tokens",
        check=at_least(2),
    )
    token_budget: int | None = option(
        None,
        "most padded tokens per forward micro-batch (none: 2048 on CPU, 16384 on GPU)",
        unit="tokens",
        check=at_least(1),
    )
    reduction: str = option(
        "mean",
        "how token log-probs become the reward: mean (CME), sum, min_k (mean of the lowest "
        "min_k_percent), pmi (mean given the prompt minus mean without it), pmi_sum (the same "
        "difference summed over tokens: log q(y|x) - log q(y))",
        choices=REDUCTIONS,
    )
    min_k_percent: float = option(
        20.0,
        "share of the lowest token log-probs averaged by reduction=min_k",
        unit="percent",
        check=lambda v: None if 0 < v <= 100 else f"must be in (0, 100], got {v!r}",
    )
    min_tokens: int = option(
        1,
        "responses with fewer scored tokens get the floor reward",
        unit="tokens",
        check=at_least(1),
    )
    floor: float = option(
        -50.0,
        "reward of a sample that cannot be scored when its group is unknown, per token "
        "(reduction=sum or pmi_sum: times max_length)",
        unit="nats",
        check=finite,
    )
    floor_margin: float = option(
        0.1,
        "a sample that cannot be scored gets this much less than the worst scored member of its "
        "group (when the group is known)",
        unit="nats",
        check=lambda v: finite(v) or at_least(0)(v),
    )
    score_eos: bool = option(False, "also score the verifier's EOS / end-of-turn token")
    prompt_template: str | None = option(
        None,
        "force a plain prompt format: a string with the field {prompt}",
        check=_check_prompt_template,
    )
    chat_template: str | None = option(
        None, "a Jinja chat template replacing the verifier's own", check=_check_chat_template
    )
    strip_special_tokens: tuple[str, ...] = option(
        default_factory=tuple,
        help="generator special tokens removed from responses (trailing end-of-turn markers "
        "are always removed)",
    )
    impl: str = option(
        "auto",
        "log-prob kernels: auto (Triton on CUDA, chunked PyTorch on CPU), torch, triton",
        choices=IMPLS,
    )
    share_prefix: bool = option(
        True, "compute each group's shared prompt once for all its responses"
    )
    seed: int = option(0, "weight seed of a random: verifier")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.impl == "triton" and (reason := _triton_problem(self.device != "cpu")):
            raise OptionError("impl", reason)

    def check_here(self, spell: Spell = _same) -> None:
        """Checks that depend on this machine (the device exists), made just before loading;
        :class:`OptionError` names the option as ``spell`` spells it."""
        if (reason := device_unavailable(self.device)) is not None:
            raise OptionError(spell("device"), reason)
        if self.impl == "triton":
            import torch

            auto_cuda = self.device == "auto" and torch.cuda.is_available()
            if reason := _triton_problem(self.device.startswith("cuda") or auto_cuda):
                raise OptionError(spell("impl"), reason)

    @classmethod
    def from_kwargs(cls, base: ScorerOptions | None = None, **kwargs: Any) -> ScorerOptions:
        """``base`` (default: the defaults) with ``kwargs`` applied; an unknown name raises
        :class:`OptionError` listing the known ones."""
        _reject_unknown((cls,), kwargs, _same)
        base = base or cls()
        return base.replace(**kwargs) if kwargs else base

    def replace(self, **changes: Any) -> ScorerOptions:
        """A copy with ``changes`` applied (and checked)."""
        return dataclasses.replace(self, **changes)

    def floor_reward(self) -> float:
        """The fixed floor reward (nats) for this reduction: ``floor``, times ``max_length`` for the sums."""
        return self.floor * self.max_length if self.reduction in ("sum", "pmi_sum") else self.floor
