"""The one module of graphtune that talks to litellm.

litellm gives one call for every provider (the provider is part of the model string:
``openai/gpt-4o-mini``, ``anthropic/...``, ``hosted_vllm/...`` or ``openai/<alias>`` with
``api_base`` for a local llama.cpp server). Its API and exception classes move between
versions, so everything that depends on them lives here:

* litellm is imported lazily (the import takes seconds and must not slow ``graphtune
  --help``), with ``LITELLM_LOCAL_MODEL_COST_MAP`` set first so the import never tries
  to download a cost map;
* litellm's own retries are switched off; :func:`complete` retries transient failures
  (rate limit, 5xx, timeout, connection error, empty reply) with exponential backoff and
  jitter, or after the wait a 429/503 reply asks for in its ``Retry-After`` header
  (delta-seconds or HTTP-date; ``retry-after-ms`` too), capped at ``retry_after_max_s``
  (default :data:`RETRY_AFTER_MAX_S`), and raises :class:`~graphtune.errors.LLMTransientError` when they outlive the
  retries; authentication, unknown model and bad request raise
  :class:`~graphtune.errors.LLMFatalError` at once (retrying would only spend money);
* the API key is read from the environment variable named by ``api_key_env`` and is never
  logged, stored or put in an error message.

Costs are not taken from litellm (its figures are unreliable for self-hosted models):
callers price the raw token counts of :class:`LLMReply` from the spec's own table.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import os
import random
import re
import time
import warnings
from dataclasses import dataclass
from typing import Any

from graphtune.errors import LLMError, LLMFatalError, LLMTransientError

#: First retry waits about this long; each further retry doubles it (plus jitter).
BACKOFF_BASE_S = 1.0
#: No single wait is longer than this.
BACKOFF_MAX_S = 30.0
#: Longest wait a ``Retry-After`` header can ask for (a longer one is cut to this; the
#: spec's ``env.retry_after_max_s`` overrides it).
RETRY_AFTER_MAX_S = 60.0
#: Placeholder key for endpoints that need none (a local llama.cpp server): the OpenAI
#: client refuses to start without some key.
NO_KEY = "no-key"

#: the waits between attempts (tests replace these, not the time and asyncio modules)
_sleep = time.sleep
_asleep = asyncio.sleep

_TRANSIENT_NAMES = frozenset({
    "RateLimitError", "Timeout", "APITimeoutError", "APIConnectionError", "InternalServerError",
    "ServiceUnavailableError", "BadGatewayError", "APIResponseValidationError",
})
_FATAL_NAMES = frozenset({
    "AuthenticationError", "PermissionDeniedError", "NotFoundError", "BadRequestError",
    "UnprocessableEntityError", "UnsupportedParamsError", "PaymentRequiredError", "BudgetExceededError",
    "ContentPolicyViolationError", "ContextWindowExceededError", "InvalidRequestError",
})
_TRANSIENT_STATUS = frozenset({408, 409, 425, 429})


@dataclass(frozen=True)
class LLMReply:
    """One successful completion. ``seconds`` is the latency of the call that succeeded
    (earlier failed attempts and backoff waits are not included)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    model: str


_litellm = None


def _import_litellm():
    """Import litellm once, quietly, without network access for its cost map."""
    global _litellm
    if _litellm is None:
        os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        # litellm's pydantic types warn while building their schemas, lazily, on calls
        warnings.filterwarnings("ignore", message=r".*is using the `ReadOnly` qualifier.*", category=UserWarning)
        warnings.filterwarnings("ignore", message=r".*are using the `ReadOnly` qualifier.*", category=UserWarning)
        try:
            import litellm
        except ImportError:
            raise LLMFatalError("litellm is not installed; install it with `pip install 'graphtune[llm]'` "
                                "(or `pip install litellm`)") from None
        litellm.suppress_debug_info = True
        _litellm = litellm
    return _litellm


# -- request building ------------------------------------------------------------------


def _api_key(model: str, api_base: str | None, api_key_env: str | None) -> str | None:
    if api_key_env:
        key = os.environ.get(api_key_env)
        if not key:
            raise LLMFatalError(f"model {model!r}: environment variable {api_key_env} (api_key_env) is not set or "
                                f"empty; export {api_key_env}=<your key> before running")
        return key
    if api_base:
        return NO_KEY  # self-hosted endpoint without authentication
    return None  # litellm falls back to the provider's usual variable (OPENAI_API_KEY, ...)


def _response_format(json_schema: dict | None) -> dict | None:
    if json_schema is None:
        return None
    name = str(json_schema.get("title") or "reply")
    name = re.sub(r"[^A-Za-z0-9_-]", "_", name)[:64] or "reply"
    return {"type": "json_schema", "json_schema": {"name": name, "schema": json_schema, "strict": True}}


def _kwargs(model: str, messages: list[dict], api_base: str | None, api_key: str | None, temperature: float,
            max_tokens: int | None, json_schema: dict | None, timeout_s: float, seed: int | None) -> dict[str, Any]:
    kw: dict[str, Any] = {"model": model, "messages": messages, "temperature": temperature, "timeout": timeout_s,
                          "num_retries": 0, "max_retries": 0,
                          # a provider without `seed` etc. ignores it instead of failing
                          "drop_params": True}
    if api_base:
        kw["api_base"] = api_base
    if api_key is not None:
        kw["api_key"] = api_key
    if max_tokens is not None:
        kw["max_tokens"] = max_tokens
    if seed is not None:
        kw["seed"] = seed
    rf = _response_format(json_schema)
    if rf is not None:
        kw["response_format"] = rf
    return kw


# -- replies and errors ---------------------------------------------------------------


def _reply(resp: Any, model: str, seconds: float) -> LLMReply:
    try:
        text = resp.choices[0].message.content
    except (AttributeError, IndexError, KeyError, TypeError):
        text = None
    if not text or not str(text).strip():
        raise LLMTransientError(f"model {model!r} returned an empty reply")
    usage = getattr(resp, "usage", None)
    pt = int(getattr(usage, "prompt_tokens", 0) or 0)
    ct = int(getattr(usage, "completion_tokens", 0) or 0)
    return LLMReply(text=str(text), prompt_tokens=pt, completion_tokens=ct, seconds=seconds,
                    model=str(getattr(resp, "model", None) or model))


def _short(exc: BaseException, secret: str | None) -> str:
    msg = " ".join(str(exc).split())
    if secret and secret != NO_KEY:
        msg = msg.replace(secret, "***")
    msg = re.sub(r"^litellm\.\w+:\s*", "", msg)
    return msg[:240] + ("..." if len(msg) > 240 else "")


def _classify(exc: BaseException) -> str | None:
    """"transient", "fatal", or None (not an endpoint error: a bug to re-raise)."""
    for cls in type(exc).__mro__:
        if cls.__name__ in _FATAL_NAMES:
            return "fatal"
        if cls.__name__ in _TRANSIENT_NAMES:
            return "transient"
    status = getattr(exc, "status_code", None)
    if isinstance(status, int):
        if status in _TRANSIENT_STATUS or status >= 500:
            return "transient"
        if 400 <= status < 500:
            return "fatal"
    if any(c.__name__ in ("APIError", "OpenAIError") for c in type(exc).__mro__):
        return "transient"
    return None


def _fatal(exc: BaseException, model: str, api_key_env: str | None, secret: str | None) -> LLMFatalError:
    names = {c.__name__ for c in type(exc).__mro__}
    detail = _short(exc, secret)
    if names & {"AuthenticationError", "PermissionDeniedError"}:
        where = f"${api_key_env}" if api_key_env else "the provider's API-key variable (set `api_key_env`)"
        fix = f"check that {where} holds a valid key for this provider"
    elif "NotFoundError" in names:
        fix = "check the model string (provider/model) and `api_base`"
    elif "ContextWindowExceededError" in names:
        fix = "shorten the prompt or use a model with a longer context"
    elif names & {"PaymentRequiredError", "BudgetExceededError"}:
        fix = "check the account's credit or spending limit"
    else:
        fix = "check the model string and the request parameters (max_tokens, response_format)"
    return LLMFatalError(f"LLM call to {model!r} failed ({type(exc).__name__}: {detail}); {fix}")


def _backoff_s(attempt: int) -> float:
    base = min(BACKOFF_MAX_S, BACKOFF_BASE_S * (2 ** attempt))
    return base * (0.5 + random.random())  # jitter so parallel callers do not retry in step


def _headers_of(exc: BaseException) -> Any:
    """The HTTP response headers behind a litellm exception, where litellm kept them:
    ``litellm_response_headers`` (set by its exception mapping), the exception's own
    ``headers``, or its ``response.headers`` (an httpx response)."""
    for h in (getattr(exc, "litellm_response_headers", None), getattr(exc, "headers", None),
              getattr(getattr(exc, "response", None), "headers", None)):
        if h:
            return h
    return None


def _header(headers: Any, name: str) -> str | None:
    try:
        v = headers.get(name)
        if v is None:  # a plain dict: compare case-insensitively
            v = next((val for k, val in dict(headers).items() if str(k).lower() == name), None)
    except Exception:  # noqa: BLE001 - an odd headers object is no reason to fail the call
        return None
    return None if v is None else str(v).strip()


def retry_after_s(headers: Any, *, now: float | None = None) -> float | None:
    """Seconds a ``Retry-After`` (or ``retry-after-ms``) header asks to wait: delta-seconds
    (fractions accepted) or an HTTP-date; None when absent or unreadable."""
    if not headers:
        return None
    ms = _header(headers, "retry-after-ms")
    if ms:
        try:
            v = float(ms) / 1000.0
            if v == v and v >= 0:  # not NaN
                return v
        except ValueError:
            pass
    ra = _header(headers, "retry-after")
    if not ra:
        return None
    try:
        v = float(ra)
        return v if v == v and v >= 0 else None
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(ra)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


def _wait_s(attempt: int, retry_after: float | None, cap_s: float) -> float:
    """Wait before retry ``attempt + 1``: what the server asked for (capped), else backoff."""
    if retry_after is not None:
        return min(max(0.0, cap_s), retry_after)
    return _backoff_s(attempt)


def _handle(exc: BaseException, model: str, api_key_env: str | None, secret: str | None) -> LLMTransientError:
    """Translate one failed attempt: raise fatal errors, return transient ones."""
    if isinstance(exc, LLMTransientError):
        return exc
    if isinstance(exc, LLMError):
        raise exc
    kind = _classify(exc)
    if kind == "fatal":
        raise _fatal(exc, model, api_key_env, secret) from None
    if kind is None:
        raise exc
    return LLMTransientError(f"LLM call to {model!r} failed ({type(exc).__name__}: {_short(exc, secret)})")


def _retry_after_of(exc: BaseException) -> float | None:
    """The wait a rate-limit or unavailable reply asked for (429 or 503 only)."""
    status = getattr(exc, "status_code", None)
    if status not in (429, 503):
        return None
    return retry_after_s(_headers_of(exc))


def _give_up(last: LLMTransientError, model: str, attempts: int) -> LLMTransientError:
    return LLMTransientError(f"{last} after {attempts} attempt{'s' if attempts > 1 else ''}; the endpoint may be "
                             "down or rate limited: try again later or raise `max_retries`/`timeout_s`")


# -- public API ----------------------------------------------------------------------


def complete(model: str, messages: list[dict], *, api_base: str | None = None, api_key_env: str | None = None,
             temperature: float = 0.0, max_tokens: int | None = None, json_schema: dict | None = None,
             timeout_s: float = 60.0, max_retries: int = 2, seed: int | None = None,
             retry_after_max_s: float = RETRY_AFTER_MAX_S) -> LLMReply:
    """One chat completion. With ``json_schema`` the reply is constrained to that schema
    (``response_format`` of type ``json_schema``) where the provider supports it; the
    caller still validates the text (:func:`parse_json` helps).

    Raises LLMFatalError (bad key, unknown model, bad request, missing key variable) at
    once and LLMTransientError once ``max_retries`` retries have failed. A 429/503 reply's
    ``Retry-After`` sets the wait before the next attempt (at most ``retry_after_max_s``).
    """
    litellm = _import_litellm()
    key = _api_key(model, api_base, api_key_env)
    kw = _kwargs(model, messages, api_base, key, temperature, max_tokens, json_schema, timeout_s, seed)
    last: LLMTransientError | None = None
    asked: float | None = None
    for attempt in range(max_retries + 1):
        if attempt:
            _sleep(_wait_s(attempt - 1, asked, retry_after_max_s))
        t0 = time.perf_counter()
        try:
            resp = litellm.completion(**kw)
            return _reply(resp, model, time.perf_counter() - t0)
        except Exception as exc:  # noqa: BLE001 - translated in one place
            last = _handle(exc, model, api_key_env, key)
            asked = _retry_after_of(exc)
    raise _give_up(last, model, max_retries + 1)


async def acomplete(model: str, messages: list[dict], *, api_base: str | None = None,
                    api_key_env: str | None = None, temperature: float = 0.0, max_tokens: int | None = None,
                    json_schema: dict | None = None, timeout_s: float = 60.0, max_retries: int = 2,
                    seed: int | None = None, retry_after_max_s: float = RETRY_AFTER_MAX_S) -> LLMReply:
    """Async :func:`complete` (same arguments, errors and retries)."""
    litellm = _import_litellm()
    key = _api_key(model, api_base, api_key_env)
    kw = _kwargs(model, messages, api_base, key, temperature, max_tokens, json_schema, timeout_s, seed)
    last: LLMTransientError | None = None
    asked: float | None = None
    for attempt in range(max_retries + 1):
        if attempt:
            await _asleep(_wait_s(attempt - 1, asked, retry_after_max_s))
        t0 = time.perf_counter()
        try:
            resp = await litellm.acompletion(**kw)
            return _reply(resp, model, time.perf_counter() - t0)
        except Exception as exc:  # noqa: BLE001 - translated in one place
            last = _handle(exc, model, api_key_env, key)
            asked = _retry_after_of(exc)
    raise _give_up(last, model, max_retries + 1)


def ping(model: str, *, api_base: str | None = None, api_key_env: str | None = None,
         timeout_s: float = 30.0) -> float:
    """One cheap call (one completion token, no retry) that proves an endpoint answers
    with these credentials; returns its latency in seconds. A reply without text still
    counts as an answer here. Raises LLMFatalError or LLMTransientError, as
    :func:`complete` does."""
    litellm = _import_litellm()
    key = _api_key(model, api_base, api_key_env)
    kw = _kwargs(model, [{"role": "user", "content": "Reply with OK."}], api_base, key, 0.0, 1, None,
                 timeout_s, None)
    t0 = time.perf_counter()
    try:
        litellm.completion(**kw)
    except Exception as exc:  # noqa: BLE001 - translated in one place
        raise _handle(exc, model, api_key_env, key) from None
    return time.perf_counter() - t0


def parse_json(text: str) -> Any:
    """Parse a JSON reply, tolerating a markdown code fence or prose around one object
    (providers without schema enforcement often add them). Raises ValueError, also for
    ``NaN``/``Infinity``/overflowing numbers and for nesting deeper than
    ``graphtune.agent.schema.MAX_REPLY_DEPTH`` (refused before the recursive parser runs).
    Linear in the length of the text (the fence is cut with string operations: a regex
    with a lazy body and ``\\s*`` around the closing fence took minutes on 5,000 spaces)."""
    from graphtune.agent.schema import loads_finite

    t = text.strip()
    if len(t) >= 6 and t.startswith("```") and t.endswith("```"):
        text = t[3:-3]
        if text.startswith(("json", "JSON")):
            text = text[4:]
    try:
        return loads_finite(text)
    except json.JSONDecodeError:
        start, end = text.find("{"), text.rfind("}")
        if start != -1 and end > start:
            return loads_finite(text[start:end + 1])
        raise
