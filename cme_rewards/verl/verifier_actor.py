"""One local verifier per node, shared by all of veRL's reward-loop workers on it.

veRL's ``RewardLoopWorker`` actors reserve no GPU, so the first one on a node starts a named Ray
actor, :class:`VerifierActor` (``reward.cme.num_gpus`` / ``num_cpus``), that batches the calls of
all workers (:class:`cme_rewards.batched_scorer.BatchedScorer`).
"""

from __future__ import annotations

import functools
import logging
from types import SimpleNamespace
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from cme_rewards.batched_scorer import BatchedScorer, Sample
from cme_rewards.verl.settings import CMESettings, CMESettingsError, config_key
from cme_rewards.verl.turns import combine_turns, turns_for_verifier

logger = logging.getLogger(__name__)

ACTOR_PREFIX = "cme_verifier"


class VerifierActor:
    """A :class:`cme_rewards.CMEScorer` batching the calls of many callers; a Ray actor
    (:func:`get_verifier_actor`) or plain Python."""

    def __init__(self, settings: CMESettings) -> None:
        from cme_rewards.scorer import CMEScorer

        self.scorer = CMEScorer(options=settings.scorer.replace(device=actor_device(settings)))
        self.calls = 0
        self.batches: list[int] = []
        keep_token_logprobs = SimpleNamespace(  # the scorer; multi-turn min_k needs token log-probs
            options=self.scorer.options,
            encode=self.scorer.encode,
            score=functools.partial(self.scorer.score, return_token_logprobs=True),
        )
        self.batched = BatchedScorer(
            keep_token_logprobs,
            settings.batch,
            on_batch=lambda stats: self.batches.append(stats.size),
        )

    def info(self) -> dict[str, Any]:
        """Where the verifier runs and how calls were batched so far (``batch_sizes``)."""
        return {
            "verifier": self.scorer.verifier_name,
            "device": str(self.scorer.device),
            "node_id": ray.get_runtime_context().get_node_id() if ray.is_initialized() else None,
            "calls": self.calls,
            "batch_sizes": list(self.batches),
        }

    async def score(self, prompt: Any, response: str, id: str | None = None) -> dict[str, Any]:
        """Score one sample: ``CMEResult.to_dict()`` (``cme`` in nats, ``n_tokens``, ...).
        Transient trouble (overload, out of memory) raises, so the caller can retry."""
        self.calls += 1
        result = await self.batched.score_async(Sample(prompt=prompt, response=response, id=id))
        return result.to_dict()

    async def score_turns(
        self, prompt: Any, turns: list[tuple[bool, str]], id: str | None = None
    ) -> dict[str, Any]:
        """Score a multi-turn conversation's assistant turns (``[(is_assistant, text)]`` after
        ``prompt``) as one sample; see :mod:`cme_rewards.verl.turns`."""
        self.calls += 1
        pairs = turns_for_verifier(self.scorer.encode, prompt, turns)
        samples = [Sample(prompt=p, response=r, id=id) for p, r in pairs]
        results = await self.batched.score_many_async(samples) if samples else []
        return combine_turns(results, self.scorer.options, id=id).to_dict()


def actor_device(settings: CMESettings) -> str:
    """The verifier's device: ``auto`` is the GPU Ray reserved for the actor, or CPU when none
    (Ray leaves ``CUDA_VISIBLE_DEVICES`` alone for an actor without GPUs; ``device=cuda`` with
    ``num_gpus=0`` takes an unreserved GPU on purpose)."""
    if settings.scorer.device == "auto" and settings.verl.num_gpus == 0:
        return "cpu"
    return settings.scorer.device


def get_verifier_actor(settings: CMESettings) -> ray.actor.ActorHandle:
    """The verifier actor of this node, started on first use; waits until its verifier is loaded.

    Raises :class:`CMESettingsError` when it does not start within ``timeout_s`` (no free resources
    for ``num_gpus`` / ``num_cpus`` on this node) or its verifier fails to load.
    """
    node_id = ray.get_runtime_context().get_node_id()
    name = f"{ACTOR_PREFIX}_{settings.actor_key()}_{node_id[:16]}"
    handle = (
        ray.remote(VerifierActor)
        .options(
            name=name,
            get_if_exists=True,
            num_gpus=settings.verl.num_gpus,
            num_cpus=settings.verl.num_cpus,
            max_concurrency=1000,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
        )
        .remote(settings)
    )
    try:
        info = ray.get(handle.info.remote(), timeout=settings.remote.timeout_s)
    except ray.exceptions.GetTimeoutError as exc:
        v = settings.verl
        raise CMESettingsError(
            config_key("num_gpus"),
            f"the verifier actor {name} did not start within {config_key('timeout_s')}="
            f"{settings.remote.timeout_s} s; node {node_id} may have no free "
            f"num_gpus={v.num_gpus} / num_cpus={v.num_cpus} (GPUs held by veRL's "
            "placement groups are not free: use a fraction of a GPU left outside them, or 0 for CPU)",
        ) from exc
    except ray.exceptions.RayActorError as exc:
        raise CMESettingsError(
            config_key("verifier"), f"the verifier actor failed to start: {exc}"
        ) from exc
    logger.info("cme verifier actor %r ready: %r", name, info)
    return handle
