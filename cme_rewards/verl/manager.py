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
- ``reward_extra_info``: ``cme`` (nats), ``n_tokens``, ``truncated`` and ``error`` (``""`` when
  none), the same keys for every sample, shown in veRL's logs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
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
"""Keys of every sample's ``reward_extra_info`` (veRL takes the key set from the first sample)."""

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


@register("cme")
class CMERewardManager(RewardManagerBase):
    """Cross-Model Entropy reward for veRL's reward loop (see the module docstring).

    Args (as veRL's ``load_reward_manager`` passes them):
        config: the whole trainer config; ``reward.cme`` holds this manager's settings.
        tokenizer: the policy's tokenizer.
        compute_score: veRL's reward function slot (unused: the verifier is the reward).
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

    def _prompt_and_response(self, item: Any) -> tuple[Any, str]:
        """The sample's prompt (chat messages, or decoded text) and decoded response text."""
        response_ids = item.batch["responses"]
        response_length = response_ids.shape[-1]
        mask = item.batch["attention_mask"]
        valid = int(mask[-response_length:].sum())
        response = self.tokenizer.decode(response_ids[:valid], skip_special_tokens=True)
        raw = item.non_tensor_batch.get("raw_prompt")
        if raw is not None:
            prompt: Any = [dict(m) for m in list(raw)]
        else:
            prompt_ids = item.batch["prompts"]
            prompt_mask = mask[: prompt_ids.shape[-1]].bool()
            prompt = self.tokenizer.decode(prompt_ids[prompt_mask], skip_special_tokens=True)
        return prompt, response

    async def _score(self, prompt: Any, response: str, uid: str | None) -> dict[str, Any]:
        if self._remote is not None:
            from cme_rewards.remote import RemoteVerifierUnavailable

            try:
                return (await self._remote.score(prompt, response, id=uid)).to_dict()
            except RemoteVerifierUnavailable as exc:
                raise RuntimeError(
                    f"cme remote verifier ({config_key('url')}) is down: {exc}"
                ) from exc
        from cme_rewards.retry import is_transient, retry_async

        def transient(exc: BaseException) -> bool:
            return is_transient(getattr(exc, "cause", None) or exc)  # Ray wraps the actor's error

        return await retry_async(
            lambda: self._actor.score.remote(prompt, response, uid),
            what="cme verifier actor",
            tries=self.settings.remote.max_retries,
            transient=transient,
        )

    async def run_single(self, data: DataProto) -> dict[str, Any]:
        """Score one sample (the last row of ``data``); returns veRL's ``reward_score`` dict."""
        item = data[-1:][0]
        uid = item.non_tensor_batch.get("uid")
        uid = None if uid is None else str(uid)
        prompt, response = self._prompt_and_response(item)
        result = await self._score(prompt, response, uid)
        info = {
            "cme": float(result["cme"]),
            "n_tokens": int(result["n_tokens"]),
            "truncated": bool(result["truncated"]),
            "error": result["error"] or "",
        }
        return {"reward_score": info["cme"], "reward_extra_info": info}
