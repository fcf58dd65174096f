"""JSONL input with errors that name the file and line, and output that is never half-written."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import jsonlines


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, allow_nan=False)


class InputError(ValueError):
    """Malformed input; the message names the file, line and field."""


def shown(value: object) -> str:
    """``str(value)`` when every character of it prints, else its ``repr``: how messages and logs
    show a path or name that came from the user (a newline in it cannot forge a line)."""
    text = str(value)
    return text if text.isprintable() else repr(text)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON (numbers must be finite)")


def read_jsonl(
    path: str | os.PathLike, *, allow_nan: bool = False
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, record)`` for each non-blank line of a JSONL file (1-based lines).

    Raises ``InputError`` naming ``file:line`` for bytes that are not UTF-8, text that is not
    JSON (``NaN`` and ``Infinity`` too, unless ``allow_nan``), or a line that is not a JSON object.
    """
    parse_constant = None if allow_nan else _no_constant
    path = Path(path)
    where = shown(path)
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputError(
                    f"{where}:{lineno}: not valid UTF-8 (byte {exc.start}: {raw[exc.start : exc.start + 1]!r})"
                ) from None
            if not text.strip():
                continue
            try:
                record = json.loads(text, parse_constant=parse_constant)
            except json.JSONDecodeError as exc:
                raise InputError(
                    f"{where}:{lineno}: malformed JSON ({exc.msg} at column {exc.colno})"
                ) from None
            except RecursionError:
                raise InputError(f"{where}:{lineno}: malformed JSON (nested too deeply)") from None
            except ValueError as exc:  # NaN / Infinity, or an integer of more than 4300 digits
                raise InputError(f"{where}:{lineno}: {exc}") from None
            if not isinstance(record, dict):
                raise InputError(
                    f"{where}:{lineno}: expected a JSON object, got {type(record).__name__}"
                )
            yield lineno, record


def check_output_path(path: str | os.PathLike) -> None:
    """Fail early, with ``InputError`` naming ``path``, when a file cannot be written there.

    Creates the parent folders and a temporary file beside ``path`` (then removes it), exactly as
    :func:`atomic_write_jsonl` will.
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{shown(path)}: is a folder, not a file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise InputError(f"{shown(path)}: cannot write here ({exc.strerror or exc})") from None
    os.close(fd)
    Path(tmp).unlink(missing_ok=True)


def atomic_write_jsonl(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> None:
    """Write records as JSONL to a temporary file beside ``path``, then rename it into place.

    On any error the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # A lone surrogate (from a "\udc80" escape in the input) is written back as that same JSON
        # escape by "backslashreplace", so every value round-trips and the file stays valid UTF-8.
        with (
            os.fdopen(fd, "w", encoding="utf-8", errors="backslashreplace") as fh,
            jsonlines.Writer(fh, compact=True, dumps=_dumps) as writer,
        ):
            writer.write_all(records)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
