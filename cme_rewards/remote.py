"""Remote verifiers: CME from an inference server's prompt log-probs (vLLM or SGLang).

Ids are built and log-probs finished as :class:`cme_rewards.CMEScorer` does, so a remote verifier
gives the local value up to the server's numerics.

- vLLM: ``POST /v1/completions`` with ``prompt_logprobs: 0`` (``choices[0].prompt_logprobs``: one
  entry per prompt token keyed by its id; ``-inf`` comes as ``-9999.0``); checked with
  ``GET /v1/models`` (names the model, gives ``max_model_len``) and ``POST /tokenize``.
- SGLang: ``POST /generate`` with ``return_logprob`` from ``logprob_start_len = n_prompt - 1``
  (``meta_info.input_token_logprobs``: ``[logprob, token_id, text]``, the first ``null``; ``-inf``
  comes as ``null``; ids at or above ``vocab_size - 1`` come as ``0``); checked with
  ``GET /get_model_info``.

:meth:`RemoteVerifier.check` raises :class:`RemoteConfigError` naming ``url``, ``model`` or
``verifier`` (the client tokenizer splits :data:`PROBE_TEXT` differently), and lowers
``max_length`` to fit ``max_model_len``. Connection errors, timeouts and 5xx are retried on
:mod:`cme_rewards.retry`'s schedule; then, if the server still answers a small probe request, the
sample was rejected (veRL's router turns a 4xx into a 500) and gets the floor, else
:class:`RemoteVerifierUnavailable` is raised. A 4xx or malformed answer floors that sample.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from transformers import AutoTokenizer
from transformers import PreTrainedTokenizerBase as Tokenizer

from cme_rewards.formatting import EMPTY_PROMPT, Prompt, VerifierInput, encode_sample
from cme_rewards.models import resolve_verifier
from cme_rewards.options import CheckedOptions, OptionError, ScorerOptions, above, at_least, option
from cme_rewards.results import CMEResult, finish_sample, floored
from cme_rewards.retry import DEFAULT_TRIES, TransientError, retry_async
from cme_rewards.verifier_names import strip_random

logger = logging.getLogger(__name__)

BACKENDS = ("vllm", "sglang")
RemoteConfigError = OptionError  # a remote setting is wrong; ``option`` names it (``url``, ...)


class RemoteVerifierUnavailable(RuntimeError):
    """The server did not answer after every retry (connection refused, timeouts, 5xx)."""


class _ServerTrouble(TransientError):
    """One failed attempt that may pass: connection error, timeout, 5xx (``status``)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


PROBE_TEXT = "The capital of France is Paris. Zürich, 東京 and Привет: 12345 + 0.5 = <ok>\n"
"""Text both tokenizers must split identically at start-up (a few scripts, digits, markup)."""

VLLM_LOGPROB_FLOOR = -9999.0
"""vLLM's JSON stand-in for a ``-inf`` log-prob (its OpenAI server clamps with ``max(lp, -9999.0)``)."""


@dataclass(frozen=True)
class RemoteOptions(CheckedOptions):
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


class _SampleError(Exception):
    """The server's answer for one sample is unusable (4xx, malformed): that sample gets the floor."""


def load_verifier_tokenizer(name: str) -> Tokenizer:
    """The tokenizer of a named verifier, without loading its weights."""
    return AutoTokenizer.from_pretrained(resolve_verifier(strip_random(name)[0]))


class RemoteVerifier:
    """Scores (prompt, response) pairs with a served verifier whose tokenizer is ``tokenizer``.

    ``options`` are the scorer's (``device``/``dtype`` are the server's business); ``remote`` says
    where the server is.
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
        self.max_model_len: int | None = None
        self._session: aiohttp.ClientSession | None = None
        self._session_loop: asyncio.AbstractEventLoop | None = None

    def encode(self, prompt: Prompt, response: str) -> VerifierInput:
        """The verifier's ids and scored positions for one sample (same as ``CMEScorer.encode``)."""
        return encode_sample(self.tokenizer, prompt, response, self.options)

    async def check(self) -> None:
        """Start-up check (see the module docstring); raises :class:`RemoteConfigError`."""
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
        # Fit max_length plus the one generated token into the served max_model_len.
        if self.max_model_len is not None and self.options.max_length + 1 > self.max_model_len:
            if self.max_model_len < 3:
                raise RemoteConfigError(
                    "url", f"{self.served_name()!r} has max_model_len={self.max_model_len}"
                )
            logger.warning(
                "max_length=%d: %r at %s has max_model_len=%d (one token is generated), so the "
                "verifier sees at most %d tokens; longer samples are cut from the left (truncated)",
                self.options.max_length,
                self.served_name(),
                self.url,
                self.max_model_len,
                self.max_model_len - 1,
            )
            self.options = self.options.replace(max_length=self.max_model_len - 1)
        try:
            theirs, ours = await self._probe_tokens()
        except (_SampleError, RemoteVerifierUnavailable) as exc:
            logger.warning(
                "%s at %r: cannot compare tokenizers (%r); make sure %r is the served model's",
                self.backend,
                self.url,
                exc,
                self.verifier_name,
            )
            return
        if theirs != ours:
            pairs = enumerate(zip(theirs, ours, strict=False))
            at = next((i for i, (a, b) in pairs if a != b), min(len(theirs), len(ours)))
            raise RemoteConfigError(
                "verifier",
                f"the tokenizer of {self.verifier_name!r} (client side) does not match the model "
                f"{self.served_name()!r} served at {self.url}: {PROBE_TEXT!r} gives "
                f"{ours[max(0, at - 2) : at + 4]}... here and {theirs[max(0, at - 2) : at + 4]}... "
                f"there (first difference at token {at}); name the served model's tokenizer",
            )

    def served_name(self) -> str:
        """The served model's name as the server reports it (or the URL)."""
        return self.model or self.url

    async def score(
        self,
        prompt: Prompt,
        response: str,
        *,
        id: str | None = None,
        keep_token_logprobs: bool = False,
    ) -> CMEResult:
        """The reward (nats) of one response, or the floor with ``error``; ``keep_token_logprobs``
        keeps the per-token log-probs (nats)."""
        inp = self.encode(prompt, response)
        if inp.error is not None:
            return finish_sample(inp, None, self.options, id=id)
        try:
            logprobs = await self._response_logprobs(inp)
            unconditional = None
            if self.options.reduction.startswith("pmi"):  # pmi, pmi_sum: also without the prompt
                bare = self.encode(EMPTY_PROMPT, response)
                unconditional = await self._response_logprobs(bare)
        except _SampleError as exc:
            return floored(str(exc)[:300], self.options, id=id, truncated=inp.truncated)
        return finish_sample(
            inp,
            logprobs,
            self.options,
            id=id,
            unconditional=unconditional,
            keep_token_logprobs=keep_token_logprobs,
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
        ids = ids if ids is not None else [None] * len(prompts)
        pending = [self.score(p, r, id=i) for p, r, i in zip(prompts, responses, ids, strict=True)]
        return list(await asyncio.gather(*pending))

    async def aclose(self) -> None:
        """Close the HTTP session (if one is open on the running loop)."""
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    # -- wire format (subclasses): ``_check()`` reads the model info; ``_probe_tokens()`` gives
    # ``(server's ids, client's ids)`` of PROBE_TEXT; ``_probe_request()`` the ``(path, payload)``
    # of a tiny request any healthy server answers; ``_response_logprobs(inp)`` the log-probs
    # (nats) of ``inp.input_ids[inp.n_prompt:]``, ``[n_scored]``.

    def _probe_ids(self) -> list[int]:
        ids = self.tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"][:4]
        bos = self.tokenizer.bos_token_id
        return ([bos] if bos is not None else []) + ids

    # -- HTTP --

    def _client(self) -> aiohttp.ClientSession:
        """A session on the running event loop (a session cannot move between loops)."""
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._session_loop is not loop:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.remote.timeout_s)
            )
            self._session_loop = loop
        return self._session

    async def _request(
        self, method: str, path: str, payload: dict | None = None, *, per_sample: bool = False
    ) -> Any:
        """JSON answer of ``method {url}{path}``, retried; ``per_sample``: a 5xx on every try while
        the server answers a probe request means it rejects this sample (:class:`_SampleError`)."""
        url = f"{self.url}{path}"
        try:
            return await self._retried(method, url, payload, self.remote.max_retries)
        except _ServerTrouble as exc:
            if per_sample and exc.status is not None and await self._answers_probe():
                raise _SampleError(
                    f"{self.backend} answered {exc} on {self.remote.max_retries} tries for this "
                    "sample while answering a probe request, so it rejects this sample (veRL's "
                    "router passes a server's 4xx on as a 500; its log holds the reason)"
                ) from exc
            raise RemoteVerifierUnavailable(
                f"{method} {url} failed {self.remote.max_retries} times; last error: {exc}"
            ) from exc

    async def _answers_probe(self) -> bool:
        """Whether the server answers one small, well-formed scoring request."""
        path, payload = self._probe_request()
        try:  # twice: a server may close the connection after a 500, and the pool reuses it
            await self._retried("POST", f"{self.url}{path}", payload, 2, what="probe")
        except Exception as exc:  # noqa: BLE001 - any failure means: not healthy
            logger.warning(
                "%s at %r does not answer a probe request either: %r",
                self.backend,
                self.url,
                str(exc),
            )
            return False
        return True

    async def _retried(
        self, method: str, url: str, payload: dict | None, tries: int, what: str | None = None
    ) -> Any:
        return await retry_async(
            lambda: self._attempt(method, url, payload), what=f"{what or method} {url}", tries=tries
        )

    async def _attempt(self, method: str, url: str, payload: dict | None) -> Any:
        try:
            async with self._client().request(method, url, json=payload) as resp:
                if resp.status >= 500:
                    raise _ServerTrouble(
                        f"HTTP {resp.status}: {(await resp.text())[:200]}", status=resp.status
                    )
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
            served = {m["id"]: m for m in answer["data"]}
        except (KeyError, TypeError) as exc:
            raise RemoteConfigError(
                "url", f"{self.url}/v1/models is not an OpenAI model list"
            ) from exc
        if not served:
            raise RemoteConfigError("model", f"the server at {self.url} serves no model")
        if self.model is None:
            self.model = next(iter(served))
        elif self.model not in served:
            raise RemoteConfigError(
                "model", f"{self.model!r} is not served at {self.url}; it serves {list(served)}"
            )
        if isinstance(max_len := served[self.model].get("max_model_len"), int):
            self.max_model_len = max_len

    async def _probe_tokens(self) -> tuple[list[int], list[int]]:
        payload = {"model": self.model, "prompt": PROBE_TEXT, "add_special_tokens": False}
        answer = await self._request("POST", "/tokenize", payload)
        try:
            theirs = [int(t) for t in answer["tokens"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise _SampleError(f"/tokenize answer without tokens: {exc!r}") from exc
        return theirs, list(self.tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"])

    def _payload(self, ids: list[int]) -> dict:
        return {
            "model": self.model,
            "prompt": ids,
            "max_tokens": 1,
            "temperature": 0.0,
            "prompt_logprobs": 0,
        }

    def _probe_request(self) -> tuple[str, dict]:
        return "/v1/completions", self._payload(self._probe_ids())

    async def _response_logprobs(self, inp: VerifierInput) -> list[float]:
        if self.model is None:
            await self._check()
        if self.max_model_len is not None and len(inp.input_ids) + 1 > self.max_model_len:
            raise _SampleError(
                f"{len(inp.input_ids)} verifier tokens plus one generated exceed the server's "
                f"max_model_len={self.max_model_len} (not sent)"
            )
        answer = await self._request(
            "POST", "/v1/completions", self._payload(inp.input_ids), per_sample=True
        )
        try:
            entries = answer["choices"][0]["prompt_logprobs"]
            if len(entries) != len(inp.input_ids):
                raise ValueError(f"{len(entries)} prompt_logprobs for {len(inp.input_ids)} tokens")
            values = [
                float(entries[i][str(inp.input_ids[i])]["logprob"])
                for i in range(inp.n_prompt, len(inp.input_ids))
            ]
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise _SampleError(f"vllm answer without usable prompt_logprobs: {exc!r}") from exc
        # vLLM writes -inf as -9999.0 (JSON has no infinity): read it back as the scorer sees it.
        return [-math.inf if v <= VLLM_LOGPROB_FLOOR else v for v in values]


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
        if isinstance(info.get("model_path"), str):
            self.model = self.model or info["model_path"]

    @staticmethod
    def _payload(start: int, **inputs: Any) -> dict:
        return {
            **inputs,
            "sampling_params": {"max_new_tokens": 1, "temperature": 0.0},
            "return_logprob": True,
            "logprob_start_len": start,
        }

    def _same_id(self, reported: int, sent: int) -> bool:
        # SGLang reports ids >= vocab_size - 1 as 0 (its guard for image-pad hashes).
        return reported == sent or (reported == 0 and sent >= len(self.tokenizer) - 1)

    async def _probe_tokens(self) -> tuple[list[int], list[int]]:
        answer = await self._request("POST", "/generate", self._payload(0, text=PROBE_TEXT))
        try:
            theirs = [int(e[1]) for e in answer["meta_info"]["input_token_logprobs"]]
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise _SampleError(f"/generate answer without input_token_logprobs: {exc!r}") from exc
        ours = list(self.tokenizer(PROBE_TEXT)["input_ids"])  # SGLang adds special tokens to text
        if len(theirs) == len(ours):
            theirs = [o if self._same_id(t, o) else t for t, o in zip(theirs, ours, strict=True)]
        return theirs, ours

    def _probe_request(self) -> tuple[str, dict]:
        return "/generate", self._payload(0, input_ids=self._probe_ids())

    async def _response_logprobs(self, inp: VerifierInput) -> list[float]:
        start = inp.n_prompt - 1  # the entry at logprob_start_len is always null
        payload = self._payload(start, input_ids=inp.input_ids)
        answer = await self._request("POST", "/generate", payload, per_sample=True)
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
                if not self._same_id(int(token_id), want):
                    raise ValueError(f"token id {token_id} where {want} was sent")
                # SGLang's JSON writes -inf (and NaN) as null: read it as the scorer sees it.
                out.append(-math.inf if logprob is None else float(logprob))
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
