"""The fake LLM server and the stdlib chat client, over real HTTP on loopback.

The server is what the rate-limit and durability tests of the pipelines lean on, so its answers,
counters and limits are checked exactly here; the client is also checked against a stub that
answers the way the real OpenAI API does (bearer auth, retry-after-ms, HTTP-date Retry-After,
non-JSON errors).
"""

from __future__ import annotations

import email.utils
import json
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from dbos_nb.errors import RateLimited
from dbos_nb.llm.client import chat
from dbos_nb.llm.fakeserver import FakeLLMServer, make_answer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def make_server() -> Iterator[Callable[..., FakeLLMServer]]:
    servers: list[FakeLLMServer] = []

    def make(**kwargs: Any) -> FakeLLMServer:
        server = FakeLLMServer(**kwargs).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


def post(url: str, body: Any, *, raw: bytes | None = None) -> tuple[int, dict[str, str], Any]:
    """POST JSON (or raw bytes); returns (status, headers, decoded JSON body) even for errors."""
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def completion_body(prompt: str, **extra: Any) -> dict[str, Any]:
    return {"model": "fake-model", "messages": [{"role": "user", "content": prompt}], **extra}


def expected_usage(prompt: str) -> tuple[int, int]:
    """(prompt_tokens, completion_tokens) of a one-user-message request, by the documented rule."""
    return len(prompt.split()) + 3, len(make_answer(prompt).split())


# -- answers --------------------------------------------------------------------------------------


def test_answers_are_deterministic_with_openai_shape_and_usage(
    make_server: Callable[..., FakeLLMServer],
) -> None:
    server = make_server(latency=0.01)
    prompt = "The quick brown fox jumps over the lazy dog near the river bank"
    status, _, body = post(server.url + "/chat/completions", completion_body(prompt))
    assert status == 200
    assert body["object"] == "chat.completion"
    assert body["model"] == "fake-model"
    assert isinstance(body["created"], int) and body["id"].startswith("chatcmpl-")
    [choice] = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "stop"
    assert choice["message"]["role"] == "assistant"
    answer = choice["message"]["content"]
    assert re.fullmatch(
        r"Summary: The quick brown fox jumps over the lazy\.\.\. \[[0-9a-f]{8}\]", answer
    )
    prompt_tokens, completion_tokens = expected_usage(prompt)
    assert prompt_tokens == 16 and completion_tokens == 10
    assert body["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }

    # Same prompt, same answer (through the client this time); a different prompt differs even
    # when its first words are the same.
    again = chat(prompt, base_url=server.url)
    assert again == {
        "answer": answer,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    other = chat(prompt + " today", base_url=server.url)["answer"]
    assert other != answer and other.split("[")[0] == answer.split("[")[0]

    assert server.requests_received == 3
    assert server.answered == 3
    assert server.rejected == 0
    assert server.answers_per_prompt == {prompt: 2, prompt + " today": 1}
    assert server.tokens_served == 2 * (prompt_tokens + completion_tokens) + sum(
        expected_usage(prompt + " today")
    )


def test_prompt_is_last_user_message_and_all_messages_count(
    make_server: Callable[..., FakeLLMServer],
) -> None:
    server = make_server(latency=0)
    messages = [
        {"role": "system", "content": "You summarize text"},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "an earlier answer"},
        {"role": "user", "content": [{"type": "text", "text": "second question here"}]},
    ]
    status, _, body = post(server.url + "/chat/completions", {"model": "m", "messages": messages})
    assert status == 200
    assert body["choices"][0]["message"]["content"] == make_answer("second question here")
    assert body["usage"]["prompt_tokens"] == (3 + 2 + 3 + 3) + 4 * 3
    assert server.answers_per_prompt == {"second question here": 1}


def test_max_tokens_cuts_the_answer(make_server: Callable[..., FakeLLMServer]) -> None:
    server = make_server(latency=0)
    status, _, body = post(server.url + "/chat/completions", completion_body("a b c", max_tokens=2))
    assert status == 200
    assert body["choices"][0]["message"]["content"] == "Summary: a"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 2


def test_latency_is_applied(make_server: Callable[..., FakeLLMServer]) -> None:
    server = make_server(latency=0.3)
    started = time.monotonic()
    chat("hello", base_url=server.url)
    assert time.monotonic() - started >= 0.3


# -- concurrency ----------------------------------------------------------------------------------


def test_concurrent_requests_overlap_and_counters_are_exact(
    make_server: Callable[..., FakeLLMServer],
) -> None:
    latency = 0.5
    n = 20
    server = make_server(latency=latency)
    barrier = threading.Barrier(n)
    results: dict[int, dict[str, Any]] = {}
    errors: list[BaseException] = []

    def ask(i: int) -> None:
        barrier.wait()
        try:
            results[i] = chat(f"prompt number {i}", base_url=server.url)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(n)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started

    assert not errors
    # Serialized, 20 requests would take 10 s; overlapping, about one latency.
    assert latency <= elapsed < 2 * latency, elapsed
    assert {i: r["answer"] for i, r in results.items()} == {
        i: make_answer(f"prompt number {i}") for i in range(n)
    }
    stats = server.stats()
    assert stats["max_in_flight"] == n
    assert stats["in_flight"] == 0
    assert server.requests_received == n and server.answered == n and server.rejected == 0
    assert server.answers_per_prompt == {f"prompt number {i}": 1 for i in range(n)}
    assert server.tokens_served == sum(r["total_tokens"] for r in results.values())


# -- limits ---------------------------------------------------------------------------------------


def test_request_limit_answers_429_with_retry_after(
    make_server: Callable[..., FakeLLMServer],
) -> None:
    server = make_server(latency=0, request_limit=3, period=2.5)
    for i in range(3):
        assert chat(f"q{i}", base_url=server.url)["answer"] == make_answer(f"q{i}")

    status, headers, body = post(server.url + "/chat/completions", completion_body("q3"))
    assert status == 429
    # The oldest of the window was admitted a moment ago, so it frees in just under 2.5 s.
    assert headers["Retry-After"] == "3"
    assert body["error"]["type"] == "requests"
    assert body["error"]["code"] == "rate_limit_exceeded"
    assert "limit 3" in body["error"]["message"]

    with pytest.raises(RateLimited) as info:
        chat("q4", base_url=server.url)
    assert info.value.retry_after == 3.0
    assert "429" in str(info.value) and "requests" in str(info.value)

    assert server.requests_received == 5
    assert server.answered == 3
    assert server.rejected == 2
    assert server.answers_per_prompt == {"q0": 1, "q1": 1, "q2": 1}
    assert server.stats()["rejected_requests"] == 2


def test_token_limit_answers_429_of_type_tokens(
    make_server: Callable[..., FakeLLMServer],
) -> None:
    prompt = "one two three"
    total = sum(expected_usage(prompt))  # 3 + 3 prompt, 5 completion tokens
    assert total == 11
    # Room for two such requests, not three; requests are not limited.
    server = make_server(latency=0, token_limit=2 * total + 5, period=1.5)
    assert chat(prompt, base_url=server.url)["total_tokens"] == total
    assert chat(prompt, base_url=server.url)["total_tokens"] == total

    status, headers, body = post(server.url + "/chat/completions", completion_body(prompt))
    assert status == 429
    assert headers["Retry-After"] == "2"
    assert body["error"]["type"] == "tokens"
    assert body["error"]["code"] == "rate_limit_exceeded"

    # A smaller request (one word: 4 + 3 tokens) does not fit in the 5 tokens left either.
    assert sum(expected_usage("x")) == 7
    with pytest.raises(RateLimited) as info:
        chat("x", base_url=server.url)
    assert info.value.retry_after == 2.0
    assert server.stats()["rejected_tokens"] == 2
    assert server.tokens_served == 2 * total

    # A request larger than the whole budget is refused like OpenAI's "Request too large".
    big = make_server(latency=0, token_limit=10, period=0.5)
    status, headers, body = post(big.url + "/chat/completions", completion_body("w " * 20))
    assert status == 429 and body["error"]["type"] == "tokens"
    assert "too large" in body["error"]["message"]
    assert headers["Retry-After"] == "1"


def test_window_frees_after_period_and_rejections_do_not_count(
    make_server: Callable[..., FakeLLMServer],
) -> None:
    period = 0.5
    server = make_server(latency=0, request_limit=2, period=period)
    started = time.monotonic()
    chat("a", base_url=server.url)
    chat("b", base_url=server.url)
    # Rejections keep coming while the window is full; if they were counted, the window would
    # stay full past the period.
    rejections = 0
    while time.monotonic() - started < period - 0.1:
        with pytest.raises(RateLimited) as info:
            chat("c", base_url=server.url)
        assert info.value.retry_after == 1.0  # ceil, at least 1 s
        rejections += 1
        time.sleep(0.02)
    assert rejections >= 3
    time.sleep(max(0.0, started + period + 0.05 - time.monotonic()))
    assert chat("c", base_url=server.url)["answer"] == make_answer("c")
    assert chat("d", base_url=server.url)["answer"] == make_answer("d")
    with pytest.raises(RateLimited):
        chat("e", base_url=server.url)
    assert server.answered == 4
    assert server.rejected == rejections + 1
    assert server.answers_per_prompt == {"a": 1, "b": 1, "c": 1, "d": 1}


def test_concurrent_burst_admits_exactly_the_limit(
    make_server: Callable[..., FakeLLMServer],
) -> None:
    server = make_server(latency=0.2, request_limit=5, period=30)
    barrier = threading.Barrier(12)
    outcomes: list[str] = []
    lock = threading.Lock()

    def ask(i: int) -> None:
        barrier.wait()
        try:
            chat(f"burst {i}", base_url=server.url)
            outcome = "ok"
        except RateLimited:
            outcome = "429"
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["429"] * 7 + ["ok"] * 5
    assert server.answered == 5 and server.rejected == 7 and server.requests_received == 12


# -- other endpoints and bad requests -------------------------------------------------------------


def test_stats_endpoint(make_server: Callable[..., FakeLLMServer]) -> None:
    server = make_server(latency=0, request_limit=1, token_limit=1000, period=10)
    chat("hello there", base_url=server.url)
    with pytest.raises(RateLimited):
        chat("again", base_url=server.url)
    status, stats = get(server.url + "/stats")
    assert status == 200
    assert stats == server.stats()
    assert stats["requests_received"] == 2
    assert stats["answered"] == 1
    assert stats["rejected"] == 1
    assert stats["answers_per_prompt"] == {"hello there": 1}
    assert stats["tokens_served"] == sum(expected_usage("hello there"))
    assert stats["window_requests"] == 1
    assert stats["request_limit"] == 1 and stats["token_limit"] == 1000 and stats["period"] == 10


def test_bad_requests_get_400_and_unknown_paths_404(
    make_server: Callable[..., FakeLLMServer],
) -> None:
    server = make_server(latency=0)
    chat_url = server.url + "/chat/completions"
    cases: list[tuple[Any, bytes | None]] = [
        (None, b"{not json"),
        ({"model": "m"}, None),
        ({"model": "m", "messages": []}, None),
        ({"model": "m", "messages": [{"role": "system", "content": "no user"}]}, None),
        ({"model": "m", "messages": ["just a string"]}, None),
        ([1, 2, 3], None),
        (completion_body("x", max_tokens=0), None),
    ]
    for body, raw in cases:
        status, _, error = post(chat_url, body, raw=raw)
        assert status == 400, body
        assert error["error"]["type"] == "invalid_request_error"
        assert error["error"]["message"]

    status, _, error = post(server.url + "/completions", completion_body("x"))
    assert status == 404 and error["error"]["type"] == "not_found"
    status, error = get(server.url + "/models")
    assert status == 404
    with pytest.raises(RuntimeError, match=r"HTTP 404 .*not_found"):
        chat("x", base_url=server.url + "/nowhere")

    stats = server.stats()
    assert stats["bad_requests"] == len(cases)
    assert stats["answered"] == 0 and stats["rejected"] == 0
    # The server is still fine after all that.
    assert chat("still alive", base_url=server.url)["answer"] == make_answer("still alive")


def test_server_lifecycle() -> None:
    server = FakeLLMServer(latency=0)
    with pytest.raises(RuntimeError, match="not started"):
        _ = server.url
    with server:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v1", server.url)
        assert server.port > 0
        url = server.url
        chat("x", base_url=url)
    with pytest.raises(urllib.error.URLError):
        chat("x", base_url=url, timeout=2)
    server.stop()  # idempotent
    with pytest.raises(ValueError):
        FakeLLMServer(request_limit=0)
    with pytest.raises(ValueError):
        FakeLLMServer(period=0)


# -- the client against an OpenAI-like stub -------------------------------------------------------


class _Stub(BaseHTTPRequestHandler):
    """Answers each POST with the next scripted (status, headers, body) and records requests."""

    script: list[tuple[int, dict[str, str], bytes]] = []
    seen: list[dict[str, Any]] = []

    def log_message(self, format: str, *args: Any) -> None:
        return

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        type(self).seen.append(
            {
                "path": self.path,
                "authorization": self.headers.get("Authorization"),
                "body": json.loads(self.rfile.read(length)),
            }
        )
        status, headers, body = type(self).script.pop(0)
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def stub() -> Iterator[tuple[str, type[_Stub]]]:
    handler = type("Stub", (_Stub,), {"script": [], "seen": []})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1/", handler
    finally:
        httpd.shutdown()
        httpd.server_close()


def _json(payload: Any) -> bytes:
    return json.dumps(payload).encode()


def test_client_speaks_openai_protocol(stub: tuple[str, type[_Stub]]) -> None:
    base_url, handler = stub
    openai_error = {"error": {"message": "slow down", "type": "requests", "code": "x"}}
    future = email.utils.formatdate(time.time() + 30, usegmt=True)
    handler.script = [
        (
            200,
            {"Content-Type": "application/json"},
            _json(
                {
                    "choices": [{"message": {"role": "assistant", "content": "hi"}}],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
                }
            ),
        ),
        (429, {"retry-after-ms": "1500", "Retry-After": "2"}, _json(openai_error)),
        (429, {"Retry-After": future}, _json(openai_error)),
        (429, {}, b"plain text"),
        (
            429,
            {"Retry-After": "5"},
            _json({"error": {"message": "You exceeded your quota", "code": "insufficient_quota"}}),
        ),
        (
            429,
            {"Retry-After": "60"},
            _json(
                {
                    "error": {
                        "message": "Request too large for gpt-4o-mini on tokens per min (TPM): "
                        "Limit 200000, Requested 250000.",
                        "type": "tokens",
                        "code": "rate_limit_exceeded",
                    }
                }
            ),
        ),
        (500, {}, b"internal kaboom " + b"x" * 2000),
        (200, {}, b"not json"),
    ]
    result = chat("hello", base_url=base_url, model="gpt-4o-mini", api_key="sk-test", max_tokens=7)
    assert result == {"answer": "hi", "prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}
    seen = handler.seen[0]
    # A trailing slash on base_url does not double the separator.
    assert seen["path"] == "/v1/chat/completions"
    assert seen["authorization"] == "Bearer sk-test"
    assert seen["body"] == {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 7,
    }

    with pytest.raises(RateLimited, match="slow down") as info:
        chat("x", base_url=base_url)
    assert info.value.retry_after == 1.5  # retry-after-ms wins: it is more precise
    assert handler.seen[1]["authorization"] is None
    with pytest.raises(RateLimited) as info:
        chat("x", base_url=base_url)
    assert info.value.retry_after is not None and 25 < info.value.retry_after <= 30
    with pytest.raises(RateLimited, match="plain text") as info:
        chat("x", base_url=base_url)
    assert info.value.retry_after is None
    # Out of credit is a 429 that waiting does not cure: not RateLimited.
    with pytest.raises(RuntimeError, match=r"HTTP 429.*insufficient_quota"):
        chat("x", base_url=base_url)
    # So is a request larger than the whole limit: it would be refused at every retry.
    with pytest.raises(RuntimeError, match=r"HTTP 429.*Request too large"):
        chat("x", base_url=base_url)
    with pytest.raises(RuntimeError, match=r"HTTP 500.*internal kaboom") as error:
        chat("x", base_url=base_url)
    assert len(str(error.value)) < 700
    with pytest.raises(RuntimeError, match="unexpected chat completions response"):
        chat("x", base_url=base_url)


# -- CLI ------------------------------------------------------------------------------------------


def test_cli_serves_until_stopped() -> None:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dbos_nb.llm.fakeserver",
            "--port",
            "0",
            "--latency",
            "0",
            "--requests",
            "1",
            "--period",
            "30",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v1", url), url
        assert chat("from the cli", base_url=url)["answer"] == make_answer("from the cli")
        # --requests 1 took effect.
        with pytest.raises(RateLimited) as info:
            chat("second", base_url=url)
        assert info.value.retry_after is not None and info.value.retry_after >= 29
        status, stats = get(url + "/stats")
        assert status == 200 and stats["answered"] == 1 and stats["rejected"] == 1
    finally:
        process.terminate()
        process.wait(timeout=5)
