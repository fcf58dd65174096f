"""Rewards combined with CME, as TRL's ``reward_funcs`` / ``reward_weights`` combine them.

Each ``reward.cme.combine_with`` term ``[WEIGHT*]NAME`` adds ``WEIGHT * value`` to the reward and is
logged by name (see :class:`~cme_rewards.verl.settings.VerlOptions`). A function may be sync or
async; a dict value contributes its ``"score"``; ``None`` or a non-finite value counts 0, with a
warning naming the sample.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cme_rewards.verl.settings import CMESettingsError, config_get, config_key, split_term

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Term:
    """One combined reward: its weight, logged name, and function of the sample."""

    weight: float
    name: str
    fn: Callable[..., Any] | None  # None: length_penalty


def build_terms(entries: tuple[str, ...], compute_score: Any, config: Any) -> list[Term]:
    """The terms of ``reward.cme.combine_with``; a bad one raises naming the key."""
    from cme_rewards.verl.manager import ROUTE_FN_NAME

    terms = []
    for entry in entries:
        weight, spec, name = split_term(entry)
        if spec == "length_penalty":
            if not config_get(config, "data", "max_response_length"):
                raise CMESettingsError(
                    config_key("combine_with"), "length_penalty needs data.max_response_length"
                )
            terms.append(Term(weight, name, None))
            continue
        if spec == "compute_score":
            fn = compute_score
            if fn is None:
                from verl.utils.reward_score import default_compute_score as fn
            inner = fn.args[0] if hasattr(fn, "args") else fn  # veRL may wrap it in a partial
            if getattr(inner, "__name__", "") == ROUTE_FN_NAME:
                raise CMESettingsError(
                    config_key("combine_with"),
                    "compute_score is route_to_cme here (veRL's reward model is on); name the rule "
                    "itself, e.g. pkg://verl.utils.reward_score:default_compute_score",
                )
        else:
            from verl.utils.import_utils import load_extern_object

            path, _, fn_name = spec.rpartition(":")
            try:
                fn = load_extern_object(module_path=path, object_name=fn_name)
            except Exception as exc:  # noqa: BLE001 - any loading failure names the key
                raise CMESettingsError(
                    config_key("combine_with"), f"cannot load {spec!r}: {type(exc).__name__}: {exc}"
                ) from exc
        terms.append(Term(weight, name, fn))
    return terms


async def term_values(
    terms: list[Term], item: Any, response_text: str, n_response_tokens: int, config: Any, uid: Any
) -> dict[str, float]:
    """Each term's value for one sample (the term's own scale, before its weight)."""
    if not terms:
        return {}
    ntb = item.non_tensor_batch
    reward_model = ntb.get("reward_model")
    ground_truth = reward_model.get("ground_truth") if isinstance(reward_model, dict) else None
    extra_info = dict(ntb.get("extra_info") or {})
    extra_info.setdefault("num_turns", ntb.get("__num_turns__"))
    kwargs = {
        "data_source": ntb.get("data_source"),
        "solution_str": response_text,
        "ground_truth": ground_truth,
        "extra_info": extra_info,
    }
    loop = asyncio.get_running_loop()

    async def one(term: Term) -> float:
        if term.fn is None:
            return -n_response_tokens / float(config_get(config, "data", "max_response_length"))
        if inspect.iscoroutinefunction(term.fn) or inspect.iscoroutinefunction(
            getattr(term.fn, "func", None)
        ):
            value = await term.fn(**kwargs)
        else:
            value = await loop.run_in_executor(None, lambda: term.fn(**kwargs))
        if isinstance(value, dict):
            value = value.get("score")
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if math.isfinite(number):
            return number
        logger.warning(
            "reward term %r returned %r for sample %r: it counts 0 for this sample",
            term.name,
            value,
            uid,
        )
        return 0.0

    values = await asyncio.gather(*(one(t) for t in terms))
    return {t.name: v for t, v in zip(terms, values, strict=True)}
