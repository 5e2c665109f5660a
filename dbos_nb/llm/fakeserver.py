"""A local, OpenAI-compatible fake LLM server with its own rate limits.

It exists so that tests, notebooks and the demo can exercise rate-limited LLM pipelines (queues,
429 back-off, durable retries) without network access, API keys or cost. It speaks just enough of
the OpenAI chat completions protocol for `dbos_nb.llm.client.chat` and the official `openai`
client to work against it:

- `POST /v1/chat/completions`: a deterministic answer derived from a hash of the prompt (the last
  user message), with deterministic token usage, after `latency` seconds.
- `GET /v1/stats`: the server's counters as JSON.

Like a real provider it enforces a request limit and a token limit over a sliding window of
`period` seconds, answering HTTP 429 with a `Retry-After` header when a request would exceed
either. The counters (requests received, answered, rejected, answers per prompt) let a test check
exactly how often a durable pipeline called the model, e.g. that recovery did not re-ask a prompt
whose answer was already recorded.

Only the standard library is used, and the server binds to 127.0.0.1 only: it is a test double,
never something to expose.

Run it by hand with `python -m dbos_nb.llm.fakeserver --port 8000 --requests 10 --period 60`.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import math
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, cast

HOST = "127.0.0.1"
CHAT_PATH = "/v1/chat/completions"
STATS_PATH = "/v1/stats"

# How many prompt words the canned answer quotes.
_QUOTED_WORDS = 8
# OpenAI counts a few tokens of framing per message; a fixed 3 keeps the counts predictable.
_TOKENS_PER_MESSAGE = 3


def _content_text(content: Any) -> str:
    """The text of a message's content: a string, or OpenAI's list of typed parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            str(part.get("text", ""))
            for part in content
            if isinstance(part, dict) and part.get("type") == "text"
        )
    return ""


def make_answer(prompt: str) -> str:
    """The deterministic answer to `prompt`: its first words and a short hash of all of it.

    The hash makes answers to prompts that share their first words differ, so a test can tell
    which prompt an answer belongs to.
    """
    words = prompt.split()
    head = " ".join(words[:_QUOTED_WORDS])
    more = "..." if len(words) > _QUOTED_WORDS else ""
    digest = hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:8]
    return f"Summary: {head}{more} [{digest}]"


def count_prompt_tokens(messages: list[dict[str, Any]]) -> int:
    """Prompt tokens: whitespace words of every message plus a fixed overhead per message."""
    return sum(len(_content_text(m.get("content")).split()) + _TOKENS_PER_MESSAGE for m in messages)


class _BadRequest(Exception):
    """The request body is not a valid chat completions request (answered with 400)."""


class _Admission:
    """The outcome of checking one request against the sliding-window limits."""

    def __init__(self, admitted: bool, limit_type: str = "", wait: float = 0.0, message: str = ""):
        self.admitted = admitted
        self.limit_type = limit_type
        self.wait = wait
        self.message = message


class FakeLLMServer:
    """An OpenAI-compatible chat completions server on 127.0.0.1 with request and token limits.

    `request_limit` and `token_limit` (None: unlimited) apply over a sliding window of `period`
    seconds; a request is counted when it is admitted, with its total tokens (prompt and answer),
    and rejected requests are not counted. Every counter is safe to read from any thread.
    """

    def __init__(
        self,
        *,
        port: int = 0,
        latency: float = 0.05,
        request_limit: int | None = None,
        token_limit: int | None = None,
        period: float = 60.0,
    ) -> None:
        if latency < 0:
            raise ValueError("latency must be >= 0")
        if period <= 0:
            raise ValueError("period must be > 0")
        if request_limit is not None and request_limit < 1:
            raise ValueError("request_limit must be >= 1 or None")
        if token_limit is not None and token_limit < 1:
            raise ValueError("token_limit must be >= 1 or None")
        self._port = port
        self.latency = latency
        self.request_limit = request_limit
        self.token_limit = token_limit
        self.period = period
        # One lock guards the window and the counters; it is never held while sleeping, so
        # concurrent requests overlap their latency.
        self._lock = threading.Lock()
        # Admitted requests in the window: (monotonic admission time, total tokens), oldest first.
        self._window: collections.deque[tuple[float, int]] = collections.deque()
        self._window_tokens = 0
        self._requests_received = 0
        self._answered = 0
        self._rejected = 0
        self._rejected_by_type: dict[str, int] = {"requests": 0, "tokens": 0}
        self._bad_requests = 0
        self._tokens_served = 0
        self._answers_per_prompt: dict[str, int] = {}
        self._in_flight = 0
        self._max_in_flight = 0
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> FakeLLMServer:
        """Bind the port and serve in a background thread; returns self."""
        if self._httpd is not None:
            raise RuntimeError("FakeLLMServer is already started")
        httpd = _HTTPServer((HOST, self._port), _Handler)
        httpd.fake = self
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"fake-llm-server:{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting requests and release the port (requests in flight are not awaited)."""
        httpd, thread = self._httpd, self._thread
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if thread is not None:
            thread.join()
        self._httpd = None
        self._thread = None

    def __enter__(self) -> FakeLLMServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The bound port (the one asked for, or the one the OS chose for port 0)."""
        if self._httpd is None:
            raise RuntimeError("FakeLLMServer is not started")
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        """The OpenAI base URL, e.g. "http://127.0.0.1:8000/v1"."""
        return f"http://{HOST}:{self.port}/v1"

    # -- counters -------------------------------------------------------------------------------

    @property
    def requests_received(self) -> int:
        """Chat completion requests received, whatever their outcome."""
        with self._lock:
            return self._requests_received

    @property
    def answered(self) -> int:
        """Requests answered with HTTP 200."""
        with self._lock:
            return self._answered

    @property
    def rejected(self) -> int:
        """Requests rejected with HTTP 429."""
        with self._lock:
            return self._rejected

    @property
    def answers_per_prompt(self) -> dict[str, int]:
        """A copy of prompt -> number of 200 answers given to it."""
        with self._lock:
            return dict(self._answers_per_prompt)

    @property
    def tokens_served(self) -> int:
        """Total tokens (prompt and completion) of the requests answered."""
        with self._lock:
            return self._tokens_served

    def stats(self) -> dict[str, Any]:
        """A consistent snapshot of every counter and the limits."""
        with self._lock:
            self._expire(time.monotonic())
            return {
                "requests_received": self._requests_received,
                "answered": self._answered,
                "rejected": self._rejected,
                "rejected_requests": self._rejected_by_type["requests"],
                "rejected_tokens": self._rejected_by_type["tokens"],
                "bad_requests": self._bad_requests,
                "tokens_served": self._tokens_served,
                "answers_per_prompt": dict(self._answers_per_prompt),
                "in_flight": self._in_flight,
                "max_in_flight": self._max_in_flight,
                "window_requests": len(self._window),
                "window_tokens": self._window_tokens,
                "request_limit": self.request_limit,
                "token_limit": self.token_limit,
                "period": self.period,
                "latency": self.latency,
            }

    # -- request handling (called from the handler threads) -------------------------------------

    def _expire(self, now: float) -> None:
        # Caller holds the lock.
        while self._window and self._window[0][0] <= now - self.period:
            _, tokens = self._window.popleft()
            self._window_tokens -= tokens

    def _admit(self, tokens: int) -> _Admission:
        """Check a request of `tokens` total tokens against both limits and count it if it fits.

        When it does not fit, the wait is how long until enough of the window expires for it to
        fit under both limits, so that a client retrying after Retry-After is admitted (unless
        others took the room first).
        """
        with self._lock:
            now = time.monotonic()
            self._expire(now)
            waits: dict[str, float] = {}
            messages: dict[str, str] = {}
            entries = list(self._window)
            if self.request_limit is not None and len(entries) >= self.request_limit:
                # The oldest len - limit + 1 entries must expire to leave room for one more.
                oldest_to_go = entries[len(entries) - self.request_limit][0]
                waits["requests"] = oldest_to_go + self.period - now
                messages["requests"] = (
                    f"Rate limit reached for requests: limit {self.request_limit} per "
                    f"{self.period:g}s, used {len(entries)}, requested 1."
                )
            if self.token_limit is not None and self._window_tokens + tokens > self.token_limit:
                if tokens > self.token_limit:
                    # Like OpenAI's "Request too large": it can never fit, but it is still a 429.
                    waits["tokens"] = self.period
                    messages["tokens"] = (
                        f"Request too large for tokens: limit {self.token_limit} per "
                        f"{self.period:g}s, requested {tokens}."
                    )
                else:
                    to_free = self._window_tokens + tokens - self.token_limit
                    freed = 0
                    wait = self.period
                    for admitted_at, entry_tokens in entries:
                        freed += entry_tokens
                        if freed >= to_free:
                            wait = admitted_at + self.period - now
                            break
                    waits["tokens"] = wait
                    messages["tokens"] = (
                        f"Rate limit reached for tokens: limit {self.token_limit} per "
                        f"{self.period:g}s, used {self._window_tokens}, requested {tokens}."
                    )
            if waits:
                # Report the limit that frees last: retrying before then fails anyway.
                limit_type = max(waits, key=lambda k: waits[k])
                wait = max(waits.values())
                self._rejected += 1
                self._rejected_by_type[limit_type] += 1
                return _Admission(
                    False,
                    limit_type,
                    wait,
                    f"{messages[limit_type]} Please try again in {wait:.3f}s.",
                )
            self._window.append((now, tokens))
            self._window_tokens += tokens
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
            return _Admission(True)

    def _count_received(self) -> None:
        with self._lock:
            self._requests_received += 1

    def _count_bad_request(self) -> None:
        with self._lock:
            self._bad_requests += 1

    def _finish(self, prompt: str, tokens: int, answered: bool) -> None:
        # Counted before the response is written, so a client that has its answer sees the counts.
        with self._lock:
            self._in_flight -= 1
            if answered:
                self._answered += 1
                self._tokens_served += tokens
                self._answers_per_prompt[prompt] = self._answers_per_prompt.get(prompt, 0) + 1

    def _complete(self, body: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, str]]:
        """Answer one parsed chat completions request: (status, JSON body, extra headers)."""
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _BadRequest("'messages' must be a non-empty list")
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise _BadRequest("each message must be an object with a string 'role'")
        user_messages = [m for m in messages if m["role"] == "user"]
        if not user_messages:
            raise _BadRequest("'messages' has no user message")
        prompt = _content_text(user_messages[-1].get("content"))
        model = body.get("model", "fake-model")
        if not isinstance(model, str):
            raise _BadRequest("'model' must be a string")
        max_tokens = body.get("max_tokens")
        if max_tokens is not None and (
            not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1
        ):
            raise _BadRequest("'max_tokens' must be a positive integer")

        answer = make_answer(prompt)
        finish_reason = "stop"
        answer_words = answer.split()
        if max_tokens is not None and len(answer_words) > max_tokens:
            # As a real model does, a short max_tokens cuts the answer and says so.
            answer = " ".join(answer_words[:max_tokens])
            finish_reason = "length"
        prompt_tokens = count_prompt_tokens(messages)
        completion_tokens = len(answer.split())
        total_tokens = prompt_tokens + completion_tokens

        admission = self._admit(total_tokens)
        if not admission.admitted:
            retry_after = max(1, math.ceil(admission.wait))
            error = {
                "error": {
                    "message": admission.message,
                    "type": admission.limit_type,
                    "param": None,
                    "code": "rate_limit_exceeded",
                }
            }
            return 429, error, {"Retry-After": str(retry_after)}

        answered = False
        try:
            # Sleep without the lock: concurrent requests overlap like at a real provider.
            time.sleep(self.latency)
            digest = hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:12]
            response = {
                "id": f"chatcmpl-fake-{digest}-{time.monotonic_ns() % 10**9:09d}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": answer},
                        "finish_reason": finish_reason,
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": total_tokens,
                },
            }
            answered = True
            return 200, response, {}
        finally:
            self._finish(prompt, total_tokens, answered)


class _HTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer that knows its FakeLLMServer and accepts bursts of connections."""

    # The default backlog of 5 drops SYNs when many clients connect at once, which adds
    # retransmission delays of a second or more and spoils concurrency measurements.
    request_queue_size = 128
    daemon_threads = True
    fake: FakeLLMServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hung up (e.g. it timed out) is not worth a traceback on stderr.
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    """Routes the few endpoints; keep-alive (HTTP/1.1) so pooled clients like httpx work well."""

    protocol_version = "HTTP/1.1"
    server_version = "FakeLLM/1.0"

    @property
    def _fake(self) -> FakeLLMServer:
        return cast(_HTTPServer, self.server).fake

    def log_message(self, format: str, *args: Any) -> None:
        # Silent: a log line per request would flood test output and notebooks.
        return

    def _send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _send_error_json(self, status: int, message: str, error_type: str) -> None:
        self._send_json(
            status,
            {"error": {"message": message, "type": error_type, "param": None, "code": None}},
        )

    def _read_body(self) -> bytes:
        # Always drain the body, even for requests that fail, so the kept-alive connection stays
        # in sync for the next request.
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == STATS_PATH:
            self._send_json(200, self._fake.stats())
        else:
            self._send_error_json(404, f"unknown path {path}", "not_found")

    def do_POST(self) -> None:
        raw = self._read_body()
        path = self.path.split("?", 1)[0]
        if path != CHAT_PATH:
            self._send_error_json(404, f"unknown path {path}", "not_found")
            return
        fake = self._fake
        fake._count_received()
        try:
            try:
                body = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise _BadRequest(f"body is not valid JSON: {e}") from e
            if not isinstance(body, dict):
                raise _BadRequest("body must be a JSON object")
            status, payload, headers = fake._complete(body)
        except _BadRequest as e:
            fake._count_bad_request()
            self._send_error_json(400, str(e), "invalid_request_error")
            return
        self._send_json(status, payload, headers)


def main(argv: list[str] | None = None) -> None:
    """Serve until Ctrl-C, printing the base URL first (and the counters at the end)."""
    parser = argparse.ArgumentParser(
        prog="python -m dbos_nb.llm.fakeserver",
        description="A local OpenAI-compatible fake LLM server with rate limits (127.0.0.1 only).",
    )
    parser.add_argument("--port", type=int, default=8000, help="port (0: any free port)")
    parser.add_argument("--latency", type=float, default=0.05, help="seconds per answer")
    parser.add_argument("--requests", type=int, default=None, help="requests per period")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per period")
    parser.add_argument("--period", type=float, default=60.0, help="window in seconds")
    args = parser.parse_args(argv)
    server = FakeLLMServer(
        port=args.port,
        latency=args.latency,
        request_limit=args.requests,
        token_limit=args.tokens,
        period=args.period,
    )
    server.start()
    # The URL alone on the first line, flushed, so scripts (and the tests) can read it.
    print(server.url, flush=True)
    print(
        f"fake LLM server: latency {args.latency:g}s, requests {args.requests or 'unlimited'}, "
        f"tokens {args.tokens or 'unlimited'} per {args.period:g}s; Ctrl-C to stop",
        flush=True,
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        stats = server.stats()
        print(
            f"\nstopped: {stats['requests_received']} requests, {stats['answered']} answered, "
            f"{stats['rejected']} rejected, {stats['tokens_served']} tokens served",
            flush=True,
        )


if __name__ == "__main__":
    main()
