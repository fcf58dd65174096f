"""The pairwise judge prompt and its verdict format.

The judge sees one instruction and two answers labelled A and B (which system is A depends on the
presentation order) and must end its reply with one line ``WINNER: A``, ``WINNER: B`` or
``WINNER: TIE``. The same wording is used by every backend; the local backend appends the prefix
``WINNER:`` after the chat template's generation prompt and reads the probabilities of the next token
instead of generating.
"""

from __future__ import annotations

import re

SYSTEM_PROMPT = (
    "You are a careful, impartial judge of AI assistant answers. You compare two answers to the same "
    "instruction and decide which one is more helpful, correct, and relevant to the instruction. "
    "The order in which the answers appear and their length must not influence your decision."
)

USER_TEMPLATE = """Instruction:
{instruction}

[Answer A]
{answer_a}
[End of answer A]

[Answer B]
{answer_b}
[End of answer B]

Which answer follows the instruction better? Reply with exactly one line: WINNER: A, WINNER: B, or WINNER: TIE."""

REMINDER = "Your reply could not be read. Reply with exactly one line: WINNER: A, WINNER: B, or WINNER: TIE."

VERDICT_PREFIX = "WINNER:"
LABELS = ("A", "B", "TIE")

_VERDICT = re.compile(r"WINNER\s*[:=]\s*[\*\"'\[\(]*\s*(TIE|A|B)\b", re.IGNORECASE)


def build_messages(instruction: str, answer_a: str, answer_b: str) -> list[dict[str, str]]:
    """Chat messages (system + user) asking for a verdict on answers A and B."""
    user = USER_TEMPLATE.format(instruction=instruction, answer_a=answer_a, answer_b=answer_b)
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def parse_verdict(text: str | None) -> str | None:
    """``"A"``, ``"B"`` or ``"TIE"`` from the last ``WINNER: ...`` in ``text``; None if there is none."""
    if not text:
        return None
    found = _VERDICT.findall(text)
    return found[-1].upper() if found else None
