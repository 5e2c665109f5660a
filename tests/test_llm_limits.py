"""Rate-limit answers (429) and token budgets, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import time

import httpx
import numpy as np
import pytest
from sqlalchemy import select

from conftest import config, wait_until
from dbos_nb import (
    DBOS,
    DbosNbError,
    InvalidQueueSettingsError,
    Queue,
    RateLimited,
    SetEnqueueOptions,
)
from dbos_nb.clock import ManualClock
from dbos_nb.core.runtime import get_runtime
from dbos_nb.core.steps import rate_limit_delay
from dbos_nb.llm.client import chat
from dbos_nb.llm.fakeserver import FakeLLMServer
from dbos_nb.storage.schema import queues


def _paused_until_ms(queue_name: str) -> int | None:
    with get_runtime().db.read() as conn:
        return conn.execute(
            select(queues.c.paused_until_ms).where(queues.c.name == queue_name)
        ).scalar_one()


def test_a_429_pauses_the_whole_queue_and_is_retried(launched: str) -> None:
    q = Queue("llm", concurrency=4)
    starts: list[tuple[int, float]] = []
    answered: list[int] = []
    lock = threading.Lock()
    said_429 = threading.Event()

    @DBOS.step()  # no retries allowed: a 429 is not a failure
    def call(i: int) -> int:
        with lock:
            starts.append((i, time.monotonic()))
        if i == 0 and not said_429.is_set():
            said_429.set()
            raise RateLimited("slow down", retry_after=0.6)
        with lock:
            answered.append(i)
        time.sleep(0.05)
        return i

    first = q.enqueue(call, 0)
    assert said_429.wait(10)
    # The pause is written once the 429 has left the step: calls enqueued before then may still
    # start (they are in flight, as they would be against a real provider).
    wait_until(lambda: _paused_until_ms("llm") is not None)
    t429 = time.monotonic()
    others = [q.enqueue(call, i) for i in range(1, 6)]
    assert first.get_result(timeout_sec=20) == 0
    assert [h.get_result(timeout_sec=20) for h in others] == [1, 2, 3, 4, 5]
    later = [t for i, t in starts if t > t429]
    assert later and min(later) >= t429 + 0.5  # nothing started while the queue was paused
    assert sorted(answered) == [0, 1, 2, 3, 4, 5]  # every call answered exactly once
    assert first.get_status().status == "SUCCESS"


def test_a_request_larger_than_the_whole_limit_fails_without_pausing_the_queue(
    launched: str,
) -> None:
    """The fake server refuses a request larger than its whole token budget with a 429, as
    OpenAI does ("Request too large"). No wait lets it through: the step fails at once, with
    the provider's message, and its queue goes on with the next call instead of pausing for
    the Retry-After and trying again without end."""
    server = FakeLLMServer(latency=0, token_limit=40, period=60).start()
    try:
        q = Queue("llm_too_large")
        calls: list[str] = []

        @DBOS.step(name="too_large_ask")
        def ask(prompt: str) -> str:
            calls.append(prompt)
            return str(chat(prompt, base_url=server.url)["answer"])

        huge = q.enqueue(ask, "word " * 100)
        with pytest.raises(RuntimeError, match="Request too large"):
            huge.get_result(timeout_sec=20)
        assert huge.get_status().status == "ERROR"
        assert calls == ["word " * 100]  # asked once, not retried
        assert _paused_until_ms("llm_too_large") is None
        assert q.enqueue(ask, "short").get_result(timeout_sec=20)
        assert server.stats()["rejected_tokens"] == 1
    finally:
        server.stop()


def test_rate_limit_retries_have_their_own_limit(launched: str) -> None:
    q = Queue("hopeless")
    calls: list[int] = []

    @DBOS.step(max_rate_limit_retries=2)
    def always_limited() -> None:
        calls.append(1)
        raise RateLimited("no", retry_after=0.05)

    with pytest.raises(RateLimited):
        q.enqueue(always_limited).get_result(timeout_sec=10)
    assert len(calls) == 3


def test_http_429_from_common_clients_is_recognized() -> None:
    request = httpx.Request("POST", "http://127.0.0.1/v1/chat/completions")
    limited = httpx.Response(429, headers={"Retry-After": "7"}, request=request)
    error = httpx.HTTPStatusError("429", request=request, response=limited)
    assert rate_limit_delay(error) == 7.0
    ms = httpx.Response(429, headers={"retry-after-ms": "250"}, request=request)
    assert rate_limit_delay(httpx.HTTPStatusError("429", request=request, response=ms)) == 0.25
    bare = httpx.Response(429, request=request)
    assert rate_limit_delay(httpx.HTTPStatusError("429", request=request, response=bare)) == 0.0
    server_error = httpx.Response(500, request=request)
    assert (
        rate_limit_delay(httpx.HTTPStatusError("x", request=request, response=server_error)) is None
    )
    assert rate_limit_delay(ValueError("nope")) is None
    assert rate_limit_delay(RateLimited("x", retry_after=3)) == 3.0


def test_token_budget_with_estimates_and_reported_usage(db_url: str) -> None:
    clock = ManualClock()
    DBOS(config=config(db_url), clock=clock)
    q = Queue("tokens", token_limiter={"limit": 100, "period": 60})
    started: list[int] = []
    real_usage = {0: 10, 1: 10}

    @DBOS.step()
    def complete(i: int) -> int:
        started.append(i)
        DBOS.report_usage(tokens=real_usage.get(i, 40), cost=0.001)
        return i

    DBOS.launch()
    with SetEnqueueOptions(token_estimate=40):
        handles = [q.enqueue(complete, i) for i in range(5)]
    # 40 + 40 fit; a third 40 would make 120. Items 0 and 1 then report 10 each instead: their
    # real usage frees the budget for 2 and 3 (10 + 10 + 40 + 40 = 100), not for 4.
    wait_until(lambda: sorted(started) == [0, 1, 2, 3])
    time.sleep(0.3)
    assert sorted(started) == [0, 1, 2, 3]
    clock.advance(62)  # the window moves on
    assert [h.get_result(timeout_sec=10) for h in handles] == list(range(5))
    status = handles[0].get_status()
    assert status.status == "SUCCESS"
    from dbos_nb.core.runtime import get_runtime

    row = get_runtime().store.get_workflow(handles[2].workflow_id)
    assert row is not None and (row["token_estimate"], row["usage_tokens"]) == (40, 40)
    assert row["usage_cost"] == pytest.approx(0.001)


def test_token_usage_in_batches_and_frames(launched: str) -> None:
    q = Queue("usage", token_limiter={"limit": 10_000, "period": 60})

    @DBOS.step()
    def summarize(text: str) -> str:
        DBOS.report_usage(tokens=len(text) * 10, cost=len(text) * 0.01)
        return text.upper()

    batch = q.map(summarize, ["a", "bb", "ccc"], batch="usage-batch", tokens=lambda t: 50)
    batch.wait(timeout=20, show=False)
    frame = batch.to_pandas()
    assert list(frame["tokens"]) == [10, 20, 30]
    assert list(frame["cost"]) == pytest.approx([0.01, 0.02, 0.03])
    progress = batch.progress()
    assert (progress.tokens, round(progress.cost, 2)) == (60, 0.06)
    assert "60 tokens" in progress.summary()
    with pytest.raises(DbosNbError, match="non-negative"):
        q.map(summarize, ["x"], batch="bad-estimates", tokens=lambda t: -1)
    for bad in (2.5, True, "10", np.int64(2**31)):
        with pytest.raises(DbosNbError, match="non-negative integers"):
            q.map(summarize, ["x"], batch="bad-estimates", tokens=bad)
    # numpy integers (a DataFrame column's values) are integers.
    counted = q.map(summarize, ["y", "z"], batch="np-estimates", tokens=lambda t: np.int64(7))
    counted.wait(timeout=20, show=False)
    from dbos_nb.core.runtime import get_runtime

    row = get_runtime().store.get_workflow("np-estimates/0")
    assert row is not None and row["token_estimate"] == 7


def test_report_usage_outside_a_step_and_bad_limiters(launched: str) -> None:
    @DBOS.workflow()
    def wf() -> None:
        DBOS.report_usage(tokens=5)

    with pytest.raises(DbosNbError, match=r"inside a @DBOS\.step"):
        wf()
    with pytest.raises(InvalidQueueSettingsError, match="token_limiter"):
        Queue("bad_tokens", token_limiter={"limit": 0, "period": 60})
    with pytest.raises(DbosNbError, match="token_estimate"):
        SetEnqueueOptions(token_estimate=-5)
