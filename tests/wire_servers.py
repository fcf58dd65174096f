"""Real HTTP servers on 127.0.0.1 that answer in vLLM's and SGLang's documented JSON shapes.

Neither vLLM nor SGLang runs on this CPU machine, so these FastAPI apps stand in for them: they
take token ids, run a real causal LM forward pass, and answer exactly as the servers document:

- vLLM's OpenAI-compatible server: ``GET /v1/models`` (``{"object": "list", "data": [{"id", ...}]}``)
  and ``POST /v1/completions`` with ``prompt_logprobs``: ``choices[0].prompt_logprobs`` is a list
  with ``null`` for the first prompt token, then ``{"<token id>": {"logprob", "rank",
  "decoded_token"}}`` per token. A prompt longer than ``max_model_len`` gets HTTP 400, as vLLM
  answers it.
- SGLang's native API: ``GET /get_model_info`` and ``POST /generate`` with ``return_logprob`` and
  ``logprob_start_len``: ``meta_info.input_token_logprobs`` is a list of ``[logprob, token_id,
  text]`` aligned with ``input_ids[logprob_start_len:]`` whose first logprob is ``null``.
"""

from __future__ import annotations

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

    def __init__(self, model, tokenizer) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.lock = threading.Lock()

    def forward(self, ids: list[int]) -> tuple[list[float | None], list[int], int]:
        """``(logprobs, ranks, next_token)``: ``logprobs[0]`` is ``None``; ``ranks`` are 1-based."""
        with self.lock, torch.inference_mode():
            logits = self.model(input_ids=torch.tensor([ids])).logits[0].float()
        logp = torch.log_softmax(logits, dim=-1)
        targets = torch.tensor(ids[1:])
        chosen = logp[:-1].gather(1, targets[:, None])[:, 0]
        ranks = (logp[:-1] > chosen[:, None]).sum(dim=1) + 1
        return [None, *chosen.tolist()], [0, *ranks.tolist()], int(logp[-1].argmax())


def vllm_app(
    lm: LogprobModel, model_name: str, *, max_model_len: int = 2048, fail_first: int = 0
) -> FastAPI:
    """vLLM-shaped server; its first ``fail_first`` completion requests answer 503 (overloaded)."""
    app = FastAPI()
    state = {"failures_left": fail_first, "requests": 0}
    app.state.counters = state

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
            {str(t): {"logprob": lp, "rank": r, "decoded_token": lm.tokenizer.decode([t])}}
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

    @app.post("/generate")
    async def generate(request: Request):
        body = await request.json()
        ids = body["input_ids"]
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
                [[None, ids[start], None]]
                + [[logprobs[i], ids[i], None] for i in range(start + 1, len(ids))]
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
