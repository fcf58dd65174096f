"""One local verifier per node, shared by all of veRL's reward-loop workers on it.

veRL runs ``reward.num_workers`` ``RewardLoopWorker`` actors that reserve no GPU; loading the verifier
in each would load it that many times, on a device Ray did not give them. Instead the first worker on
a node starts a named Ray actor, :class:`VerifierActor`, that reserves ``reward.cme.num_gpus`` (a
fraction lets a small verifier share a GPU; 0 runs it on CPU) and ``reward.cme.num_cpus``; the other
workers find it by name (``get_if_exists``). Its async :meth:`VerifierActor.score` is called once per
sample (:meth:`VerifierActor.score_turns` for a multi-turn conversation, one entry per assistant
turn); concurrent calls from all workers are coalesced into one :meth:`cme_rewards.CMEScorer.score`
batch by :class:`cme_rewards.batched_scorer.BatchedScorer`.
"""

from __future__ import annotations

import logging
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from cme_rewards.batched_scorer import BatchedScorer, Sample
from cme_rewards.batching import BatchStats
from cme_rewards.verl.settings import CMESettings, CMESettingsError, config_key
from cme_rewards.verl.turns import combine_turns, turns_for_verifier

logger = logging.getLogger(__name__)

ACTOR_PREFIX = "cme_verifier"


class VerifierActor:
    """A :class:`cme_rewards.CMEScorer` that batches the single-sample calls of many callers.

    Used as a Ray actor (see :func:`get_verifier_actor`); plain Python otherwise.
    """

    def __init__(self, settings: CMESettings) -> None:
        from cme_rewards.scorer import CMEScorer

        self.settings = settings
        self.scorer = CMEScorer(options=settings.scorer.replace(device=actor_device(settings)))
        self.calls = 0
        self.batches: list[int] = []
        self.batched = BatchedScorer(
            _KeepTokenLogprobs(self.scorer), settings.batch, on_batch=self._count
        )

    def _count(self, stats: BatchStats) -> None:
        self.batches.append(stats.size)

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
        """Score one sample; returns ``CMEResult.to_dict()`` (``cme`` in nats, ``n_tokens``, ...).

        Transient trouble (overload, out of memory) raises, so the caller can retry.
        """
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


class _KeepTokenLogprobs:
    """The scorer, returning per-token log-probs too (multi-turn ``min_k`` needs them)."""

    def __init__(self, scorer: Any) -> None:
        self.inner = scorer
        self.options = scorer.options
        self.verifier_name = scorer.verifier_name

    def encode(self, prompt: Any, response: str) -> Any:
        return self.inner.encode(prompt, response)

    def score(self, prompts: Any, responses: Any, **kwargs: Any) -> Any:
        return self.inner.score(prompts, responses, return_token_logprobs=True, **kwargs)


def actor_device(settings: CMESettings) -> str:
    """The verifier's device: ``auto`` is the GPU Ray reserved for the actor, or CPU when none.

    (Ray leaves ``CUDA_VISIBLE_DEVICES`` alone for an actor without GPUs, so ``auto`` must not
    pick a GPU nobody reserved; ``device=cuda`` with ``num_gpus=0`` does that on purpose.)
    """
    if settings.scorer.device == "auto" and settings.verl.num_gpus == 0:
        return "cpu"
    return settings.scorer.device


def actor_name(settings: CMESettings, node_id: str) -> str:
    """Name of the verifier actor for ``settings`` on node ``node_id``."""
    return f"{ACTOR_PREFIX}_{settings.actor_key()}_{node_id[:16]}"


def get_verifier_actor(settings: CMESettings) -> ray.actor.ActorHandle:
    """The verifier actor of this node, started on first use; waits until its verifier is loaded.

    Raises :class:`CMESettingsError` when it does not start within ``timeout_s`` (no free resources
    for ``num_gpus`` / ``num_cpus`` on this node) or its verifier fails to load.
    """
    node_id = ray.get_runtime_context().get_node_id()
    name = actor_name(settings, node_id)
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
