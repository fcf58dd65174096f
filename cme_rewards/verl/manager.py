"""``CMERewardManager``: veRL's reward-loop reward manager named ``cme``.

Selected with ``reward.reward_manager.name=cme``; configured by the ``reward.cme`` block (see
:mod:`cme_rewards.verl.settings`). veRL creates one manager inside each of its ``reward.num_workers``
``RewardLoopWorker`` Ray actors and calls :meth:`CMERewardManager.run_single` once per sample; the
reward lands at the sample's last valid response token (veRL's ``assemble_rm_scores``).

Per sample:

- prompt: the raw chat messages (``non_tensor_batch["raw_prompt"]``, which veRL's ``RLHFDataset``
  provides) rebuilt with the verifier's own chat template; without them, the prompt ids decoded
  with the policy tokenizer (special tokens skipped) as one user message;
- response: the valid response ids decoded with the policy tokenizer (special tokens skipped), then
  re-tokenized with the verifier's tokenizer, so policy and verifier may come from different families;
  in a multi-turn / tool conversation only the assistant's own turns are scored, each after the
  conversation before it (:mod:`cme_rewards.verl.turns`);
- the group floor: a sample that cannot be scored gets just below its group's worst scored member
  (:mod:`cme_rewards.verl.board`), which also logs the per-step ``cme/*`` metrics;
- the reward: ``cme_weight * cme`` plus the weighted ``combine_with`` terms
  (:mod:`cme_rewards.verl.terms`);
- ``reward_extra_info``: ``cme`` (nats), ``n_tokens``, ``truncated`` and ``error`` (``""`` when
  none), then each combined term by name: the same keys for every sample, shown in veRL's logs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import hashlib
import logging
from collections.abc import Coroutine
from typing import Any

from verl import DataProto
from verl.experimental.reward_loop.reward_manager import register
from verl.experimental.reward_loop.reward_manager.base import RewardManagerBase

from cme_rewards.options import OptionError
from cme_rewards.verl.settings import CMESettings, CMESettingsError, config_key

logger = logging.getLogger(__name__)

EXTRA_INFO_KEYS = ("cme", "n_tokens", "truncated", "error")
"""Keys of every sample's ``reward_extra_info`` (veRL takes the key set from the first sample),
followed by the names of the ``combine_with`` terms."""

ROUTE_FN_PATH = "pkg://cme_rewards.verl"
ROUTE_FN_NAME = "route_to_cme"


def route_to_cme(**_kwargs: Any) -> float:
    """Placeholder for ``reward.custom_reward_function`` when veRL's reward model is enabled.

    With ``reward.reward_model.enable=true`` and no custom reward function, veRL's
    ``RewardLoopWorker`` bypasses every reward manager (it scores with a discriminative reward
    model). Naming this function (``reward.custom_reward_function.path=pkg://cme_rewards.verl``,
    ``reward.custom_reward_function.name=route_to_cme``) routes samples to the ``cme`` manager,
    which never calls it.
    """
    raise RuntimeError(
        "route_to_cme only routes veRL to the cme reward manager; it is never called"
    )


def _run_blocking(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coro`` to completion from sync code, even where an event loop is already running."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def _cfg(config: Any, *keys: str) -> Any:
    for key in keys:
        if config is None:
            return None
        config = config.get(key) if hasattr(config, "get") else getattr(config, key, None)
    return config


def _scalar(value: Any) -> Any:
    """A numpy scalar / 0-d array as a Python value."""
    return value.item() if hasattr(value, "item") and getattr(value, "ndim", 1) == 0 else value


@register("cme")
class CMERewardManager(RewardManagerBase):
    """Cross-Model Entropy reward for veRL's reward loop (see the module docstring).

    Args (as veRL's ``load_reward_manager`` passes them):
        config: the whole trainer config; ``reward.cme`` holds this manager's settings.
        tokenizer: the policy's tokenizer.
        compute_score: veRL's reward function slot: the ``compute_score`` term of
            ``reward.cme.combine_with`` (CME itself does not use it).
        reward_router_address: ``host:port`` of veRL's reward-model router, when enabled.
        reward_model_tokenizer: the tokenizer of ``reward.reward_model.model_path``, when enabled.
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
        self.settings = CMESettings.from_verl_config(config)
        self.reward_router_address = reward_router_address
        self._check_routing(config)
        self._check_metrics_logger()
        from cme_rewards.verl.terms import build_terms

        self.terms = build_terms(self.settings.verl.combine_with, compute_score, config)
        self.group_size = int(_cfg(config, "actor_rollout_ref", "rollout", "n") or 1)
        self._board = self._make_board(config)
        self._actor = None
        self._remote = None
        if self.settings.verl.backend == "local":
            from cme_rewards.verl.verifier_actor import get_verifier_actor

            self._actor = get_verifier_actor(self.settings)
        else:
            self._remote = self._make_remote(reward_model_tokenizer)

    # -- start-up --------------------------------------------------------------------------------

    def _check_routing(self, config: Any) -> None:
        """Fail at start-up on veRL's routing trap (see :func:`route_to_cme`)."""
        if _cfg(config, "reward", "reward_model", "enable") and not _cfg(
            config, "reward", "custom_reward_function", "path"
        ):
            raise CMESettingsError(
                "reward.custom_reward_function.path",
                "with reward.reward_model.enable=true veRL bypasses every reward manager unless a "
                f"custom reward function is set; add reward.custom_reward_function.path={ROUTE_FN_PATH} "
                f"reward.custom_reward_function.name={ROUTE_FN_NAME} to route samples to cme",
            )

    def _check_metrics_logger(self) -> None:
        from verl.utils.tracking import Tracking

        bad = [b for b in self.settings.verl.metrics_logger if b not in Tracking.supported_backend]
        if bad:
            raise CMESettingsError(
                config_key("metrics_logger"),
                f"{bad[0]!r} is not a veRL tracking backend; use any of "
                f"{', '.join(Tracking.supported_backend)}",
            )

    def _make_board(self, config: Any) -> Any:
        from cme_rewards.verl.board import BOARD_PREFIX, get_group_board

        batch = _cfg(config, "data", "train_batch_size")
        kwargs = {
            "margin": self.settings.scorer.floor_margin,
            "step_size": int(batch) * self.group_size if batch else None,
            "metrics_logger": tuple(self.settings.verl.metrics_logger),
            "project": str(_cfg(config, "trainer", "project_name") or "cme_rewards"),
            "experiment": str(_cfg(config, "trainer", "experiment_name") or "cme"),
        }
        key = hashlib.sha256(repr(sorted(kwargs.items())).encode()).hexdigest()[:12]
        return get_group_board(f"{BOARD_PREFIX}_{key}", **kwargs)

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
        try:
            remote = make_remote_verifier(
                s.verl.backend, tokenizer, s.scorer, dataclasses.replace(s.remote, url=url)
            )
            _run_blocking(self._checked(remote))
        except OptionError as exc:
            raise CMESettingsError(config_key(exc.option), exc.reason) from exc
        return remote

    @staticmethod
    async def _checked(remote: Any) -> None:
        try:
            await remote.check()
        finally:
            await remote.aclose()

    # -- per sample ------------------------------------------------------------------------------

    def _prompt(self, item: Any, mask: Any) -> Any:
        raw = item.non_tensor_batch.get("raw_prompt")
        if raw is not None:
            return [dict(m) for m in list(raw)]
        prompt_ids = item.batch["prompts"]
        prompt_mask = mask[: prompt_ids.shape[-1]].bool()
        return self.tokenizer.decode(prompt_ids[prompt_mask], skip_special_tokens=True)

    def _response(self, item: Any) -> tuple[list[int], list[tuple[bool, str]] | None]:
        """The valid response ids and, for a multi-turn conversation, its turns (else ``None``)."""
        from cme_rewards.verl.turns import conversation, segments_from_mask, segments_from_template

        response_ids = item.batch["responses"]
        n = response_ids.shape[-1]
        valid = int(item.batch["attention_mask"][-n:].sum())
        ids = [int(t) for t in response_ids[:valid]]
        if "response_mask" in item.batch.keys():  # noqa: SIM118 - a TensorDict; veRL's mask
            mask = item.batch["response_mask"][:valid]
            if bool(mask.all()):
                return ids, None
            return ids, conversation(segments_from_mask(ids, mask.tolist()), self.tokenizer)
        turns = _scalar(item.non_tensor_batch.get("__num_turns__"))
        if turns is None or int(turns) <= 2:  # the prompt and one assistant turn
            return ids, None
        segments = segments_from_template(ids, self.tokenizer)
        if sum(s.assistant for s in segments) <= 1 and all(s.assistant for s in segments):
            return ids, None
        return ids, conversation(segments, self.tokenizer)

    async def _score(
        self, prompt: Any, response: str, turns: list[tuple[bool, str]] | None, uid: str | None
    ) -> dict[str, Any]:
        if self._remote is not None:
            from cme_rewards.remote import RemoteVerifierUnavailable

            try:
                if turns is None:
                    return (await self._remote.score(prompt, response, id=uid)).to_dict()
                return (await self._remote_turns(prompt, turns, uid)).to_dict()
            except RemoteVerifierUnavailable as exc:
                raise RuntimeError(
                    f"cme remote verifier ({config_key('url')}) is down: {exc}"
                ) from exc
        from cme_rewards.retry import is_transient, retry_async

        def transient(exc: BaseException) -> bool:
            return is_transient(getattr(exc, "cause", None) or exc)  # Ray wraps the actor's error

        def call() -> Any:
            if turns is None:
                return self._actor.score.remote(prompt, response, uid)
            return self._actor.score_turns.remote(prompt, turns, uid)

        return await retry_async(
            call,
            what="cme verifier actor",
            tries=self.settings.remote.max_retries,
            transient=transient,
        )

    async def _remote_turns(self, prompt: Any, turns: list[tuple[bool, str]], uid: str | None):
        from cme_rewards.verl.turns import combine_turns, turns_for_verifier

        pairs = turns_for_verifier(self._remote.encode, prompt, turns)
        results = await asyncio.gather(
            *(self._remote.score(p, r, id=uid, keep_token_logprobs=True) for p, r in pairs)
        )
        return combine_turns(results, self.settings.scorer, id=uid)

    async def run_single(self, data: DataProto) -> dict[str, Any]:
        """Score one sample (the last row of ``data``); returns veRL's ``reward_score`` dict."""
        from cme_rewards.verl.terms import term_values, weighted

        item = data[-1:][0]
        ntb = item.non_tensor_batch
        uid = _scalar(ntb.get("uid"))
        uid = None if uid is None else str(uid)
        step = _scalar(ntb.get("global_steps"))
        step = int(step) if step is not None else None
        mask = item.batch["attention_mask"]
        ids, turns = self._response(item)
        response = self.tokenizer.decode(ids, skip_special_tokens=True)
        prompt = self._prompt(item, mask)
        result, values = await asyncio.gather(
            self._score(prompt, response, turns, uid),
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
        reward = weighted(cme, s.verl.cme_weight, self.terms, values)
        return {"reward_score": reward, "reward_extra_info": info}
