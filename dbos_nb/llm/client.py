"""A minimal OpenAI chat completions client on the standard library.

`chat()` sends one prompt and returns the answer with its token usage. It works against the fake
server (`dbos_nb.llm.fakeserver`) and the real OpenAI API (or any compatible one) alike, and it
turns HTTP 429 into `dbos_nb.errors.RateLimited` carrying the provider's Retry-After, which is what
a durable step should raise so that its queue backs off as a whole instead of burning retries;
a 429 that no wait cures (out of credit, a request larger than the whole limit) is an ordinary
error.

It deliberately does not retry: retrying is the job of the step and queue machinery around it.
"""

from __future__ import annotations

import email.utils
import json
import time
import urllib.error
import urllib.request
from email.message import Message
from typing import Any

from dbos_nb.errors import RateLimited, waiting_does_not_cure

# How much of an error body goes into exception messages: enough to diagnose, not a page dump.
_EXCERPT_CHARS = 500


def _retry_after_seconds(headers: Message) -> float | None:
    """The wait a 429 asks for, in seconds, or None when the response gives none.

    OpenAI may send `retry-after-ms` (more precise) besides the standard `Retry-After`, which is
    either a number of seconds or an HTTP date.
    """
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _error_details(body: str) -> tuple[str, dict[str, Any] | None]:
    """(message, error object) of an OpenAI-style error body; an excerpt of the text and None
    for any other body."""
    try:
        payload = json.loads(body)
    except ValueError:
        payload = None
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        error: dict[str, Any] = payload["error"]
        return str(error.get("message") or body[:_EXCERPT_CHARS]), error
    return body[:_EXCERPT_CHARS], None


def chat(
    prompt: str,
    *,
    base_url: str,
    model: str = "fake-model",
    api_key: str | None = None,
    max_tokens: int | None = None,
    timeout: float = 60.0,
) -> dict[str, Any]:
    """Ask `prompt` as one user message; returns answer and token usage.

    Returns {"answer", "prompt_tokens", "completion_tokens", "total_tokens"}. Raises
    `RateLimited` on HTTP 429 (with `retry_after` from the response headers, or None) and
    `RuntimeError` on any other HTTP error, on a 429 that no wait cures (out of credit, or a
    request larger than the whole rate limit) or on an unreadable response. Network failures
    (`urllib.error.URLError`, `TimeoutError`) propagate unchanged.
    """
    url = base_url.rstrip("/") + "/chat/completions"
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": prompt}]}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(
        url, data=json.dumps(body).encode("utf-8"), headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
    except urllib.error.HTTPError as e:
        text = e.read().decode("utf-8", errors="replace")
        message, error = _error_details(text)
        # OpenAI answers 429 also when the account is out of credit, and for a request larger
        # than the whole limit; waiting fixes neither, so they must not become RateLimited
        # (which pauses the whole queue, and is retried up to the step's
        # max_rate_limit_retries).
        if e.code == 429 and not waiting_does_not_cure(error):
            raise RateLimited(
                f"HTTP 429 from {url}: {message}", retry_after=_retry_after_seconds(e.headers)
            ) from None
        raise RuntimeError(
            f"HTTP {e.code} {e.reason} from {url}: {text[:_EXCERPT_CHARS]}"
        ) from None

    try:
        payload = json.loads(raw.decode("utf-8"))
        content = payload["choices"][0]["message"].get("content")
        usage = payload.get("usage") or {}
    except (UnicodeDecodeError, ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        excerpt = raw[:_EXCERPT_CHARS].decode("utf-8", errors="replace")
        raise RuntimeError(f"unexpected chat completions response from {url}: {excerpt}") from e
    return {
        # A refusal or a tool call has no text content; an empty answer is the honest value.
        "answer": content if isinstance(content, str) else "",
        "prompt_tokens": int(usage.get("prompt_tokens") or 0),
        "completion_tokens": int(usage.get("completion_tokens") or 0),
        "total_tokens": int(usage.get("total_tokens") or 0),
    }
