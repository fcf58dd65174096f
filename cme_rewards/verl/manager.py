"""``CMERewardManager``: veRL's reward-loop reward manager ``cme``, configured by ``reward.cme``.

:meth:`CMERewardManager.run_single` scores one sample: ``raw_prompt`` (else the decoded prompt)
and the decoded response in the verifier's chat template, only the assistant's turns of a
multi-turn conversation (:mod:`~cme_rewards.verl.turns`); an unscorable sample gets its group's
floor (:mod:`~cme_rewards.verl.board`). Reward: ``cme_weight * cme`` plus the ``combine_with``
terms (:mod:`~cme_rewards.verl.terms`), at the last valid response token.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
from collections.abc import Callable
from typing import Any

from verl import DataProto
from verl.experimental.reward_loop.reward_manager import register
from verl.experimental.reward_loop.reward_manager.base import RewardManagerBase

from cme_rewards.options import OptionError
from cme_rewards.retry import is_transient, retry_async
from cme_rewards.verl.board import get_group_board
from cme_rewards.verl.settings import CMESettings, CMESettingsError, config_get, config_key
from cme_rewards.verl.terms import build_terms, term_values
from cme_rewards.verl.turns import assistant_turns, combine_turns, turns_for_verifier

EXTRA_INFO_KEYS = ("cme", "n_tokens", "truncated", "error")
"""Keys of every sample's ``reward_extra_info`` (veRL takes the key set from the first sample),
followed by the names of the ``combine_with`` terms."""

ROUTE_FN_PATH = "pkg://cme_rewards.verl"
ROUTE_FN_NAME = "route_to_cme"


def route_to_cme(**_kwargs: Any) -> float:
    """A ``reward.custom_reward_function`` that routes samples to the ``cme`` manager; never called.

    With ``reward.reward_model.enable=true`` and no custom reward function, veRL's
    ``RewardLoopWorker`` bypasses every reward manager (it scores with a reward model).
    """
    raise RuntimeError(
        "route_to_cme only routes veRL to the cme reward manager; it is never called"
    )


def _scalar(value: Any, convert: Callable[[Any], Any]) -> Any:
    """A numpy scalar / 0-d array as ``convert(Python value)``; ``None`` stays ``None``."""
    value = value.item() if hasattr(value, "item") and getattr(value, "ndim", 1) == 0 else value
    return None if value is None else convert(value)


@register("cme")
class CMERewardManager(RewardManagerBase):
    """Cross-Model Entropy reward for veRL's reward loop (see the module docstring).

    veRL passes the trainer ``config``, the policy's ``tokenizer``, ``compute_score`` (a
    ``combine_with`` term) and, with its reward model on, the router's ``host:port`` and tokenizer.
    """

    def __init__(
        self,
        config: Any,
        tokenizer: Any,
        compute_score: Any = None,
        reward_router_address: str | None = None,
        reward_model_tokenizer: Any = None,
    ) -> None:
        super().__init__(config, tokenizer, compute_score)
        self.settings = s = CMESettings.from_verl_config(config)
        self.reward_router_address = reward_router_address
        self._check_config(config)
        self.terms = build_terms(s.verl.combine_with, compute_score, config)
        self.group_size = int(config_get(config, "actor_rollout_ref", "rollout", "n") or 1)
        batch = config_get(config, "data", "train_batch_size")
        self._board = get_group_board(
            margin=s.scorer.floor_margin,
            step_size=int(batch) * self.group_size if batch else None,
            metrics_logger=tuple(s.verl.metrics_logger),
            project=str(config_get(config, "trainer", "project_name") or "cme_rewards"),
            experiment=str(config_get(config, "trainer", "experiment_name") or "cme"),
        )
        self._actor = None
        self._remote = None
        if s.verl.backend == "local":
            from cme_rewards.verl.verifier_actor import get_verifier_actor

            self._actor = get_verifier_actor(s)
        else:
            self._remote = self._make_remote(reward_model_tokenizer)

    def _check_config(self, config: Any) -> None:
        """Fail at start-up on veRL's routing trap (see :func:`route_to_cme`) or a bad logger."""
        from verl.utils.tracking import Tracking

        if config_get(config, "reward", "reward_model", "enable") and not config_get(
            config, "reward", "custom_reward_function", "path"
        ):
            raise CMESettingsError(
                "reward.custom_reward_function.path",
                "with reward.reward_model.enable=true veRL bypasses every reward manager unless a "
                f"custom reward function is set; add reward.custom_reward_function.path={ROUTE_FN_PATH} "
                f"reward.custom_reward_function.name={ROUTE_FN_NAME} to route samples to cme",
            )
        bad = [b for b in self.settings.verl.metrics_logger if b not in Tracking.supported_backend]
        if bad:
            raise CMESettingsError(
                config_key("metrics_logger"),
                f"{bad[0]!r} is not a veRL tracking backend; use any of "
                f"{', '.join(Tracking.supported_backend)}",
            )

    def _make_remote(self, reward_model_tokenizer: Any) -> Any:
        from cme_rewards.remote import load_verifier_tokenizer, make_remote_verifier

        s = self.settings
        url = s.remote.url or self.reward_router_address
        if not url:
            raise CMESettingsError(
                config_key("url"),
                f"backend={s.verl.backend} needs a server: set {config_key('url')}, or let veRL "
                "serve the verifier (reward.reward_model.enable=true, reward.reward_model.model_path=..., "
                "reward.reward_model.rollout.name=vllm|sglang)",
            )
        if s.verifier_given:
            try:
                tokenizer = load_verifier_tokenizer(s.scorer.verifier)
            except (OSError, ValueError) as exc:
                raise CMESettingsError(config_key("verifier"), str(exc)) from exc
        elif reward_model_tokenizer is not None:
            tokenizer = reward_model_tokenizer
        else:
            raise CMESettingsError(
                config_key("verifier"),
                "name the served verifier (its tokenizer builds the token ids)",
            )

        async def check(remote: Any) -> None:
            async with contextlib.aclosing(remote):
                await remote.check()

        try:
            remote = make_remote_verifier(
                s.verl.backend, tokenizer, s.scorer, dataclasses.replace(s.remote, url=url)
            )
            # in a thread of its own: veRL may call this where an event loop is running
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                pool.submit(asyncio.run, check(remote)).result()
        except OptionError as exc:
            raise CMESettingsError(config_key(exc.option), exc.reason) from exc
        return remote

    def _prompt(self, item: Any) -> Any:
        raw = item.non_tensor_batch.get("raw_prompt")
        if raw is not None:
            return [dict(m) for m in raw]
        prompt_ids = item.batch["prompts"]
        prompt_mask = item.batch["attention_mask"][: prompt_ids.shape[-1]].bool()
        return self.tokenizer.decode(prompt_ids[prompt_mask], skip_special_tokens=True)

    def _response(self, item: Any) -> tuple[list[int], list[tuple[bool, str]] | None]:
        """The valid response ids and, for a multi-turn conversation, its turns (else ``None``)."""
        response_ids = item.batch["responses"]
        valid = int(item.batch["attention_mask"][-response_ids.shape[-1] :].sum())
        ids = [int(t) for t in response_ids[:valid]]
        if "response_mask" in item.batch.keys():  # noqa: SIM118 - a TensorDict; veRL's mask
            mask = item.batch["response_mask"][:valid].tolist()
            return ids, assistant_turns(ids, self.tokenizer, mask)
        turns = _scalar(item.non_tensor_batch.get("__num_turns__"), int)
        if turns is None or turns <= 2:  # the prompt and one assistant turn
            return ids, None
        return ids, assistant_turns(ids, self.tokenizer)

    async def _score(
        self, prompt: Any, response: str, turns: list[tuple[bool, str]] | None, uid: str | None
    ) -> dict[str, Any]:
        if self._remote is not None:
            from cme_rewards.remote import RemoteVerifierUnavailable

            try:
                if turns is None:
                    return (await self._remote.score(prompt, response, id=uid)).to_dict()
                pairs = turns_for_verifier(self._remote.encode, prompt, turns)
                results = await asyncio.gather(
                    *(self._remote.score(p, r, id=uid, keep_token_logprobs=True) for p, r in pairs)
                )
                return combine_turns(results, self.settings.scorer, id=uid).to_dict()
            except RemoteVerifierUnavailable as exc:
                raise RuntimeError(
                    f"cme remote verifier ({config_key('url')}) is down: {exc}"
                ) from exc
        if turns is None:
            call = functools.partial(self._actor.score.remote, prompt, response, uid)
        else:
            call = functools.partial(self._actor.score_turns.remote, prompt, turns, uid)
        return await retry_async(
            call,
            what="cme verifier actor",
            tries=self.settings.remote.max_retries,
            # Ray wraps the actor's error
            transient=lambda exc: is_transient(getattr(exc, "cause", None) or exc),
        )

    async def run_single(self, data: DataProto) -> dict[str, Any]:
        """Score one sample (the last row of ``data``); returns veRL's ``reward_score`` dict."""
        item = data[-1:][0]
        ntb = item.non_tensor_batch
        uid = _scalar(ntb.get("uid"), str)
        step = _scalar(ntb.get("global_steps"), int)
        ids, turns = self._response(item)
        response = self.tokenizer.decode(ids, skip_special_tokens=True)
        result, values = await asyncio.gather(
            self._score(self._prompt(item), response, turns, uid),
            term_values(self.terms, item, response, len(ids), self.config, uid),
        )
        s = self.settings
        group_floor = await self._board.settle.remote(
            uid, step, result, self.group_size, s.verl.group_wait_s, values
        )
        cme = float(result["cme"]) if group_floor is None else float(group_floor)
        info = {
            "cme": cme,
            "n_tokens": int(result["n_tokens"]),
            "truncated": bool(result["truncated"]),
            "error": result["error"] or "",
            **values,
        }
        reward = s.verl.cme_weight * cme + sum(t.weight * values[t.name] for t in self.terms)
        return {"reward_score": reward, "reward_extra_info": info}
