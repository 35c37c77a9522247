"""Name claims: the rule that keeps task names unique across nodes depends only on the order of
the names topic, so every node that reads it comes to the same answer."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from periodic_checker.names import ORPHAN_AFTER, NameClaims, claim_key, claim_value, parse_key

A = uuid.UUID("00000000-0000-4000-8000-00000000000a")
B = uuid.UUID("00000000-0000-4000-8000-00000000000b")
C = uuid.UUID("00000000-0000-4000-8000-00000000000c")
T0 = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


def read(claims: NameClaims, *records: tuple[str, uuid.UUID, bool]) -> list[bool | None]:
    """Apply (name, task, claim?) records in order; the outcome of each claim (None for a
    release)."""
    outcomes: list[bool | None] = []
    for name, task, claim in records:
        offset = claims.next_offset
        value = claim_value(name, task, T0) if claim else None
        claims.apply(offset, claim_key(name, task), value, T0.timestamp())
        outcomes.append(claims.won(name, task, offset) if claim else None)
    return outcomes


def test_the_first_claim_of_a_name_wins_and_a_later_one_loses() -> None:
    claims = NameClaims()
    assert read(claims, ("shop", A, True), ("shop", B, True)) == [True, False]
    assert claims.holder("shop") == A


def test_a_lost_claim_stays_lost_when_the_winner_releases_later() -> None:
    claims = NameClaims()
    assert read(claims, ("shop", A, True), ("shop", B, True), ("shop", A, False)) == [
        True,
        False,
        None,
    ]
    assert claims.holder("shop") is None
    assert read(claims, ("shop", C, True)) == [True]  # a claim after the release wins


def test_releasing_a_lost_claim_leaves_the_winner_holding() -> None:
    claims = NameClaims()
    read(claims, ("shop", A, True), ("shop", B, True), ("shop", B, False))
    assert claims.holder("shop") == A


def test_a_task_claiming_a_name_it_holds_wins_again() -> None:
    # The same PUT through two nodes: both claims are the same task's.
    claims = NameClaims()
    assert read(claims, ("shop", A, True), ("shop", A, True)) == [True, True]


def test_names_are_independent() -> None:
    claims = NameClaims()
    assert read(claims, ("shop", A, True), ("blog", B, True)) == [True, True]


def test_an_offset_not_read_yet_has_no_answer() -> None:
    claims = NameClaims()
    read(claims, ("shop", A, True))
    assert claims.won("shop", A, claims.next_offset) is None
    assert claims.won("shop", B, 0) is False  # not the claim found there


def test_a_key_that_is_not_a_claim_is_ignored() -> None:
    claims = NameClaims()
    assert not claims.apply(0, b"no separator", b"{}", 0.0)
    assert not claims.apply(1, None, b"{}", 0.0)
    assert claims.holders == {}
    assert claims.next_offset == 2


def test_a_claim_key_spells_name_and_task_and_reads_back() -> None:
    assert claim_key("shop", A) == f"shop\n{A}".encode()
    assert parse_key(claim_key("a name with spaces", A)) == ("a name with spaces", A)
    assert parse_key(b"\n" + str(A).encode()) is None  # no name


def test_a_winning_claim_without_its_task_is_an_orphan_after_a_while() -> None:
    claims = NameClaims()
    read(claims, ("shop", A, True), ("blog", B, True), ("old", C, True))
    soon, later = T0.timestamp() + 10, T0.timestamp() + ORPHAN_AFTER + 1
    names_of = {A: "shop", C: "renamed"}  # B never came; C holds a name it no longer has
    assert claims.orphans(names_of, soon) == []
    assert sorted(claims.orphans(names_of, later)) == [("blog", B), ("old", C)]
