"""Real HTTP servers on 127.0.0.1 that answer in vLLM's and SGLang's documented JSON shapes.

Neither vLLM nor SGLang runs on this CPU machine, so these FastAPI apps stand in for them: they
take token ids, run a real causal LM forward pass, and answer exactly as the servers document:

- vLLM's OpenAI-compatible server: ``GET /v1/models`` (``{"object": "list", "data": [{"id",
  "max_model_len", ...}]}``), ``POST /tokenize`` (``{"model", "prompt", "add_special_tokens"}`` ->
  ``{"count", "max_model_len", "tokens", "token_strs"}``) and ``POST /v1/completions`` with
  ``prompt_logprobs``: ``choices[0].prompt_logprobs`` is a list with ``null`` for the first prompt
  token, then ``{"<token id>": {"logprob", "rank", "decoded_token"}}`` per token, a ``-inf``
  log-prob clamped to ``-9999.0`` as vLLM's serving layer does (``max(logprob, -9999.0)``). A prompt
  longer than ``max_model_len`` gets HTTP 400, as vLLM answers it; so does a prompt holding one of
  ``reject_ids`` (standing in for any request vLLM rejects, e.g. an out-of-vocabulary id).
- SGLang's native API: ``GET /get_model_info`` and ``POST /generate`` (``input_ids`` or ``text``,
  which SGLang tokenizes with special tokens) with ``return_logprob`` and ``logprob_start_len``:
  ``meta_info.input_token_logprobs`` is a list of ``[logprob, token_id, text]`` aligned with
  ``input_ids[logprob_start_len:]`` whose first logprob is ``null``; ids at or above
  ``vocab_size - 1`` are reported as ``0`` and a ``-inf`` log-prob as ``null`` (SGLang's JSON), as
  SGLang does.

``neg_inf_ids``: token ids the model gives probability zero (log-prob ``-inf``), standing in for a
model with a masked vocabulary entry.
"""

from __future__ import annotations

import math
import socket
import threading
import time
import uuid

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse


class LogprobModel:
    """Per-token log-probs of a token sequence under a causal LM (float32 log-softmax)."""

    def __init__(self, model, tokenizer, neg_inf_ids: tuple[int, ...] = ()) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.neg_inf_ids = list(neg_inf_ids)
        self.lock = threading.Lock()

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    def forward(self, ids: list[int]) -> tuple[list[float | None], list[int], int]:
        """``(logprobs, ranks, next_token)``: ``logprobs[0]`` is ``None``; ``ranks`` are 1-based."""
        with self.lock, torch.inference_mode():
            logits = self.model(input_ids=torch.tensor([ids])).logits[0].float()
            if self.neg_inf_ids:
                logits[:, self.neg_inf_ids] = -math.inf
            logp = torch.log_softmax(logits, dim=-1)
        targets = torch.tensor(ids[1:])
        chosen = logp[:-1].gather(1, targets[:, None])[:, 0]
        ranks = (logp[:-1] > chosen[:, None]).sum(dim=1) + 1
        return [None, *chosen.tolist()], [0, *ranks.tolist()], int(logp[-1].argmax())


VLLM_LOGPROB_FLOOR = -9999.0  # vLLM's serving layer: max(logprob, -9999.0), JSON has no -inf


def vllm_app(
    lm: LogprobModel,
    model_name: str,
    *,
    max_model_len: int = 2048,
    fail_first: int = 0,
    reject_ids: tuple[int, ...] = (),
    tokenizer=None,
) -> FastAPI:
    """vLLM-shaped server; its first ``fail_first`` completion requests answer 503 (overloaded).

    ``tokenizer`` (default: the model's) is what ``/tokenize`` uses.
    """
    app = FastAPI()
    state = {"failures_left": fail_first, "requests": 0}
    app.state.counters = state
    tok = tokenizer or lm.tokenizer

    def error(message: str, kind: str, code: int) -> JSONResponse:
        return JSONResponse(
            {"object": "error", "message": message, "type": kind, "code": code}, status_code=code
        )

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await request.json()
        if body.get("model") not in (None, model_name):
            return error(f"The model `{body.get('model')}` does not exist.", "NotFoundError", 404)
        add = body.get("add_special_tokens", True)
        ids = tok(body["prompt"], add_special_tokens=add)["input_ids"]
        return {
            "count": len(ids),
            "max_model_len": max_model_len,
            "tokens": ids,
            "token_strs": None,
        }

    @app.get("/v1/models")
    def models() -> dict:
        return {
            "object": "list",
            "data": [
                {
                    "id": model_name,
                    "object": "model",
                    "created": int(time.time()),
                    "owned_by": "vllm",
                    "root": model_name,
                    "parent": None,
                    "max_model_len": max_model_len,
                }
            ],
        }

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        state["requests"] += 1
        if state["failures_left"] > 0:
            state["failures_left"] -= 1
            return JSONResponse(
                {
                    "object": "error",
                    "message": "server overloaded",
                    "type": "ServiceUnavailable",
                    "code": 503,
                },
                status_code=503,
            )
        if body.get("model") != model_name:
            return JSONResponse(
                {
                    "object": "error",
                    "message": f"The model `{body.get('model')}` does not exist.",
                    "type": "NotFoundError",
                    "code": 404,
                },
                status_code=404,
            )
        ids = body["prompt"]
        if any(i in reject_ids for i in ids):
            bad = next(i for i in ids if i in reject_ids)
            return error(f"Token id {bad} is out of vocabulary", "BadRequestError", 400)
        if len(ids) + body.get("max_tokens", 16) > max_model_len:
            message = (
                f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                f"{len(ids) + body.get('max_tokens', 16)} tokens."
            )
            return JSONResponse(
                {"object": "error", "message": message, "type": "BadRequestError", "code": 400},
                status_code=400,
            )
        logprobs, ranks, nxt = lm.forward(ids)
        prompt_logprobs = [None] + [
            {
                str(t): {
                    "logprob": max(lp, VLLM_LOGPROB_FLOOR),
                    "rank": r,
                    "decoded_token": lm.tokenizer.decode([t]),
                }
            }
            for t, lp, r in zip(ids[1:], logprobs[1:], ranks[1:], strict=True)
        ]
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": [
                {
                    "index": 0,
                    "text": lm.tokenizer.decode([nxt]),
                    "logprobs": None,
                    "finish_reason": "length",
                    "stop_reason": None,
                    "prompt_logprobs": prompt_logprobs,
                }
            ],
            "usage": {
                "prompt_tokens": len(ids),
                "total_tokens": len(ids) + 1,
                "completion_tokens": 1,
            },
        }

    return app


def sglang_app(lm: LogprobModel, model_path: str) -> FastAPI:
    """SGLang-shaped server (native ``/generate``)."""
    app = FastAPI()

    @app.get("/get_model_info")
    def model_info() -> dict:
        return {"model_path": model_path, "tokenizer_path": model_path, "is_generation": True}

    def shown(token_id: int) -> int:  # SGLang: "Clip the padded hash values from image tokens"
        return token_id if token_id < lm.vocab_size - 1 else 0

    def json_float(x: float | None) -> float | None:  # SGLang's JSON writes -inf / NaN as null
        return None if x is None or not math.isfinite(x) else x

    @app.post("/generate")
    async def generate(request: Request):
        body = await request.json()
        ids = body["input_ids"] if "input_ids" in body else lm.tokenizer(body["text"])["input_ids"]
        start = body.get("logprob_start_len", -1)
        logprobs, _ranks, nxt = lm.forward(ids)
        meta = {
            "id": uuid.uuid4().hex,
            "finish_reason": {"type": "length", "length": 1},
            "prompt_tokens": len(ids),
            "completion_tokens": 1,
            "cached_tokens": 0,
            "e2e_latency": 0.01,
        }
        if body.get("return_logprob"):
            with torch.inference_mode():
                out_lp = torch.log_softmax(
                    lm.model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1
                )[nxt]
            # SGLang: entries for input_ids[start:], the first one always null.
            meta["input_token_logprobs"] = (
                [[None, shown(ids[start]), None]]
                + [
                    [json_float(logprobs[i]), shown(ids[i]), None]
                    for i in range(start + 1, len(ids))
                ]
                if start >= 0
                else []
            )
            meta["output_token_logprobs"] = [[float(out_lp), nxt, None]]
        return {"text": lm.tokenizer.decode([nxt]), "output_ids": [nxt], "meta_info": meta}

    return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """Runs a FastAPI app with uvicorn on 127.0.0.1 in a background thread (context manager)."""

    def __init__(self, app: FastAPI) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
