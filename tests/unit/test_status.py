"""The job state machine: which moves are allowed, which are refused, and what is terminal."""

from __future__ import annotations

import itertools

import pytest

from core.status import ACTIVE, TERMINAL, TRANSITIONS, JobStatus, can_move, is_terminal, sources_of

Q, R, S, F, C = (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED)

ALLOWED = {
    (Q, R),  # a worker claims it
    (Q, C),  # the client cancels before it runs
    (Q, F),  # refused before it could run
    (R, S),  # images stored
    (R, F),  # error, or lost its worker too often
    (R, C),  # canceled while running
    (R, Q),  # lease lost: back to the queue
}
EVERY_PAIR = list(itertools.product(JobStatus, repeat=2))


def test_the_statuses_are_those_of_the_api() -> None:
    assert {s.value for s in JobStatus} == {"queued", "running", "succeeded", "failed", "canceled"}


@pytest.mark.parametrize(("src", "dst"), sorted(ALLOWED), ids=[f"{a}->{b}" for a, b in sorted(ALLOWED)])
def test_allowed_moves(src: JobStatus, dst: JobStatus) -> None:
    assert can_move(src, dst)


REFUSED = [p for p in EVERY_PAIR if p not in ALLOWED]


@pytest.mark.parametrize(("src", "dst"), REFUSED, ids=[f"{a}->{b}" for a, b in REFUSED])
def test_every_other_move_is_refused(src: JobStatus, dst: JobStatus) -> None:
    assert not can_move(src, dst)


@pytest.mark.parametrize("status", [S, F, C])
def test_terminal_statuses_never_move_again(status: JobStatus) -> None:
    assert is_terminal(status)
    assert is_terminal(status.value)
    assert not any(can_move(status, dst) for dst in JobStatus)
    assert TRANSITIONS[status] == frozenset()


@pytest.mark.parametrize("status", [Q, R])
def test_active_statuses_are_not_terminal(status: JobStatus) -> None:
    assert not is_terminal(status)
    assert not is_terminal(status.value)


def test_terminal_and_active_split_the_statuses() -> None:
    assert {S, F, C} == TERMINAL
    assert {Q, R} == ACTIVE
    assert set(JobStatus) == TERMINAL | ACTIVE
    assert not TERMINAL & ACTIVE


def test_a_job_is_never_queued_or_claimed_twice_without_a_lease_loss() -> None:
    assert not can_move(Q, Q)
    assert not can_move(R, R)


def test_an_unknown_status_is_an_error() -> None:
    with pytest.raises(ValueError):
        is_terminal("paused")


@pytest.mark.parametrize(
    ("dst", "sources"),
    [(Q, {"running"}), (R, {"queued"}), (S, {"running"}), (F, {"queued", "running"}), (C, {"queued", "running"})],
)
def test_sources_of_names_every_status_that_may_reach_it(dst: JobStatus, sources: set[str]) -> None:
    got = sources_of(dst)
    assert set(got) == sources
    assert len(got) == len(set(got))


def test_sources_of_agrees_with_can_move() -> None:
    for dst in JobStatus:
        assert set(sources_of(dst)) == {src.value for src in JobStatus if can_move(src, dst)}


def test_sources_of_are_plain_strings_usable_in_sql() -> None:
    for dst in JobStatus:
        for src in sources_of(dst):
            assert type(src) is str
