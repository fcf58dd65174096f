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
    tokenizer, samples=SAMPLES, *, prompt_length: int = 48, response_length: int = 40
) -> tuple[DataProto, list[list[dict]], list[str]]:
    """``(data, messages, response_texts)``: the batch and what a scorer should see per sample.

    ``response_texts[i]`` is the response decoded as a reward manager decodes it (special tokens
    skipped).
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
            "uid": np.array([f"q{i // 3}" for i in range(n)], dtype=object),
            "data_source": np.array(["ultrafeedback"] * n, dtype=object),
        },
    )
    return data, messages, texts


def valid_response_lengths(data: DataProto) -> torch.Tensor:
    """Valid response tokens per sample ``[batch]``, as veRL's ``assemble_rm_scores`` counts them."""
    prompt_length = data.batch["prompts"].size(1)
    return data.batch["attention_mask"][:, prompt_length:].sum(dim=1)
