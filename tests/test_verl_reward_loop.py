"""The ``cme`` manager inside veRL's own reward loop, agent-loop reward call and reward-model router.

One local Ray instance for the module (2 CPUs, no dashboard). veRL's ``RewardLoopManager`` starts
two ``RewardLoopWorker`` actors which build our manager by its registered name ``cme`` (through the
``verl.plugins`` entry point, loaded by ``import verl`` in each worker); they share one verifier
actor holding the real SmolLM2-135M-Instruct verifier and one group board. Batches are real
``DataProto``s built with the SmolLM2 tokenizer as the policy tokenizer; the two-turn tool
conversation is built by veRL's own Continuous Token builder, and its streaming reward call goes
through veRL's own ``AgentLoopWorker._compute_score``. vLLM cannot run here: the served-verifier test
puts veRL's real router (``launch_router_process``) in front of a local server that answers in
vLLM's documented JSON shapes (``wire_servers.py``).
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
import ray
import verl
from hydra import compose, initialize_config_dir
from verl.experimental.agent_loop.agent_loop import (
    AgentLoopMetrics,
    AgentLoopOutput,
    AgentLoopWorker,
)
from verl.experimental.reward_loop import RewardLoopManager, RewardLoopWorker
from verl.experimental.reward_loop.router.naive_router import launch_router_process
from verl_data import (
    ANSWER,
    TOOL_CALL,
    TOOL_PROMPT,
    TOOL_RESULT,
    make_batch,
    padded_single,
    tool_conversation,
    valid_response_lengths,
)
from wire_servers import LogprobModel, ServerThread, vllm_app

from cme_rewards import FLOOR_REWARD, cached_model_dir
from cme_rewards.results import CMEResult, batch_metrics
from cme_rewards.verl import EXTRA_INFO_KEYS
from cme_rewards.verl.verifier_actor import ACTOR_PREFIX

pytestmark = pytest.mark.slow

VERIFIER = "smollm2-135m-instruct"
VERL_CONFIG_DIR = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
VERL_DATA = Path(__file__).resolve().parent / "verl_data.py"
LOCAL = (
    f"++reward.cme.verifier={VERIFIER}",
    "++reward.cme.device=cpu",
    "++reward.cme.dtype=float32",
)
MARGIN = 0.1  # floor_margin's default


def verl_config(*overrides: str):
    """veRL's ``ppo_trainer`` config composed by Hydra, as ``main_ppo`` composes it."""
    policy = str(cached_model_dir(VERIFIER))
    with initialize_config_dir(config_dir=VERL_CONFIG_DIR, version_base=None):
        return compose(
            config_name="ppo_trainer",
            overrides=[
                f"actor_rollout_ref.model.path={policy}",
                "reward.reward_manager.name=cme",
                *overrides,
            ],
        )


@pytest.fixture(scope="module")
def metrics_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("verl_file_logger")


@pytest.fixture(scope="module")
def ray_session(metrics_root):
    env = {"VERL_FILE_LOGGER_ROOT": str(metrics_root)}  # where veRL's file logger writes
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True, runtime_env={"env_vars": env})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def loop(ray_session):
    """veRL's RewardLoopManager with two workers, GRPO groups of 4, 2 prompts per step."""
    config = verl_config(
        "reward.num_workers=2",
        "actor_rollout_ref.rollout.n=4",
        "data.train_batch_size=2",
        "trainer.project_name=cme_tests",
        "trainer.experiment_name=loop",
        *LOCAL,
        "++reward.cme.max_wait_ms=1000",  # lets both workers' calls meet in one batch
        "++reward.cme.metrics_logger=[console,file]",
    )
    return RewardLoopManager(config)


def test_reward_loop_scores_with_cme_and_the_group_floor(loop, smollm_scorer, metrics_root):
    data, messages, texts = make_batch(smollm_scorer.tokenizer, group=4, step=1)
    out = loop.compute_rm_score(data)

    want = smollm_scorer.score(messages, texts)
    rm = out.batch["rm_scores"]
    assert rm.shape == data.batch["responses"].shape
    last = valid_response_lengths(data) - 1
    # The policy emitted only EOS for sample 5 (group q1: samples 4-7): just below the group's worst.
    assert want[5].error == "empty response"
    floor = min(want[i].cme for i in (4, 6, 7)) - MARGIN
    assert floor > FLOOR_REWARD + 10  # not the fixed floor: GRPO's std of q1 stays sane
    for i, w in enumerate(want):
        value = floor if i == 5 else w.cme
        assert rm[i, last[i]].item() == pytest.approx(value, abs=1e-4)  # at the last valid token
        assert rm[i].count_nonzero().item() == 1
    assert out.meta_info["reward_extra_keys"] == list(EXTRA_INFO_KEYS)
    cme = out.non_tensor_batch["cme"].tolist()
    assert cme == pytest.approx([floor if i == 5 else w.cme for i, w in enumerate(want)], abs=1e-4)
    assert out.non_tensor_batch["n_tokens"].tolist() == [w.n_tokens for w in want]
    assert out.non_tensor_batch["error"].tolist() == [w.error or "" for w in want]

    # One verifier actor for the node, shared by both workers, which batched their calls together.
    names = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(ACTOR_PREFIX)
    ]
    assert len(names) == 1
    info = ray.get(ray.get_actor(names[0]).info.remote())
    assert info["device"] == "cpu" and info["calls"] == len(data)
    assert sum(info["batch_sizes"]) == len(data) and max(info["batch_sizes"]) > 1

    # The step's cme/* metrics, written through veRL's own Tracking file logger.
    lines = (metrics_root / "cme_tests" / "loop-cme.jsonl").read_text().splitlines()
    logged = json.loads(lines[0])
    assert len(lines) == 1 and logged["step"] == 1
    expected = batch_metrics([CMEResult(w.cme, w.n_tokens, w.truncated, w.error) for w in want])
    assert set(logged["data"]) == set(expected) and "cme/floored_frac" in expected
    assert logged["data"] == pytest.approx(expected, abs=1e-4)
    assert logged["data"]["cme/floored_frac"] == pytest.approx(1 / 8)


def multi_turn_expected(scorer):
    """The verifier's view of the tool conversation: each assistant turn after what came before."""
    first, second = scorer.score(
        [
            TOOL_PROMPT,
            [
                *TOOL_PROMPT,
                {"role": "assistant", "content": TOOL_CALL},
                {"role": "tool", "content": TOOL_RESULT},
            ],
        ],
        [TOOL_CALL, ANSWER],
    )
    n = first.n_tokens + second.n_tokens
    return (first.cme * first.n_tokens + second.cme * second.n_tokens) / n, n


def test_multi_turn_scores_only_the_assistant_turns_with_verls_mask(loop, smollm_scorer):
    """Colocated path: the batch carries veRL's response_mask (0 on the tool observation)."""
    tok = smollm_scorer.tokenizer
    prompt_ids, response_ids, mask = tool_conversation(tok)
    data = padded_single(tok, prompt_ids, response_ids, mask, raw_prompt=TOOL_PROMPT, uid="tool-a")
    out = loop.compute_rm_score(data)
    cme, n = multi_turn_expected(smollm_scorer)
    whole = smollm_scorer.score(
        [TOOL_PROMPT], [tok.decode(response_ids, skip_special_tokens=True)]
    )[0]
    assert out.non_tensor_batch["cme"][0] == pytest.approx(cme, abs=1e-4)
    assert (
        out.non_tensor_batch["n_tokens"][0] == n < whole.n_tokens
    )  # the observation is not scored
    assert abs(whole.cme - cme) > 0.05


@pytest.fixture(scope="module")
def combined_worker(ray_session):
    """One of veRL's RewardLoopWorker actors, CME combined with two rules and a custom function."""
    config = verl_config(
        "data.max_response_length=64",
        *LOCAL,
        f"++reward.cme.combine_with=[compute_score,0.1*length_penalty,0.5*{VERL_DATA}:answer_words]",
        "++reward.cme.cme_weight=2.0",
    )
    return ray.remote(RewardLoopWorker).options(name="cme_test_combined").remote(config, None)


def test_agent_loop_reward_call_rebuilds_the_mask_and_combines_rewards(
    combined_worker, smollm_scorer
):
    """Streaming path: veRL's own AgentLoopWorker._compute_score sends one unpadded sample without
    response_mask; the assistant turns are found from the chat template. The reward is
    2 * cme + gsm8k correctness + 0.1 * length penalty + 0.5 * words, each logged by name."""
    tok = smollm_scorer.tokenizer
    prompt_ids, response_ids, mask = tool_conversation(tok)
    output = AgentLoopOutput(
        prompt_ids=prompt_ids,
        response_ids=response_ids,
        response_mask=mask,
        num_turns=4,  # ToolAgentLoop: user_turns + assistant_turns + 1
        metrics=AgentLoopMetrics(),
    )
    worker = object.__new__(AgentLoopWorker)  # only what _compute_score reads
    worker.reward_loop_worker_handles = [combined_worker]
    worker.processor, worker.tokenizer, worker.mm_processor_kwargs = None, tok, {}
    kwargs = {
        "raw_prompt": TOOL_PROMPT,
        "uid": "tool-b",
        "data_source": "openai/gsm8k",  # veRL's default_compute_score: gsm8k's rule
        "reward_model": {"ground_truth": "5"},
    }
    asyncio.run(AgentLoopWorker._compute_score(worker, [output], kwargs=kwargs))

    info = output.extra_fields["reward_extra_info"]
    cme, n = multi_turn_expected(smollm_scorer)
    words = len(tok.decode(response_ids, skip_special_tokens=True).split())
    assert list(info) == [*EXTRA_INFO_KEYS, "compute_score", "length_penalty", "answer_words"]
    assert info["cme"] == pytest.approx(cme, abs=1e-4) and info["n_tokens"] == n
    assert info["compute_score"] == 1.0  # "#### 5" matches the ground truth
    assert info["length_penalty"] == pytest.approx(-len(response_ids) / 64)
    assert info["answer_words"] == words
    total = 2.0 * cme + 1.0 + 0.1 * info["length_penalty"] + 0.5 * words
    assert output.reward_score == pytest.approx(total, abs=2e-4)


@pytest.fixture(scope="module")
def rejecting_server(smollm_scorer):
    """A vLLM-shaped server that rejects (400) any request holding the first token of "banana"."""
    _, messages, texts = make_batch(smollm_scorer.tokenizer)
    inputs = [smollm_scorer.encode(m, t) for m, t in zip(messages[:4], texts[:4], strict=True)]
    ban = inputs[2].input_ids[inputs[2].n_prompt]
    assert smollm_scorer.tokenizer.decode([ban]) == "ban"
    assert all(ban not in x.input_ids for i, x in enumerate(inputs) if i != 2)
    lm = LogprobModel(smollm_scorer.model, smollm_scorer.tokenizer)
    with ServerThread(vllm_app(lm, "/models/smollm2", reject_ids=(ban,))) as server:
        yield server


def test_served_verifier_behind_verls_router_floors_a_rejected_sample(
    ray_session, smollm_scorer, rejecting_server
):
    """veRL's router turns the server's 400 for one sample into a 500 without its message. The
    sample gets the group floor with the error; the run goes on; the other samples score."""
    address, router = launch_router_process(worker_urls=[rejecting_server.url])
    try:
        config = verl_config(
            "actor_rollout_ref.rollout.n=4",
            "reward.reward_model.enable=true",
            f"reward.reward_model.model_path={cached_model_dir(VERIFIER)}",
            "reward.custom_reward_function.path=pkg://cme_rewards.verl",
            "reward.custom_reward_function.name=route_to_cme",
            "++reward.cme.backend=vllm",
            "++reward.cme.max_retries=2",
        )
        worker = (
            ray.remote(RewardLoopWorker).options(name="cme_test_router").remote(config, address)
        )
        data, messages, texts = make_batch(smollm_scorer.tokenizer, group=4)
        outs = ray.get(worker.compute_score_batch.remote(data[:4]))  # group q0
    finally:
        router.terminate()
    assert texts[2].startswith("banana") and all("banana" not in t for t in texts[:2] + texts[3:4])
    want = smollm_scorer.score(messages[:4], texts[:4])
    errors = [o["reward_extra_info"]["error"] for o in outs]
    assert errors[2].startswith("vllm answered HTTP 500: Internal Server Error on 2 tries")
    assert errors[:2] + errors[3:] == ["", "", ""]
    floor = min(want[i].cme for i in (0, 1, 3)) - MARGIN
    scores = [o["reward_score"] for o in outs]
    assert scores == pytest.approx([want[0].cme, want[1].cme, floor, want[3].cme], abs=1e-4)


def test_bad_setting_names_the_key(ray_session, smollm_scorer):
    """A misspelt key stops veRL's reward worker with a message naming it (before any step)."""
    config = verl_config(*LOCAL, "++reward.cme.max_lenght=512")
    worker = ray.remote(RewardLoopWorker).options(name="cme_test_bad").remote(config, None)
    data, _, _ = make_batch(smollm_scorer.tokenizer)
    with pytest.raises(
        ray.exceptions.RayActorError, match=r"reward\.cme\.max_lenght: unknown option"
    ):
        ray.get(worker.compute_score_batch.remote(data[:1]))
