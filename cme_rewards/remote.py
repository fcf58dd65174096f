"""Remote verifiers: CME from an inference server's prompt log-probs (vLLM or SGLang wire format).

The verifier's token ids are built here, exactly as :class:`cme_rewards.CMEScorer` builds them
(:func:`cme_rewards.formatting.build_verifier_input` with the verifier's tokenizer), sent to the
server as token ids, and the log-probs it returns for the response positions are reduced with
:func:`cme_rewards.reductions.reduce_token_logprobs`. So a remote verifier gives the same value as a
local one, up to the server's numerics.

Wire formats:

- **vLLM** (``backend="vllm"``): ``POST {url}/v1/completions`` with ``{"model", "prompt": [ids],
  "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0}``; the answer's
  ``choices[0].prompt_logprobs`` holds one entry per prompt token: ``null`` for the first, then a
  dict keyed by the token id (as a string) of ``{"logprob", "rank", "decoded_token"}``. Start-up
  check: ``GET {url}/v1/models`` (it also names the model when none is given).
- **SGLang** (``backend="sglang"``): ``POST {url}/generate`` with ``{"input_ids": [ids],
  "sampling_params": {"max_new_tokens": 1, "temperature": 0}, "return_logprob": true,
  "logprob_start_len": n_prompt - 1}``; the answer's ``meta_info.input_token_logprobs`` is a list of
  ``[logprob, token_id, text]`` aligned with ``input_ids[logprob_start_len:]`` whose first logprob
  is always ``null``. Start-up check: ``GET {url}/get_model_info`` (``is_generation`` must be true).

Failures: connection errors, timeouts and 5xx answers are retried with exponential backoff; when
``max_retries`` tries all fail, :class:`RemoteVerifierUnavailable` is raised (the verifier is down:
not a property of one sample). A 4xx answer or a malformed answer for one sample, or a sample that
can never be scored (empty response), gives the floor reward with ``error`` set.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Sequence
from typing import Any

import aiohttp
from transformers import AutoTokenizer
from transformers import PreTrainedTokenizerBase as Tokenizer

from cme_rewards.formatting import Prompt, VerifierInput, build_verifier_input
from cme_rewards.models import RANDOM_PREFIX, resolve_verifier
from cme_rewards.reductions import REDUCTIONS, reduce_token_logprobs
from cme_rewards.results import FLOOR_REWARD, CMEResult

logger = logging.getLogger(__name__)

BACKENDS = ("vllm", "sglang")


class RemoteConfigError(ValueError):
    """A setting of a remote verifier is wrong; ``option`` names it (``url``, ``model``, ...)."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"{option}: {message}")
        self.option = option


class RemoteVerifierUnavailable(RuntimeError):
    """The server did not answer after every retry (connection refused, timeouts, 5xx)."""


class _SampleError(Exception):
    """The server's answer for one sample is unusable (4xx, malformed): that sample gets the floor."""


def load_verifier_tokenizer(name: str) -> Tokenizer:
    """The tokenizer of a verifier named as SPEC.md says, without loading its weights."""
    base = name[len(RANDOM_PREFIX) :] if name.startswith(RANDOM_PREFIX) else name
    return AutoTokenizer.from_pretrained(resolve_verifier(base))


class RemoteVerifier:
    """Scores (prompt, response) pairs with a verifier served over HTTP; see the module docstring.

    Args:
        url: the server's base URL, e.g. ``http://10.0.0.5:8000`` (``http://`` is added when
            missing, so veRL's ``reward_router_address`` ``host:port`` works as it is).
        tokenizer: the verifier's tokenizer (it must be the served model's).
        model: vLLM's ``model`` request field; ``None`` takes the first model ``/v1/models`` lists.
        max_length, reduction, min_tokens, floor, score_eos, prompt_template, chat_template:
            as in :class:`cme_rewards.CMEScorer`.
        timeout_s: per-request timeout (seconds).
        max_retries: tries per request before :class:`RemoteVerifierUnavailable`.
        backoff_s: first retry delay (seconds), doubled each try, at most 30 s.
    """

    backend: str = ""

    def __init__(
        self,
        url: str,
        tokenizer: Tokenizer,
        *,
        model: str | None = None,
        max_length: int = 2048,
        reduction: str = "mean",
        min_tokens: int = 1,
        floor: float = FLOOR_REWARD,
        score_eos: bool = False,
        prompt_template: str | None = None,
        chat_template: str | None = None,
        timeout_s: float = 300.0,
        max_retries: int = 5,
        backoff_s: float = 1.0,
    ) -> None:
        if not url:
            raise RemoteConfigError("url", "a server URL is required")
        if reduction not in REDUCTIONS:
            raise RemoteConfigError("reduction", f"must be one of {REDUCTIONS}, got {reduction!r}")
        if max_length < 2:
            raise RemoteConfigError("max_length", f"must be at least 2, got {max_length}")
        if not math.isfinite(floor):
            raise RemoteConfigError("floor", f"must be a finite number, got {floor}")
        if max_retries < 1 or timeout_s <= 0:
            raise RemoteConfigError("max_retries", "max_retries must be >= 1 and timeout_s > 0")
        self.url = (url if "://" in url else f"http://{url}").rstrip("/")
        self.tokenizer = tokenizer
        self.model = model
        self.max_length = max_length
        self.reduction = reduction
        self.min_tokens = min_tokens
        self.floor = float(floor)
        self.score_eos = score_eos
        self.prompt_template = prompt_template
        self.chat_template = chat_template
        self.timeout_s = float(timeout_s)
        self.max_retries = int(max_retries)
        self.backoff_s = float(backoff_s)
        self._session: aiohttp.ClientSession | None = None
        self._session_loop: asyncio.AbstractEventLoop | None = None

    # -- public ----------------------------------------------------------------------------------

    def encode(self, prompt: Prompt, response: str) -> VerifierInput:
        """The verifier's ids and scored positions for one sample (same as ``CMEScorer.encode``)."""
        return build_verifier_input(
            self.tokenizer,
            prompt,
            response,
            max_length=self.max_length,
            prompt_template=self.prompt_template,
            chat_template=self.chat_template,
            score_eos=self.score_eos,
        )

    async def check(self) -> None:
        """Start-up check: the server answers and serves a generative model.

        Raises :class:`RemoteConfigError` naming ``url`` (unreachable, wrong kind of server) or
        ``model`` (not served). Tries once per ``backoff_s`` for ``max_retries`` tries.
        """
        try:
            await self._check()
        except RemoteVerifierUnavailable as exc:
            raise RemoteConfigError(
                "url", f"no {self.backend} server answers at {self.url} ({exc})"
            ) from exc
        except _SampleError as exc:
            raise RemoteConfigError(
                "url", f"{self.url} is not a {self.backend} server: {exc}"
            ) from exc

    async def score(self, prompt: Prompt, response: str, *, id: str | None = None) -> CMEResult:
        """CME of one response (nats); floor with ``error`` for a sample that cannot be scored."""
        inp = self.encode(prompt, response)
        if inp.error is not None:
            return self._floor(inp, inp.error, id)
        try:
            logprobs = await self._response_logprobs(inp)
        except _SampleError as exc:
            return self._floor(inp, str(exc)[:300], id)
        value, error = reduce_token_logprobs(
            logprobs, reduction=self.reduction, min_tokens=self.min_tokens, floor=self.floor
        )
        if error is not None:
            logger.warning("sample %s: %s; reward set to the floor %s", id, error, self.floor)
        return CMEResult(
            cme=value, n_tokens=inp.n_scored, truncated=inp.truncated, error=error, id=id
        )

    async def score_many(
        self,
        prompts: Sequence[Prompt],
        responses: Sequence[str],
        *,
        ids: Sequence[str] | None = None,
    ) -> list[CMEResult]:
        """Score many samples concurrently (one request each; the server batches them)."""
        if len(prompts) != len(responses):
            raise ValueError(f"responses: {len(responses)} entries for {len(prompts)} prompts")
        return list(
            await asyncio.gather(
                *(
                    self.score(p, r, id=None if ids is None else ids[i])
                    for i, (p, r) in enumerate(zip(prompts, responses, strict=True))
                )
            )
        )

    async def aclose(self) -> None:
        """Close the HTTP session (if one is open on the running loop)."""
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    # -- wire format (subclasses) ----------------------------------------------------------------

    async def _check(self) -> None:
        raise NotImplementedError

    async def _response_logprobs(self, inp: VerifierInput) -> list[float]:
        """Log-probs (nats) of ``inp.input_ids[inp.n_prompt:]``, ``[n_scored]``."""
        raise NotImplementedError

    # -- HTTP ------------------------------------------------------------------------------------

    def _floor(self, inp: VerifierInput, error: str, id: str | None) -> CMEResult:
        logger.warning("sample %s: %s; reward set to the floor %s", id, error, self.floor)
        return CMEResult(cme=self.floor, n_tokens=0, truncated=inp.truncated, error=error, id=id)

    def _client(self) -> aiohttp.ClientSession:
        """A session on the running event loop (a session cannot move between loops)."""
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._session_loop is not loop:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout_s)
            )
            self._session_loop = loop
        return self._session

    async def _request(self, method: str, path: str, payload: dict | None = None) -> Any:
        """JSON answer of ``method {url}{path}``; retries transient trouble (see module docstring)."""
        url = f"{self.url}{path}"
        last: BaseException | None = None
        for attempt in range(self.max_retries):
            try:
                async with self._client().request(method, url, json=payload) as resp:
                    if resp.status >= 500:
                        last = RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:200]}")
                    elif resp.status >= 400:
                        raise _SampleError(
                            f"{self.backend} HTTP {resp.status}: {(await resp.text())[:200]}"
                        )
                    else:
                        return await resp.json(content_type=None)
            except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
                last = exc
            except aiohttp.ContentTypeError as exc:
                raise _SampleError(f"{self.backend} answer is not JSON: {exc}") from exc
            if attempt + 1 < self.max_retries:
                delay = min(self.backoff_s * 2**attempt, 30.0)
                logger.warning(
                    "%s %s failed (%s); retry %d in %.1f s", method, url, last, attempt + 1, delay
                )
                await asyncio.sleep(delay)
        raise RemoteVerifierUnavailable(
            f"{method} {url} failed {self.max_retries} times; last error: {type(last).__name__}: {last}"
        )


class VLLMVerifier(RemoteVerifier):
    """A verifier served by vLLM's OpenAI-compatible server (``prompt_logprobs`` on completions)."""

    backend = "vllm"

    async def _check(self) -> None:
        answer = await self._request("GET", "/v1/models")
        try:
            served = [m["id"] for m in answer["data"]]
        except (KeyError, TypeError) as exc:
            raise RemoteConfigError(
                "url", f"{self.url}/v1/models is not an OpenAI model list"
            ) from exc
        if not served:
            raise RemoteConfigError("model", f"the server at {self.url} serves no model")
        if self.model is None:
            self.model = served[0]
        elif self.model not in served:
            raise RemoteConfigError(
                "model", f"{self.model!r} is not served at {self.url}; it serves {served}"
            )

    async def _response_logprobs(self, inp: VerifierInput) -> list[float]:
        if self.model is None:
            await self._check()
        payload = {
            "model": self.model,
            "prompt": inp.input_ids,
            "max_tokens": 1,
            "temperature": 0.0,
            "prompt_logprobs": 0,
        }
        answer = await self._request("POST", "/v1/completions", payload)
        try:
            entries = answer["choices"][0]["prompt_logprobs"]
            if len(entries) != len(inp.input_ids):
                raise ValueError(f"{len(entries)} prompt_logprobs for {len(inp.input_ids)} tokens")
            return [
                float(entries[i][str(inp.input_ids[i])]["logprob"])
                for i in range(inp.n_prompt, len(inp.input_ids))
            ]
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise _SampleError(f"vllm answer without usable prompt_logprobs: {exc!r}") from exc


class SGLangVerifier(RemoteVerifier):
    """A verifier served by SGLang's native ``/generate`` endpoint (input-token log-probs)."""

    backend = "sglang"

    async def _check(self) -> None:
        info = await self._request("GET", "/get_model_info")
        if not isinstance(info, dict) or "is_generation" not in info:
            raise RemoteConfigError("url", f"{self.url}/get_model_info is not SGLang's model info")
        if not info["is_generation"]:
            raise RemoteConfigError(
                "url",
                f"the SGLang server at {self.url} serves a non-generative model (no log-probs)",
            )

    async def _response_logprobs(self, inp: VerifierInput) -> list[float]:
        start = inp.n_prompt - 1  # the entry at logprob_start_len is always null
        payload = {
            "input_ids": inp.input_ids,
            "sampling_params": {"max_new_tokens": 1, "temperature": 0.0},
            "return_logprob": True,
            "logprob_start_len": start,
        }
        answer = await self._request("POST", "/generate", payload)
        try:
            entries = answer["meta_info"]["input_token_logprobs"]
            if len(entries) != len(inp.input_ids) - start:
                raise ValueError(
                    f"{len(entries)} input_token_logprobs, expected {len(inp.input_ids) - start}"
                )
            out = []
            for (logprob, token_id, *_), want in zip(
                entries[1:], inp.input_ids[inp.n_prompt :], strict=True
            ):
                if int(token_id) != want:
                    raise ValueError(f"token id {token_id} where {want} was sent")
                out.append(float(logprob))
            return out
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise _SampleError(
                f"sglang answer without usable input_token_logprobs: {exc!r}"
            ) from exc


def make_remote_verifier(
    backend: str, url: str, tokenizer: Tokenizer, **kwargs: Any
) -> RemoteVerifier:
    """A :class:`VLLMVerifier` or :class:`SGLangVerifier` (``backend`` is ``"vllm"`` or ``"sglang"``)."""
    classes = {"vllm": VLLMVerifier, "sglang": SGLangVerifier}
    if backend not in classes:
        raise RemoteConfigError("backend", f"must be one of {BACKENDS}, got {backend!r}")
    return classes[backend](url, tokenizer, **kwargs)
