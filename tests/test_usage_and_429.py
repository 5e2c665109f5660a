"""What a step says of its usage and of a provider's 429s: numbers as providers' clients and
numpy give them are taken (a refusal after the paid call would make the retry pay it again),
nonsense is refused by name, and a 429 that no wait cures (out of credit, a request larger than
the whole limit) is an ordinary error, not a pause."""

from __future__ import annotations

import decimal
import math

import httpx
import numpy as np
import pytest

from dbos_nb import DBOS, Queue, RateLimited, SetEnqueueOptions
from dbos_nb.core.steps import rate_limit_delay


def test_report_usage_takes_numpy_and_decimal_numbers(launched: str) -> None:
    calls: list[int] = []

    @DBOS.step(name="np_usage_step", retries_allowed=True, max_attempts=3)
    def paid(i: int) -> int:
        calls.append(i)
        DBOS.report_usage(tokens=np.array([3, 4]).sum(), cost=decimal.Decimal("0.25"))
        return i

    queue = Queue("np_usage", token_limiter={"limit": 1000, "period": 60})
    with SetEnqueueOptions(token_estimate=np.int64(20)):
        handle = queue.enqueue(paid, 1)
    assert handle.get_result(timeout_sec=20) == 1
    assert calls == [1]  # reported once, not retried
    frame = queue.map(paid, [5], batch="np-usage", tokens=np.int64(9)).wait(timeout=20, show=False)
    row = frame.to_pandas().iloc[0]
    assert (int(row["tokens"]), float(row["cost"])) == (7, 0.25)


@pytest.mark.parametrize(
    ("tokens", "cost", "message"),
    [
        (-1, None, "tokens must be"),
        (2**63, None, "tokens must be"),
        (1.5, None, "tokens must be"),
        (True, None, "tokens must be"),
        (None, math.nan, "cost must be"),
        (None, -0.5, "cost must be"),
        (None, "1", "cost must be"),
    ],
)
def test_report_usage_refuses_nonsense(
    launched: str, tokens: object, cost: object, message: str
) -> None:
    @DBOS.step(name="bad_usage_step")
    def reports() -> None:
        DBOS.report_usage(tokens=tokens, cost=cost)  # type: ignore[arg-type]

    @DBOS.workflow(name="bad_usage_wf")
    def flow() -> None:
        reports()

    with pytest.raises(Exception, match=message):
        flow()


@pytest.mark.parametrize("wait", [math.nan, math.inf, -5, 7200, "10"])
def test_rate_limited_refuses_a_wait_that_means_nothing(wait: object) -> None:
    with pytest.raises(ValueError, match="retry_after"):
        RateLimited(retry_after=wait)  # type: ignore[arg-type]
    assert RateLimited(retry_after=2.5).retry_after == 2.5


def _http_429(body: object = None, retry_after: str | None = None) -> httpx.HTTPStatusError:
    request = httpx.Request("POST", "http://127.0.0.1/v1/chat/completions")
    headers = {} if retry_after is None else {"Retry-After": retry_after}
    response = httpx.Response(429, json=body or {}, headers=headers, request=request)
    return httpx.HTTPStatusError("429", request=request, response=response)


# OpenAI's answers when a window is full and when one request alone exceeds the whole limit:
# both are 429s with the same code and type, told apart by their message only.
_FULL = "Rate limit reached for gpt-4o on tokens per min (TPM): Limit 30000, Used 29000."
_TOO_LARGE = (
    "Request too large for gpt-4o on tokens per min (TPM): Limit 30000, Requested 36119. "
    "The input or output tokens must be reduced in order to run successfully."
)


class _OpenAIStyle429(Exception):
    """The shape of `openai.RateLimitError`: the status code, and the body's `error` object."""

    def __init__(self, error: dict[str, str]) -> None:
        super().__init__(f"Error code: 429 - {error}")
        self.status_code = 429
        self.body = error
        self.code = error.get("code")
        self.response = None


def test_a_429_that_no_wait_cures_is_not_a_rate_limit() -> None:
    assert rate_limit_delay(_http_429({"error": {"code": "rate_limit_exceeded"}})) == 0.0
    assert rate_limit_delay(_http_429(retry_after="3")) == 3.0
    assert rate_limit_delay(_http_429({"error": {"code": "insufficient_quota"}})) is None
    assert rate_limit_delay(_http_429({"error": {"type": "insufficient_quota"}})) is None
    full = {"message": _FULL, "type": "tokens", "code": "rate_limit_exceeded"}
    too_large = {**full, "message": _TOO_LARGE}
    assert rate_limit_delay(_http_429({"error": full}, retry_after="2")) == 2.0
    assert rate_limit_delay(_http_429({"error": too_large}, retry_after="2")) is None
    assert rate_limit_delay(_OpenAIStyle429(full)) == 0.0
    assert rate_limit_delay(_OpenAIStyle429(too_large)) is None
    # As a proxy passes it on: prefixed, or as a bare string.
    proxied = {**full, "message": f"litellm.RateLimitError: OpenAIException - {_TOO_LARGE}"}
    assert rate_limit_delay(_http_429({"error": proxied})) is None
    assert rate_limit_delay(_http_429({"error": _TOO_LARGE})) is None
    assert rate_limit_delay(_http_429({"error": _FULL})) == 0.0
    # A header that means nothing falls back to dbos_nb's back-off; an endless one is capped.
    assert rate_limit_delay(_http_429(retry_after="nan")) == 0.0
    assert rate_limit_delay(_http_429(retry_after="1e9")) == 3600.0
