"""Request and response bodies of the server's endpoints (validation errors answer 422)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, model_validator


class GetRewardRequest(BaseModel):
    """OpenRLHF's ``POST /get_reward`` body: parallel lists, usually of one sample."""

    query: list[str] = Field(
        min_length=1, description="templated prompt + response, special tokens kept"
    )
    prompts: list[str] = Field(description="templated prompts (prefixes of query)")
    labels: list[Any] | None = Field(
        None, description="dataset labels: the raw prompts, in the recipe"
    )

    @model_validator(mode="after")
    def _same_lengths(self) -> GetRewardRequest:
        for name in ("prompts", "labels"):
            values = getattr(self, name)
            if values is not None and len(values) != len(self.query):
                raise ValueError(
                    f"field '{name}' has {len(values)} items but 'query' has {len(self.query)}"
                )
        return self


class ChatMessage(BaseModel):
    """One chat message."""

    role: str
    content: str


class ScoreSample(BaseModel):
    """One native sample: the raw instruction (or messages) and the response text."""

    prompt: str | list[ChatMessage]
    response: str
    id: str | None = None
    group: str | int | None = Field(None, description="samples sharing a group get GRPO advantages")


class ScoreRequest(BaseModel):
    """``POST /score`` body."""

    samples: list[ScoreSample] = Field(min_length=1)

    @model_validator(mode="after")
    def _groups_all_or_none(self) -> ScoreRequest:
        grouped = [s.group is not None for s in self.samples]
        if any(grouped) and not all(grouped):
            raise ValueError("field 'group' must be set on every sample or on none")
        return self


class ScoreResponse(BaseModel):
    """``POST /score`` reply: per sample its ``id`` and the shared result fields, in request order."""

    results: list[dict[str, Any]]
