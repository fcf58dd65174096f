"""GRPO with the CME reward in TRL, with the paper's settings as defaults.

    python integrations/trl/train_grpo_cme.py \
        --policy smollm2-135m-instruct --verifier gemma3-270m \
        --prompts prompts.jsonl --output_dir runs/cme

Defaults (overridable; every ``GRPOConfig`` flag is accepted, and ``--config file.yaml``):
group size ``--num_generations 8``, ``--temperature 1.0``, ``--learning_rate 3e-6``,
``--max_completion_length 2048``, and ``--beta`` (KL coefficient) 0.01 when the policy's tokenizer
has a chat template (an instruct policy), else 0. ``--use_cpu`` defaults to true when no CUDA
device is present. The paper's settings name no loss type, so TRL 1.16's own defaults stay, on
purpose: ``--loss_type dapo`` (token losses normalised by the active tokens of the whole
accumulated batch, which has no length bias) and ``--scale_rewards group``; pass
``--loss_type grpo`` for GRPO's original per-sequence normalisation.

``--prompts``: JSONL, one prompt per line, as ``{"prompt": "text"}`` (standard format) or
``{"messages": [{"role": "user", "content": ...}, ...]}`` (conversational; trailing assistant
turns, such as a reference answer, are dropped). All lines use one of the two. An optional ``id``
field names samples in warnings. When the policy's tokenizer has a chat template (an instruct
policy), each text prompt is sent as one user message, so that TRL applies the template (an
instruct model fed raw text mostly ends at once: empty completions, all at the floor, no gradient);
the script logs that it did so, and ``--chat_prompts false`` keeps raw text.

``--save_model false`` saves nothing: no final model and, unless ``--save_strategy`` is given, no
checkpoints either.

``--policy`` and ``--verifier`` accept the built-in names of ``cme_rewards.models`` (the policy is
then loaded from the package's converted transformers folder), a local folder, or a hub id. Every
other option of the CME scorer is a ``--cme_<option>`` flag generated from
``cme_rewards.options.ScorerOptions`` (``--cme_dtype``, ``--cme_max_length``, ``--cme_reduction``,
...), with the same defaults and checks as on every other surface.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cme_rewards.io import InputError, read_jsonl
from cme_rewards.models import BUILTIN_VERIFIERS, cached_model_dir
from cme_rewards.options import OptionError, ScorerOptions, describe, from_strings
from cme_rewards.trl import AsyncCMEReward, CMEReward, LengthPenalty

PAPER_DEFAULTS: dict[str, Any] = {
    "num_generations": 8,
    "temperature": 1.0,
    "learning_rate": 3e-6,
    "max_completion_length": 2048,
    "beta": None,  # resolved by instruct_beta()
}
INSTRUCT_BETA = 0.01

logger = logging.getLogger("cme_rewards.train_grpo_cme")


OPTION_PREFIX = "cme_"
"""Script arguments ``--cme_<option>`` carry ``ScorerOptions.<option>`` (``--verifier`` keeps its name)."""


def script_name(option: str) -> str:
    """The script's argument for a scorer option: ``verifier``, else ``cme_<option>``."""
    return option if option == "verifier" else OPTION_PREFIX + option


def _scorer_fields() -> list[tuple[str, Any, Any]]:
    """``(name, type, field)`` of every ``ScorerOptions`` field for ``HfArgumentParser``.

    Each is read as text (``None``: not given) and parsed and checked by ``ScorerOptions`` itself,
    so a bad value gets the same message as on every other surface.
    """
    return [
        (script_name(f.name), str | None, field(default=None, metadata={"help": describe(f)}))
        for f in dataclasses.fields(ScorerOptions)
    ]


@dataclass
class _ScriptOnlyArguments:
    """Arguments of this script beside ``GRPOConfig``'s and the scorer's options."""

    policy: str = field(metadata={"help": "Policy: built-in name, local folder or hub id."})
    prompts: str = field(metadata={"help": "JSONL of prompts ('prompt' or 'messages' per line)."})
    async_reward: bool = field(
        default=False,
        metadata={"help": "Use the async CME reward (runs beside other async rewards)."},
    )
    length_penalty: float = field(
        default=0.0,
        metadata={
            "help": "Weight of a length penalty -len/max_completion_length added to CME (0: none)."
        },
    )
    limit: int | None = field(default=None, metadata={"help": "Use only the first N prompts."})
    save_model: bool = field(
        default=True,
        metadata={
            "help": "Save the trained policy at the end; false saves nothing (and no checkpoints "
            "unless --save_strategy is given)."
        },
    )
    chat_prompts: bool = field(
        default=True,
        metadata={
            "help": "Send each text prompt as one user message when the policy has a chat "
            "template (false: as raw text)."
        },
    )


CMEScriptArguments = dataclasses.make_dataclass(
    "CMEScriptArguments",
    [(f.name, f.type, f) for f in dataclasses.fields(_ScriptOnlyArguments)] + _scorer_fields(),
    namespace={"__doc__": "This script's arguments: its own, and every CME scorer option."},
)


def scorer_options(args: Any) -> ScorerOptions:
    """The ``ScorerOptions`` the script's arguments name; :class:`OptionError` spells ``--cme_*``."""
    given = {
        f.name: getattr(args, script_name(f.name))
        for f in dataclasses.fields(ScorerOptions)
        if getattr(args, script_name(f.name)) is not None
    }
    return from_strings(ScorerOptions, given, lambda name: "--" + script_name(name))


def resolve_model(name: str) -> str:
    """A built-in model name -> its converted transformers folder; anything else unchanged."""
    return str(cached_model_dir(name)) if name in BUILTIN_VERIFIERS else name


def load_prompts(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Rows ``{"prompt": str | list[message]}`` (plus ``id`` as a string when given) from JSONL.

    Raises ``InputError`` naming ``file:line`` for a line without ``prompt``/``messages``, a wrong
    type, an empty conversation, or a file mixing the standard and conversational formats.
    """
    rows: list[dict[str, Any]] = []
    kind: tuple[str, int] | None = None  # ("standard" | "conversational", first line of that kind)
    for lineno, record in read_jsonl(path):
        where = f"{path}:{lineno}"
        if "prompt" in record and isinstance(record["prompt"], str):
            prompt: str | list[dict[str, Any]] = record["prompt"]
            this = "standard"
        elif "messages" in record or isinstance(record.get("prompt"), list):
            key = "messages" if "messages" in record else "prompt"
            messages = record[key]
            if not isinstance(messages, list) or not all(
                isinstance(m, dict) and "role" in m and "content" in m for m in messages
            ):
                raise InputError(
                    f"{where}: field '{key}' must be a list of {{role, content}} messages"
                )
            while messages and messages[-1]["role"] == "assistant":
                messages = messages[:-1]
            if not messages:
                raise InputError(f"{where}: field '{key}' has no message before the assistant turn")
            prompt, this = messages, "conversational"
        else:
            raise InputError(f"{where}: expected a 'prompt' string or a 'messages' list")
        if kind is None:
            kind = (this, lineno)
        elif kind[0] != this:
            raise InputError(
                f"{where}: {this} prompt, but line {kind[1]} is {kind[0]}; use one format per file"
            )
        row: dict[str, Any] = {"prompt": prompt}
        if "id" in record:
            row["id"] = str(record["id"])
        rows.append(row)
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise InputError(f"{path}: no prompts")
    if any("id" in r for r in rows) and not all("id" in r for r in rows):
        raise InputError(f"{path}: 'id' is given on some lines but not all")
    return rows


def as_chat(rows: list[dict[str, Any]], tokenizer: Any) -> list[dict[str, Any]]:
    """Text prompts as one user message each when ``tokenizer`` has a chat template (logged), so
    that TRL renders them with it; rows that are already chat messages, or a policy without a
    template, are returned as they are."""
    if not getattr(tokenizer, "chat_template", None):
        return rows
    text = [r for r in rows if isinstance(r["prompt"], str)]
    if not text:
        return rows
    logger.warning(
        "the policy has a chat template: each of the %d text prompts is sent as one user message "
        '(write {"messages": [...]} lines to choose the conversation, or pass '
        "--chat_prompts false to keep raw text)",
        len(text),
    )
    return [
        {**r, "prompt": [{"role": "user", "content": r["prompt"]}]}
        if isinstance(r["prompt"], str)
        else r
        for r in rows
    ]


def given(argv: list[str], name: str) -> bool:
    """Whether ``--name`` is on the command line (``--name v`` or ``--name=v``)."""
    return any(a == f"--{name}" or a.startswith(f"--{name}=") for a in argv)


def instruct_beta(tokenizer: Any) -> float:
    """The paper's KL coefficient: 0.01 for instruct policies (tokenizer has a chat template), else 0."""
    return INSTRUCT_BETA if getattr(tokenizer, "chat_template", None) else 0.0


def make_parser():
    """``TrlParser`` over (``CMEScriptArguments``, ``GRPOConfig``) with the paper's defaults, and
    ``--use_cpu`` defaulting to true where no CUDA device is present."""
    import torch
    from trl import GRPOConfig, TrlParser

    parser = TrlParser((CMEScriptArguments, GRPOConfig))
    parser.set_defaults_with_config(**PAPER_DEFAULTS, use_cpu=not torch.cuda.is_available())
    return parser


def build_rewards(args: Any, config: Any) -> list[Any]:
    """CME (sync or async) plus, when ``--length_penalty`` > 0, a ``LengthPenalty``; sets
    ``config.reward_weights`` to ``[1, length_penalty]`` unless given."""
    reward_cls = AsyncCMEReward if args.async_reward else CMEReward
    rewards: list[Any] = [reward_cls(**dataclasses.asdict(scorer_options(args)))]
    if args.length_penalty > 0:
        rewards.append(LengthPenalty(config.max_completion_length))
        if config.reward_weights is None:
            config.reward_weights = [1.0, args.length_penalty]
    return rewards


def run(argv: list[str] | None = None) -> Any:
    """Parse ``argv`` (default ``sys.argv[1:]``), train, save unless ``--save_model false``; returns
    the ``GRPOTrainer``. Raises ``InputError`` naming ``file:line`` for a bad prompt file."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from transformers.trainer_utils import SaveStrategy
    from trl import GRPOTrainer

    argv = sys.argv[1:] if argv is None else list(argv)
    args, config = make_parser().parse_args_and_config(args=argv)
    scorer_options(args)  # a bad option fails before anything loads
    rows = load_prompts(args.prompts, args.limit)
    policy = resolve_model(args.policy)
    tokenizer = AutoTokenizer.from_pretrained(policy)
    if args.chat_prompts:
        rows = as_chat(rows, tokenizer)
    if config.beta is None:
        config.beta = instruct_beta(tokenizer)
    if not args.save_model and not given(argv, "save_strategy"):
        config.save_strategy = SaveStrategy.NO
    trainer = GRPOTrainer(
        model=policy,
        reward_funcs=build_rewards(args, config),
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    trainer.train()
    if args.save_model:
        trainer.save_model(config.output_dir)
    return trainer


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: 0 on success, 2 with a message for a bad prompt file or option."""
    try:
        run(argv)
    except InputError as exc:
        print(f"error: --prompts: {exc}", file=sys.stderr)
        return 2
    except OptionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
