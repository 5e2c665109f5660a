"""`dbos-nb demo`: a batch of LLM calls under a rate limit, durable, offline, in a terminal.

It starts the local fake LLM server (with its own limit of 100 requests per second), declares a
queue that stays just under that limit, and maps a few hundred prompts onto it on a SQLite file.
Progress shows in the terminal; a summary follows. Interrupt it with Ctrl-C and run it again: it
resumes, and the calls already answered are not made again (the summary counts the server's calls).
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from typing import Any

from dbos_nb.dbos import DBOS
from dbos_nb.llm.client import chat
from dbos_nb.llm.fakeserver import FakeLLMServer
from dbos_nb.notebook.batch import Batch, Queue
from dbos_nb.notebook.views import progress_text

SERVER_LIMIT = 100  # requests per second the fake provider accepts
QUEUE_LIMIT = 90  # what we allow ourselves: just under it, so no call is refused
PRICE_PER_TOKEN = 0.000002

# Set at start-up: the fake server's address changes from run to run, so it is not an input
# of the workflows (inputs are what identify a batch's items).
_base_url = ""


@DBOS.step(name="demo_summarize", retries_allowed=True, max_attempts=3, interval_seconds=0.2)
def summarize(prompt: str) -> dict[str, Any]:
    """One paid call: once answered and checkpointed, never made again."""
    reply = chat(prompt, base_url=_base_url)
    DBOS.report_usage(tokens=reply["total_tokens"], cost=reply["total_tokens"] * PRICE_PER_TOKEN)
    return {"answer": reply["answer"], "tokens": reply["total_tokens"]}


def prompts(count: int) -> list[str]:
    topics = ["graph neural networks", "protein folding", "sparse attention", "causal inference"]
    return [
        f"Summarize paper {i} on {topics[i % len(topics)]} in one sentence." for i in range(count)
    ]


def run_demo(db: str, items: int, out: Any = sys.stdout) -> int:
    """Run (or resume) the demo batch; returns the exit code."""
    global _base_url
    logging.getLogger("dbos_nb").setLevel(logging.WARNING)
    if threading.current_thread() is threading.main_thread():
        # Ctrl-C and SIGTERM interrupt the watch loop, even when SIGINT was ignored at start-up
        # (as for background jobs of a shell).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    with FakeLLMServer(latency=0.05, request_limit=SERVER_LIMIT, period=1.0) as server:
        _base_url = server.url
        DBOS(config={"name": "dbos_nb_demo", "system_database_url": db})
        # Whatever ends the run (Ctrl-C, a closed stdout, a failed launch, a bug), DBOS is
        # destroyed: otherwise its executor row stays behind and other processes see a live
        # executor until its lease runs out.
        try:
            queue = Queue("demo_llm", concurrency=32, limiter={"limit": QUEUE_LIMIT, "period": 1.0})
            DBOS.launch()
            started = time.monotonic()
            try:
                batch = queue.map(summarize, prompts(items), batch=f"demo-{items}")
                print(
                    f"dbos_nb demo: {items} prompts to a local fake LLM limited to "
                    f"{SERVER_LIMIT} requests/s; the queue allows {QUEUE_LIMIT}/s. Database: {db}",
                    file=out,
                )
                _watch(batch, out)
            except KeyboardInterrupt:
                # Running calls get a moment to finish and be recorded; the rest go back to
                # the queue. Destroyed before the count, so that it includes those calls.
                DBOS.destroy(workflow_completion_timeout_sec=5)
                print(
                    f"\ninterrupted: the server answered {server.stats()['answered']} calls in "
                    "this run. Run `dbos-nb demo` again to resume: answered prompts are not sent "
                    "again.",
                    file=out,
                )
                return 130
            elapsed = time.monotonic() - started
            _summary(batch, server, elapsed, out)
        finally:
            DBOS.destroy()  # a no-op after the destroy of an interruption
    return 0


def _watch(batch: Batch, out: Any) -> None:
    interactive = bool(getattr(out, "isatty", lambda: False)())
    last = ""
    while True:
        progress = batch.progress(errors=0)
        line = progress_text(progress).splitlines()[0]
        if interactive:
            print("\r" + line, end="", file=out, flush=True)
        elif line != last and (progress.complete or int(time.monotonic() * 2) % 4 == 0):
            print(line, file=out, flush=True)
            last = line
        if progress.complete:
            if interactive:
                print(file=out)
            return
        time.sleep(0.25)


def _summary(batch: Batch, server: FakeLLMServer, elapsed: float, out: Any) -> None:
    progress = batch.progress(errors=3)
    stats = server.stats()
    print(
        f"done: {progress.counts['done']} answered, {progress.counts['failed']} failed, "
        f"in {elapsed:.1f} s\n"
        f"calls to the server in this run: {stats['answered']} answered, "
        f"{stats['rejected']} refused with 429\n"
        f"tokens: {progress.tokens:,}, cost: ${progress.cost:.4f}\n"
        "first answers:",
        file=out,
    )
    for index, result in enumerate(batch.results(errors="return")[:3]):
        answer = result["answer"] if isinstance(result, dict) else "-"
        print(f"  {index:>4}  {answer}", file=out)
    for wid, message in progress.recent_errors:
        print(f"  error in {wid}: {message}", file=out)
    print("Run it again: everything is recorded, so nothing is sent twice.", file=out)
