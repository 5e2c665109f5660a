"""A/B: this checkout's dbos_nb against another revision, on bench_queues' measurement 1.

Measurement 1 is the throughput of one-step workflows enqueued one by one through a queue without
limits (`bench_queues.run_round`). Each run is a new process on a fresh database; the two sides
take turns (A B, then B A, ...), since this machine's speed drifts by a fifth over minutes and a
change worth a few percent only shows over many alternating runs. Prints every run, then each
side's mean and median throughput and CPU per workflow, and how many turns each side won.

    python benchmarks/bench_ab.py --base HEAD          # uncommitted changes against the last commit
    python benchmarks/bench_ab.py --base main~3 --runs 12 --backend sqlite

The base revision's `dbos_nb/` is exported (`git archive`) to a temporary folder and put first on
the measuring process's PYTHONPATH; this checkout's is put there the same way, so each side runs
the package it names, whatever is installed.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from bench_common import REPO_ROOT, PostgresTarget, run_measurement, sqlite_dir
from bench_queues import Settings

BENCH_QUEUES = Path(__file__).resolve().parent / "bench_queues.py"


@dataclass(frozen=True)
class Side:
    """One of the two versions: a label and the folder that holds its `dbos_nb` package."""

    label: str
    root: Path

    def env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(self.root)}


def _git(*args: str) -> bytes:
    return subprocess.run(
        ["git", "-C", str(REPO_ROOT), *args], check=True, capture_output=True
    ).stdout


@contextmanager
def exported(revision: str) -> Iterator[Side]:
    """The package as of `revision`, exported to a temporary folder for the block."""
    try:
        sha = _git("rev-parse", "--verify", f"{revision}^{{commit}}").decode().strip()
    except subprocess.CalledProcessError:
        raise SystemExit(f"not a revision of this repository: {revision!r}") from None
    folder = Path(tempfile.mkdtemp(prefix="dbos_nb_ab_"))
    try:
        archive = _git("archive", "--format=tar", sha, "dbos_nb")
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            if hasattr(tarfile, "data_filter"):  # Python 3.11.4+: refuse odd members
                tar.extractall(folder, filter="data")
            else:
                tar.extractall(folder)  # our own repository's archive
        yield Side(f"{revision} ({sha[:9]})", folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def check_import(side: Side) -> None:
    """Fail unless the measuring process really imports this side's package."""
    probe = "import dbos_nb, sys; sys.stdout.write(dbos_nb.__file__)"
    found = subprocess.run(
        [sys.executable, "-c", probe],
        env=side.env(),
        capture_output=True,
        text=True,
        check=True,
        cwd=tempfile.gettempdir(),  # as the measurement runs: not from this checkout's folder
    ).stdout
    if not Path(found).resolve().is_relative_to(side.root.resolve()):
        raise SystemExit(f"{side.label}: imported {found}, not the package under {side.root}")


def measure(side: Side, url: str, settings: Settings) -> dict[str, Any]:
    cmd = [sys.executable, str(BENCH_QUEUES), "--worker", "dbos_nb", "--mode", "round"]
    cmd += ["--url", url, "--settings", json.dumps(asdict(settings))]
    figures, error = run_measurement(cmd, env=side.env())
    if figures is None:
        raise SystemExit(f"{side.label}: the run failed: {error}")
    # The measuring process itself says which package it ran (a probe alone did not catch a
    # path that the measurement changed).
    if not Path(figures["package"]).is_relative_to(side.root.resolve()):
        raise SystemExit(f"{side.label}: measured {figures['package']}, not {side.root}")
    return figures


def alternate(
    sides: tuple[Side, Side], runs: int, fresh_url: Callable[[str], str], settings: Settings
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """`runs` turns; in each, both sides once, the first one alternating."""
    turns = []
    for turn in range(runs):
        order = (0, 1) if turn % 2 == 0 else (1, 0)
        figures: dict[int, dict[str, Any]] = {}
        for index in order:
            figures[index] = measure(sides[index], fresh_url(f"ab{index}"), settings)
        turns.append((figures[0], figures[1]))
        a, b = figures[0], figures[1]
        print(
            f"  turn {turn + 1:2d}: {a['tp_total']:7,.0f} vs {b['tp_total']:7,.0f} wf/s, "
            f"CPU {a['tp_cpu_us']:5,.0f} vs {b['tp_cpu_us']:5,.0f} us/wf",
            flush=True,
        )
    return turns


def summary(sides: tuple[Side, Side], turns: list[tuple[dict[str, Any], dict[str, Any]]]) -> str:
    lines = []
    for key, name, unit in (("tp_total", "throughput", "wf/s"), ("tp_cpu_us", "CPU", "us/wf")):
        values = [[t[i][key] for t in turns] for i in (0, 1)]
        for side, series in zip(sides, values, strict=True):
            lines.append(
                f"{name:10s} {side.label:28s} mean {statistics.mean(series):7,.0f}  "
                f"median {statistics.median(series):7,.0f} {unit}"
            )
        ratio = statistics.median(values[1]) / statistics.median(values[0])
        lines.append(f"{name:10s} B/A, medians: {ratio:.3f}")
    wins = sum(b["tp_total"] > a["tp_total"] for a, b in turns)
    lines.append(f"B faster in {wins} of {len(turns)} turns (A = {sides[0].label})")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--base", required=True, help="the revision to compare with (A)")
    parser.add_argument("--runs", type=int, default=8, help="turns of one run each (default 8)")
    parser.add_argument("--backend", choices=["sqlite", "postgres"], default="postgres")
    parser.add_argument("--workflows", type=int, default=2000, help="per run (default 2000)")
    parser.add_argument(
        "--worker-concurrency",
        type=int,
        help="give the queue this worker_concurrency (default: a queue without limits)",
    )
    parser.add_argument("--tmpdir", help="where the SQLite files and PostgreSQL data go")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.workflows < 1:
        parser.error("--runs and --workflows must be at least 1")
    if args.worker_concurrency is not None and args.worker_concurrency < 1:
        parser.error("--worker-concurrency must be at least 1")
    settings = replace(
        Settings.for_mode(False),
        throughput=args.workflows,
        round_worker_concurrency=args.worker_concurrency,
    )
    current = Side("this checkout", REPO_ROOT)
    with exported(args.base) as base:
        sides = (base, current)
        for side in sides:
            check_import(side)
        queue = (
            "a queue without limits"
            if args.worker_concurrency is None
            else f"worker_concurrency={args.worker_concurrency}"
        )
        print(f"A = {base.label}, B = {current.label}; {args.backend}, {queue}", flush=True)
        if args.backend == "sqlite":
            with sqlite_dir(args.tmpdir) as folder:
                count = iter(range(10**9))
                turns = alternate(
                    sides,
                    args.runs,
                    lambda name: f"sqlite:///{folder}/{name}-{next(count)}.sqlite",
                    settings,
                )
        else:
            target = PostgresTarget(args.tmpdir)
            try:
                print(f"PostgreSQL {target.version}: {target.description}", flush=True)
                turns = alternate(sides, args.runs, target.create_database, settings)
            finally:
                target.close()
    print(summary(sides, turns))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
