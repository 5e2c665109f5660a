"""Functions the benchmark workers import (`dbos-nb worker --import bench_tasks`)."""

from dbos_nb import DBOS


@DBOS.step(name="bench_noop")
def bench_noop(i: int) -> int:
    """A one-step workflow that does nothing but be checkpointed."""
    return i
