"""Read pairwise judgments: judgment JSONL (``docs/judgments.md``) and AlpacaEval ``annotations.json`` files.

Every judgment becomes one :class:`Judgment` with ``q`` = P(model wins) in [0, 1] (AlpacaEval's
``preference - 1``, or the discrete score when only ``winner`` is given) and a discrete score ``d``
in {0, 0.5, 1} (baseline wins, tie, model wins) taken from ``winner`` when given, else from the
side of 1.5 the preference falls on (as AlpacaEval counts ``n_wins``).
Rows that carry no usable verdict (AlpacaEval NaN preferences, judge ``error`` lines) are not
silently lost: they are counted in :attr:`Judgments.dropped`, keyed by
``(model, baseline, judge, reason)``.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cme_rewards.io import InputError, read_jsonl, shown

WINNER_SCORES = {"model": 1.0, "baseline": 0.0, "tie": 0.5}
ORDERS = ("model_first", "baseline_first")
DROP_NAN = "nan_preference"
DROP_ERROR = "judge_error"
_WHITESPACE = re.compile(r"[ \t\r\n]*")
_DECODER = json.JSONDecoder()
UNPRINTABLE = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
"""Unicode categories not allowed in a name (model, baseline, judge): controls, format marks such
as right-to-left overrides, lone surrogates, line and paragraph separators. Names are printed in
tables, where such characters would forge or garble lines."""


@dataclass(frozen=True)
class Judgment:
    """One usable verdict of one judge on one (prompt, model, baseline) pair.

    ``q``: probability that the model wins, in [0, 1] (ties count 0.5).
    ``d``: discrete score, 1 = model wins, 0 = baseline wins, 0.5 = tie.
    ``len_model`` / ``len_baseline``: answer lengths in characters, or None when not given.
    """

    prompt: str
    model: str
    baseline: str
    judge: str
    order: str | None
    q: float
    d: float
    len_model: int | None
    len_baseline: int | None


@dataclass
class Judgments:
    """All usable judgments read from one or more files, and the counts of dropped rows."""

    rows: list[Judgment] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)  # (model, baseline, judge, reason) -> n
    files: list[str] = field(default_factory=list)

    def extend(self, other: Judgments) -> None:
        self.rows.extend(other.rows)
        self.dropped.update(other.dropped)
        self.files.extend(other.files)


class BadField(ValueError):
    """A field holds a value we cannot use; the caller adds file and line."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"field '{field_name}': {message}")


def parse_preference(value: Any, field_name: str = "preference") -> float:
    """AlpacaEval preference -> float in [1, 2]; NaN (returned as ``math.nan``) means "drop".

    Accepts numbers and numeric strings; legacy ``0`` is a tie (1.5); ``None``/NaN are NaN.
    """
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise BadField(field_name, f"expected a number in [1, 2], got {_short(value)}")
    try:
        p = float(value.strip()) if isinstance(value, str) else float(value)
    except (ValueError, OverflowError):
        raise BadField(field_name, f"not a number in [1, 2]: {_short(value)}") from None
    if math.isnan(p):
        return math.nan
    if p == 0.0:
        return 1.5
    if not 1.0 <= p <= 2.0:
        raise BadField(field_name, f"{_short(value)} is outside [1, 2] (2 = model wins, 1.5 = tie)")
    return p


def _discrete_from_preference(p: float) -> float:
    return 1.0 if p > 1.5 else 0.0 if p < 1.5 else 0.5


def text_field(record: dict, name: str, *, required: bool = True) -> str | None:
    """The string in ``record[name]``, None if absent and not ``required``; else :class:`BadField`."""
    value = record.get(name)
    if value is None:
        if required:
            raise BadField(name, "missing")
        return None
    if not isinstance(value, str):
        raise BadField(name, f"expected a string, got {type(value).__name__}")
    return value


def _name(record: dict, name: str, *, required: bool = True) -> str | None:
    """A text field that names something (printed in tables): no unprintable characters."""
    value = text_field(record, name, required=required)
    for ch in value or "":
        if unicodedata.category(ch) in UNPRINTABLE:
            raise BadField(name, f"contains the unprintable character {ch!r} in {_short(value)}")
    return value


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to about ``limit`` characters (error messages quote input this way)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _length(record: dict, name: str) -> int | None:
    text = text_field(record, name, required=False)
    return None if text is None else len(text)


def _choice(record: dict, name: str, allowed: tuple[str, ...], noun: str) -> str | None:
    """The field's value if it is one of ``allowed``, None if absent."""
    value = record.get(name)
    if value is not None and (not isinstance(value, str) or value not in allowed):
        raise BadField(
            name, f"unknown {noun} {_short(value)} (expected one of {', '.join(allowed)})"
        )
    return value


def _judge_error(record: dict) -> bool:
    """Whether the record's ``error`` says the judge gave no verdict (null, false, "" say it did)."""
    error = record.get("error")
    if error is None or error is False or error == "":
        return False
    if not isinstance(error, str):
        raise BadField("error", f"expected a string or null, got {_short(error)}")
    return True


def judgment_from_record(record: Any) -> Judgment | tuple[str, str, str, str]:
    """Judgment JSONL record -> :class:`Judgment`, or a drop key ``(model, baseline, judge, reason)``."""
    if not isinstance(record, dict):
        raise BadField("<line>", f"expected a JSON object, got {type(record).__name__}")
    model = _name(record, "model")
    baseline = _name(record, "baseline")
    judge = _name(record, "judge", required=False) or "judge"
    prompt = text_field(record, "id", required=False) or text_field(
        record, "instruction", required=False
    )
    if prompt is None:
        raise BadField("id", "missing (and no 'instruction' to fall back on)")
    if _judge_error(record):
        return (model, baseline, judge, DROP_ERROR)
    order = _choice(record, "order", ORDERS, "value")
    winner = _choice(record, "winner", tuple(WINNER_SCORES), "label")
    if record.get("preference") is None:
        if winner is None:
            raise BadField("winner", "neither 'winner' nor 'preference' given (and no 'error')")
        q = d = WINNER_SCORES[winner]
    else:
        p = parse_preference(record["preference"])
        if math.isnan(p):
            return (model, baseline, judge, DROP_NAN)
        q = p - 1.0
        d = WINNER_SCORES[winner] if winner is not None else _discrete_from_preference(p)
    return Judgment(
        prompt=prompt,
        model=model,
        baseline=baseline,
        judge=judge,
        order=order,
        q=q,
        d=d,
        len_model=_length(record, "output_model"),
        len_baseline=_length(record, "output_baseline"),
    )


def judgment_from_annotation(record: Any) -> Judgment | tuple[str, str, str, str]:
    """AlpacaEval annotation (``output_1``/``generator_1`` = baseline, ``_2`` = model) -> Judgment."""
    if not isinstance(record, dict):
        raise BadField("<record>", f"expected a JSON object, got {type(record).__name__}")
    baseline = _name(record, "generator_1")
    model = _name(record, "generator_2")
    judge = _name(record, "annotator", required=False) or "alpaca_eval"
    prompt = text_field(record, "instruction")
    if "preference" not in record:
        raise BadField("preference", "missing")
    p = parse_preference(record["preference"])
    if math.isnan(p):
        return (model, baseline, judge, DROP_NAN)
    return Judgment(
        prompt=prompt,
        model=model,
        baseline=baseline,
        judge=judge,
        order=None,
        q=p - 1.0,
        d=_discrete_from_preference(p),
        len_model=_length(record, "output_2"),
        len_baseline=_length(record, "output_1"),
    )


def _iter_json_array(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, element)`` for each element of a JSON array file."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise InputError(
            f"{shown(path)}:{line}: not valid UTF-8 (byte {exc.start}: {raw[exc.start : exc.start + 1]!r})"
        ) from None

    def skip_ws(i: int) -> int:
        return _WHITESPACE.match(text, i).end()

    def fail(msg: str, at: int) -> InputError:
        return InputError(f"{shown(path)}:{text.count(chr(10), 0, at) + 1}: {msg}")

    pos = skip_ws(0)
    if not text.startswith("[", pos):
        raise fail("expected a JSON array of AlpacaEval annotations", pos)
    pos = skip_ws(pos + 1)
    line, last = 1, 0
    closed = text.startswith("]", pos)
    while not closed:
        try:
            value, end = _DECODER.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise fail(f"malformed JSON: {exc.msg}", exc.pos) from None
        except RecursionError:
            raise fail("malformed JSON: nested too deeply", pos) from None
        except ValueError as exc:  # e.g. an integer of more than 4300 digits
            raise fail(f"malformed JSON: {exc}", pos) from None
        line += text.count("\n", last, pos)
        last = pos
        yield line, value
        pos = skip_ws(end)
        closed = text.startswith("]", pos)
        if not closed:
            if not text.startswith(",", pos):
                raise fail("malformed JSON: expected ',' or ']'", pos)
            pos = skip_ws(pos + 1)
    if skip_ws(pos + 1) < len(text):
        raise fail("unexpected text after the JSON array", skip_ws(pos + 1))


def read_records(path: Path) -> tuple[bool, Iterable[tuple[int, Any]]]:
    """``(annotations, items)``: whether ``path`` is a JSON array (AlpacaEval annotations, else
    judgment JSONL), and its ``(line_number, record)`` pairs. Raises :class:`InputError`."""
    if not path.is_file():
        raise InputError(f"{shown(path)}: no such file")
    with path.open("rb") as f:
        if f.read(4096).lstrip().startswith(b"["):
            return True, _iter_json_array(path)
    return False, read_jsonl(path, allow_nan=True)  # a NaN preference is dropped and counted


def load_file(path: str | Path) -> Judgments:
    """Read one file: a JSON array is taken as AlpacaEval annotations, anything else as JSONL."""
    path = Path(path)
    annotations, items = read_records(path)
    out = Judgments(files=[str(path)])
    convert = judgment_from_annotation if annotations else judgment_from_record
    for index, (line, record) in enumerate(items, start=1):
        try:
            result = convert(record)
        except BadField as exc:
            label = f"line {line} (record {index})" if annotations else f"line {line}"
            raise InputError(f"{shown(path)}: {label}: {exc}") from None
        if isinstance(result, Judgment):
            out.rows.append(result)
        else:
            out.dropped[result] += 1
    return out


def load_judgments(paths: Iterable[str | Path]) -> Judgments:
    """Read and concatenate several files; raise :class:`InputError` if nothing usable remains."""
    out = Judgments()
    for path in paths:
        out.extend(load_file(path))
    if not out.rows:
        reasons: Counter = Counter()
        for (_, _, _, reason), n in out.dropped.items():
            reasons[reason] += n
        dropped = sum(reasons.values())
        detail = f" ({dropped} rows dropped: {dict(reasons)})" if dropped else ""
        files = ", ".join(map(shown, out.files)) or "the input"
        raise InputError(f"no usable judgments in {files}{detail}")
    return out
