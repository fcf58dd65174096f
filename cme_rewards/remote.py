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

Failures: connection errors, timeouts and 5xx answers are retried on :mod:`cme_rewards.retry`'s
schedule; when ``max_retries`` tries all fail, :class:`RemoteVerifierUnavailable` is raised (the verifier is down:
not a property of one sample). A 4xx answer or a malformed answer for one sample, or a sample that
can never be scored (empty response), gives the floor reward with ``error`` set.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from transformers import AutoTokenizer
from transformers import PreTrainedTokenizerBase as Tokenizer

from cme_rewards.formatting import EMPTY_PROMPT, Prompt, VerifierInput, encode_sample
from cme_rewards.models import resolve_verifier
from cme_rewards.options import OptionError, ScorerOptions, above, at_least, check_fields, option
from cme_rewards.results import CMEResult, finish_sample, floored
from cme_rewards.retry import DEFAULT_TRIES, TransientError, retry_async
from cme_rewards.verifier_names import strip_random

logger = logging.getLogger(__name__)

BACKENDS = ("vllm", "sglang")


RemoteConfigError = OptionError
"""A setting of a remote verifier is wrong; ``option`` names it (``url``, ``model``, ...)."""


class RemoteVerifierUnavailable(RuntimeError):
    """The server did not answer after every retry (connection refused, timeouts, 5xx)."""


class _ServerTrouble(TransientError):
    """One failed attempt that may pass: connection error, timeout, 5xx."""


@dataclass(frozen=True)
class RemoteOptions:
    """How to reach a served verifier (the scorer's own options are :class:`ScorerOptions`)."""

    url: str | None = option(
        None, "the server's base URL, e.g. http://10.0.0.5:8000 (http:// is added when missing)"
    )
    model: str | None = option(
        None, "vLLM's model request field (none: the first model the server lists)"
    )
    timeout_s: float = option(300.0, "per-request timeout", unit="s", check=above(0))
    max_retries: int = option(
        DEFAULT_TRIES, "tries of a request on transient trouble before giving up", check=at_least(1)
    )

    def __post_init__(self) -> None:
        check_fields(self)


class _SampleError(Exception):
    """The server's answer for one sample is unusable (4xx, malformed): that sample gets the floor."""


def load_verifier_tokenizer(name: str) -> Tokenizer:
    """The tokenizer of a named verifier, without loading its weights."""
    return AutoTokenizer.from_pretrained(resolve_verifier(strip_random(name)[0]))


class RemoteVerifier:
    """Scores (prompt, response) pairs with a verifier served over HTTP; see the module docstring.

    Args:
        tokenizer: the verifier's tokenizer (it must be the served model's).
        options: the scorer's options (``max_length``, ``reduction``, ``floor``, ...); ``verifier``
            names the tokenizer, ``device``/``dtype`` are the server's business.
        remote: the server's URL, model name, timeout and tries.
    """

    backend: str = ""

    def __init__(
        self,
        tokenizer: Tokenizer,
        options: ScorerOptions | None = None,
        remote: RemoteOptions | None = None,
    ) -> None:
        self.options = options or ScorerOptions()
        self.remote = remote or RemoteOptions()
        if not self.remote.url:
            raise RemoteConfigError("url", "a server URL is required")
        self.verifier_name = self.options.verifier
        self.url = (
            self.remote.url if "://" in self.remote.url else f"http://{self.remote.url}"
        ).rstrip("/")
        self.tokenizer = tokenizer
        self.model = self.remote.model
        self._session: aiohttp.ClientSession | None = None
        self._session_loop: asyncio.AbstractEventLoop | None = None

    # -- public ----------------------------------------------------------------------------------

    def encode(self, prompt: Prompt, response: str) -> VerifierInput:
        """The verifier's ids and scored positions for one sample (same as ``CMEScorer.encode``)."""
        return encode_sample(self.tokenizer, prompt, response, self.options)

    async def check(self) -> None:
        """Start-up check: the server answers and serves a generative model.

        Raises :class:`RemoteConfigError` naming ``url`` (unreachable, wrong kind of server) or
        ``model`` (not served).
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
        """The reward (nats) of one response; floor with ``error`` for a sample that cannot be scored."""
        inp = self.encode(prompt, response)
        if inp.error is not None:
            return finish_sample(inp, None, self.options, id=id)
        try:
            logprobs = await self._response_logprobs(inp)
            unconditional = None
            if self.options.reduction == "pmi":
                bare = self.encode(EMPTY_PROMPT, response)
                unconditional = await self._response_logprobs(bare)
        except _SampleError as exc:
            return floored(str(exc)[:300], self.options, id=id, truncated=inp.truncated)
        return finish_sample(inp, logprobs, self.options, id=id, unconditional=unconditional)

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

    def _client(self) -> aiohttp.ClientSession:
        """A session on the running event loop (a session cannot move between loops)."""
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._session_loop is not loop:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.remote.timeout_s)
            )
            self._session_loop = loop
        return self._session

    async def _request(self, method: str, path: str, payload: dict | None = None) -> Any:
        """JSON answer of ``method {url}{path}``; retries transient trouble (see module docstring)."""
        url = f"{self.url}{path}"
        try:
            return await retry_async(
                lambda: self._attempt(method, url, payload),
                what=f"{method} {url}",
                tries=self.remote.max_retries,
            )
        except _ServerTrouble as exc:
            raise RemoteVerifierUnavailable(
                f"{method} {url} failed {self.remote.max_retries} times; last error: {exc}"
            ) from exc

    async def _attempt(self, method: str, url: str, payload: dict | None) -> Any:
        try:
            async with self._client().request(method, url, json=payload) as resp:
                if resp.status >= 500:
                    raise _ServerTrouble(f"HTTP {resp.status}: {(await resp.text())[:200]}")
                if resp.status >= 400:
                    raise _SampleError(
                        f"{self.backend} HTTP {resp.status}: {(await resp.text())[:200]}"
                    )
                return await resp.json(content_type=None)
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
            raise _ServerTrouble(f"{type(exc).__name__}: {exc}") from exc
        except aiohttp.ContentTypeError as exc:
            raise _SampleError(f"{self.backend} answer is not JSON: {exc}") from exc


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
    backend: str,
    tokenizer: Tokenizer,
    options: ScorerOptions | None = None,
    remote: RemoteOptions | None = None,
) -> RemoteVerifier:
    """A :class:`VLLMVerifier` or :class:`SGLangVerifier` (``backend`` is ``"vllm"`` or ``"sglang"``)."""
    classes = {"vllm": VLLMVerifier, "sglang": SGLangVerifier}
    if backend not in classes:
        raise RemoteConfigError("backend", f"must be one of {', '.join(BACKENDS)}; got {backend!r}")
    return classes[backend](tokenizer, options, remote)
