"""Builds veRL ``DataProto`` batches the way veRL's agent loop hands them to reward managers.

Prompts are the policy's chat-templated ids, left-padded to ``prompt_length``; responses are the
policy's ids (ending in its EOS), right-padded to ``response_length``; ``attention_mask`` covers both;
``raw_prompt`` holds the chat messages (as veRL's ``RLHFDataset`` provides them) and ``uid`` the
prompt's group id.
"""

from __future__ import annotations

import numpy as np
import torch
from verl import DataProto

SAMPLES = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is the capital of France?", "Paris is the capital city of France, on the Seine."),
    ("What is the capital of France?", "banana seventeen purple the of of"),
    ("Name a primary colour.", "Red is a primary colour."),
    ("Name a primary colour.", "Blue."),
    ("Name a primary colour.", ""),  # the policy emitted EOS at once: floor reward
    (
        "Write a haiku about rain.",
        "Soft rain on the roof,\nthe garden drinks quietly,\nclouds walk to the sea.",
    ),
    ("Write a haiku about rain.", "Rain rain rain rain rain rain rain rain rain."),
]


def make_batch(
    tokenizer,
    samples=SAMPLES,
    *,
    prompt_length: int = 48,
    response_length: int = 40,
    group: int = 3,
    step: int | None = None,
) -> tuple[DataProto, list[list[dict]], list[str]]:
    """``(data, messages, response_texts)``: the batch and what a scorer should see per sample.

    ``response_texts[i]`` is the response decoded as a reward manager decodes it (special tokens
    skipped). Samples ``i`` share the uid ``q{i // group}``; ``step`` adds ``global_steps`` as veRL's
    v1 agent loop passes it with every sample.
    """
    n = len(samples)
    pad = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )  # as veRL's hf_tokenizer
    prompts = torch.full((n, prompt_length), pad, dtype=torch.long)
    responses = torch.full((n, response_length), pad, dtype=torch.long)
    mask = torch.zeros((n, prompt_length + response_length), dtype=torch.long)
    raw_prompt = np.empty(n, dtype=object)
    messages, texts = [], []
    for i, (question, answer) in enumerate(samples):
        chat = [{"role": "user", "content": question}]
        p_ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
        p_ids = list(p_ids["input_ids"] if hasattr(p_ids, "keys") else p_ids)
        r_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert len(p_ids) <= prompt_length and len(r_ids) <= response_length, (
            len(p_ids),
            len(r_ids),
        )
        prompts[i, prompt_length - len(p_ids) :] = torch.tensor(p_ids)
        responses[i, : len(r_ids)] = torch.tensor(r_ids)
        mask[i, prompt_length - len(p_ids) : prompt_length + len(r_ids)] = 1
        raw_prompt[i] = chat
        messages.append(chat)
        texts.append(tokenizer.decode(r_ids, skip_special_tokens=True))
    data = DataProto.from_dict(
        tensors={
            "prompts": prompts,
            "responses": responses,
            "input_ids": torch.cat([prompts, responses], dim=1),
            "attention_mask": mask,
        },
        non_tensors={
            "raw_prompt": raw_prompt,
            "uid": np.array([f"q{i // group}" for i in range(n)], dtype=object),
            "data_source": np.array(["ultrafeedback"] * n, dtype=object),
            **({} if step is None else {"global_steps": np.array([step] * n, dtype=object)}),
        },
    )
    return data, messages, texts


def valid_response_lengths(data: DataProto) -> torch.Tensor:
    """Valid response tokens per sample ``[batch]``, as veRL's ``assemble_rm_scores`` counts them."""
    prompt_length = data.batch["prompts"].size(1)
    return data.batch["attention_mask"][:, prompt_length:].sum(dim=1)


TOOL_PROMPT = [{"role": "user", "content": "What is 2 + 3? Use the calculator."}]
TOOL_CALL = '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'
TOOL_RESULT = "5"
ANSWER = "The calculator says 2 + 3 = 5.\n#### 5"  # gsm8k's answer format


def tool_conversation(tokenizer) -> tuple[list[int], list[int], list[int]]:
    """``(prompt_ids, response_ids, response_mask)`` of a two-turn tool conversation, built by
    veRL's own Continuous Token builder exactly as its ``ToolAgentLoop`` builds them: the
    assistant calls a tool, the tool answers, the assistant answers (mask 0 on the observation)."""
    from verl.utils.tokenizer.continuous_token_wiring import create_continuous_token_builder

    builder = create_continuous_token_builder(
        tokenizer,
        hf_model_type="llama",
        chat_template_kwargs={},
        mm_processor_kwargs={},
        processor=None,
    )
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    prompt_ids = builder.build_initial_tokens(TOOL_PROMPT)
    runtime, mask = list(prompt_ids), []
    first = tokenizer(TOOL_CALL, add_special_tokens=False)["input_ids"] + [end]
    merged = builder.merge_assistant_tokens(runtime, first)
    mask, _ = builder.align_response_metadata(merged, mask, None)
    before = [*TOOL_PROMPT, {"role": "assistant", "content": TOOL_CALL}]
    after = [*before, {"role": "tool", "content": TOOL_RESULT}]
    merged = builder.merge_context_tokens(before, after, merged.token_ids)
    mask, _ = builder.align_response_metadata(merged, mask, None)
    second = tokenizer(ANSWER, add_special_tokens=False)["input_ids"] + [end]
    merged = builder.merge_assistant_tokens(merged.token_ids, second)
    mask, _ = builder.align_response_metadata(merged, mask, None)
    response = merged.token_ids[len(prompt_ids) :]
    assert len(response) == len(mask) and 0 in mask
    return list(prompt_ids), response, list(mask)


def padded_single(
    tokenizer,
    prompt_ids,
    response_ids,
    response_mask,
    *,
    prompt_length=64,
    response_length=64,
    **nt,
) -> DataProto:
    """One sample as veRL's agent loop ``_postprocess`` pads it (``response_mask`` included)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts = torch.full((1, prompt_length), pad, dtype=torch.long)
    responses = torch.full((1, response_length), pad, dtype=torch.long)
    rmask = torch.zeros((1, response_length), dtype=torch.long)
    mask = torch.zeros((1, prompt_length + response_length), dtype=torch.long)
    prompts[0, prompt_length - len(prompt_ids) :] = torch.tensor(prompt_ids)
    responses[0, : len(response_ids)] = torch.tensor(response_ids)
    rmask[0, : len(response_mask)] = torch.tensor(response_mask)
    mask[0, prompt_length - len(prompt_ids) : prompt_length + len(response_ids)] = 1
    return DataProto.from_dict(
        tensors={
            "prompts": prompts,
            "responses": responses,
            "response_mask": rmask,
            "input_ids": torch.cat([prompts, responses], dim=1),
            "attention_mask": mask,
        },
        non_tensors={k: _one(v) for k, v in nt.items()},
    )


def _one(value) -> np.ndarray:
    out = np.empty(1, dtype=object)
    out[0] = value
    return out


def answer_words(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> dict:
    """A custom reward with veRL's ``compute_score`` signature: words in the response."""
    return {"score": float(len(solution_str.split())), "note": "a dict's other keys are ignored"}
