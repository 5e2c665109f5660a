"""Random identifiers: canonical UUIDs, unaffected by the notebook's random.seed, new per fork."""

from __future__ import annotations

import multiprocessing
import random
import re
import uuid

import pytest

from dbos_nb.ids import new_token, new_workflow_id


def test_workflow_ids_are_canonical_version_4_uuids() -> None:
    for _ in range(1000):
        wid = new_workflow_id()
        parsed = uuid.UUID(wid)
        assert str(parsed) == wid
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122


def test_ids_and_tokens_do_not_repeat() -> None:
    ids = {new_workflow_id() for _ in range(10_000)}
    tokens = {new_token() for _ in range(10_000)}
    assert len(ids) == len(tokens) == 10_000
    assert all(re.fullmatch(r"[0-9a-f]{32}", token) for token in tokens)


def test_seeding_the_random_module_does_not_repeat_ids() -> None:
    # A notebook seeds `random` before sampling; a workflow id drawn again after a reseed would
    # make a new enqueue return the old workflow.
    state = random.getstate()
    try:
        random.seed(42)
        first = [new_workflow_id(), new_token()]
        random.seed(42)
        assert [new_workflow_id(), new_token()] != first
    finally:
        random.setstate(state)


def _child_ids(out: multiprocessing.Queue[list[str]]) -> None:
    out.put([new_workflow_id() for _ in range(5)])


@pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(), reason="no fork on this system"
)
def test_a_forked_child_draws_other_ids_than_its_parent() -> None:
    ctx = multiprocessing.get_context("fork")
    out: multiprocessing.Queue[list[str]] = ctx.Queue()
    children = [ctx.Process(target=_child_ids, args=(out,)) for _ in range(2)]
    for child in children:
        child.start()
    try:
        drawn = [out.get(timeout=30) for _ in children]
    finally:
        for child in children:
            child.join(30)
            if child.is_alive():
                child.kill()
    mine = [new_workflow_id() for _ in range(5)]
    assert len({*drawn[0], *drawn[1], *mine}) == 15
