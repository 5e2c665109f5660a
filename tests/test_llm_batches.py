"""Batches of calls to the fake LLM server under limits, and a token budget shared by processes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from test_workers import WorkerPool

from conftest import config
from dbos_nb import DBOS, Queue
from dbos_nb.llm.client import chat
from dbos_nb.llm.fakeserver import FakeLLMServer

SERVER: dict[str, str] = {}


@DBOS.step(name="llm_ask")
def ask(prompt: str) -> dict[str, object]:
    reply = chat(prompt, base_url=SERVER["url"])
    DBOS.report_usage(tokens=int(reply["total_tokens"]))
    return reply


def test_limits_just_under_the_servers_never_get_a_429(launched: str) -> None:
    with FakeLLMServer(latency=0.02, request_limit=50, period=1.0) as server:
        SERVER["url"] = server.url
        q = Queue("under", concurrency=10, limiter={"limit": 45, "period": 1.0})
        prompts = [f"question {i}" for i in range(300)]
        batch = q.map(ask, prompts, batch="under")
        batch.wait(timeout=60, show=False)
        frame = batch.to_pandas()
        stats = server.stats()
    assert stats["rejected"] == 0
    assert stats["answers_per_prompt"] == dict.fromkeys(prompts, 1)  # each answered exactly once
    assert set(frame["status"].astype(str)) == {"SUCCESS"}
    span = (frame["started"].max() - frame["started"].min()).total_seconds()
    allowed = (math.ceil(300 / 45) - 1) * 1.0  # the windows the limit needs after the first
    # The budget is used: a limiter that idled a period in each window would take ~12 s. The
    # slack absorbs a loaded machine's scheduling delays (this is no speed measurement).
    assert span <= allowed + 1.5, (span, allowed)


def test_limits_above_the_servers_are_absorbed_by_the_shared_back_off(launched: str) -> None:
    with FakeLLMServer(latency=0.02, request_limit=20, period=1.0) as server:
        SERVER["url"] = server.url
        q = Queue("over", concurrency=10, limiter={"limit": 60, "period": 1.0})
        prompts = [f"prompt {i}" for i in range(60)]
        batch = q.map(ask, prompts, batch="over")
        batch.wait(timeout=90, show=False)
        frame = batch.to_pandas(expand=True)
        stats = server.stats()
    assert stats["rejected"] > 0  # the provider did push back
    assert stats["answers_per_prompt"] == dict.fromkeys(prompts, 1)  # no call made twice
    assert set(frame["status"].astype(str)) == {"SUCCESS"}  # 429s are not errors
    assert list(frame["answer"]) == [chat_answer(server_prompt) for server_prompt in prompts]


def chat_answer(prompt: str) -> str:
    with FakeLLMServer(latency=0.0) as server:
        return str(chat(prompt, base_url=server.url)["answer"])


def test_two_processes_share_one_token_budget(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    limit, per_task = 100, 25
    DBOS(config=config(db_url, listen_queues=[]))
    q = Queue("budget", token_limiter={"limit": limit, "period": 1.0})
    DBOS.launch()
    pool = WorkerPool(db_url, tmp_path / "events.log")
    monkeypatch.setenv("WORKER_TASKS_TOKENS", str(per_task))
    try:
        for name in ("t1", "t2"):
            pool.start(name, sleep=0.01)
        pool.wait_registered(["t1", "t2"])
        from worker_tasks import wt_tokens

        handles = q.enqueue_many(wt_tokens, range(24), batch_id="tok", tokens=per_task)
        assert [h.get_result(timeout_sec=60) for h in handles] == list(range(24))
    finally:
        pool.stop_all()
    starts = sorted(e[2] for e in pool.events())
    assert len(starts) == 24
    for i, s in enumerate(starts):
        in_window = sum(1 for t in starts[i:] if t < s + 1.0)
        assert in_window * per_task <= limit, f"{in_window * per_task} tokens within 1 s"
    assert {e[4] for e in pool.events()} == {"t1", "t2"}
