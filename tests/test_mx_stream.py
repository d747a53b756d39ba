"""The ModelExpress stream rules, one by one, on plain values (no server, no disk)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from agent.errors import ProtocolError, UnsafePathError
from agent.sources.mx_stream import Step, StreamValidator, check_commit, check_listing

COMMIT = "a" * 40
OTHER = "b" * 40


@dataclass
class C:
    """One FileChunk as plain values."""

    path: str
    offset: int
    total: int
    n: int
    last_chunk: bool = False
    last_file: bool = False
    commit: str | None = None


def run(expected: dict[str, int], chunks: list[C], *, finish: bool = True) -> list[Step]:
    v = StreamValidator(expected, COMMIT)
    steps = [v.accept(c.path, c.offset, c.total, c.n, last_chunk=c.last_chunk, last_file=c.last_file,
                      commit=c.commit) for c in chunks]
    if finish:
        v.finish()
    return steps


GOOD = [
    C("b.bin", 0, 10, 4, commit=COMMIT),
    C("b.bin", 4, 10, 6, last_chunk=True),
    C("a.json", 0, 3, 3, last_chunk=True),
    C("empty.txt", 0, 0, 0, last_chunk=True, last_file=True),
]
EXPECTED = {"a.json": 3, "b.bin": 10, "empty.txt": 0}


def test_good_stream_any_order_with_empty_file() -> None:
    steps = run(EXPECTED, GOOD)
    assert steps == [Step("b.bin", True, False), Step("b.bin", False, True), Step("a.json", True, True),
                     Step("empty.txt", True, True)]


def test_commit_may_repeat_on_later_chunks() -> None:
    chunks = [*GOOD[:2], C("a.json", 0, 3, 3, last_chunk=True, commit=COMMIT), GOOD[3]]
    assert len(run(EXPECTED, chunks)) == 4


@pytest.mark.parametrize(
    ("chunks", "match"),
    [
        ([C("a.json", 0, 3, 3, last_chunk=True)], "first chunk carries no commit"),
        ([C("a.json", 0, 3, 3, last_chunk=True, commit=OTHER)], "was resolved"),
        ([GOOD[0], GOOD[1], C("a.json", 0, 3, 3, last_chunk=True, commit=OTHER)], "commit changed mid-stream"),
        ([C("c.json", 0, 3, 3, last_chunk=True, commit=COMMIT)], "not requested"),
        ([GOOD[0], C("a.json", 0, 3, 3, last_chunk=True)], "before 'b.bin' was finished"),
        ([GOOD[0], GOOD[1], C("b.bin", 0, 10, 10, last_chunk=True)], "sent twice"),
        ([C("a.json", 1, 3, 2, last_chunk=True, commit=COMMIT)], "starts at offset 1"),
        ([C("a.json", 0, 4, 4, last_chunk=True, commit=COMMIT)], "listing said 3"),
        ([GOOD[0], C("b.bin", 4, 11, 6, last_chunk=True)], "changed total_size"),
        ([GOOD[0], C("b.bin", 5, 10, 5, last_chunk=True)], "expected 4"),
        ([GOOD[0], C("b.bin", 4, 10, 7, last_chunk=True)], "runs past total_size"),
        ([C("a.json", 0, 3, 2, last_chunk=True, commit=COMMIT)], "ended at 2 of 3"),
        ([C("a.json", 0, 3, 3, commit=COMMIT)], "without the last-chunk marker"),
        ([C("b.bin", 0, 10, 4, last_file=True, commit=COMMIT)], "does not end the file"),
        ([*GOOD, C("a.json", 0, 3, 3, last_chunk=True)], "after the final-file marker"),
    ],
)
def test_each_rule_rejects(chunks: list[C], match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        run(EXPECTED, chunks, finish=False)


@pytest.mark.parametrize("bad", ["../etc/passwd", "/etc/passwd", "a/../../x", "a\\..\\x", "a\x00b", "./a", "a//b", ""])
def test_unsafe_paths_rejected_before_anything_else(bad: str) -> None:
    # Even when the name is (maliciously) in the requested set, the path rule fires first.
    with pytest.raises(UnsafePathError):
        run({bad: 1}, [C(bad, 0, 1, 1, last_chunk=True, last_file=True, commit=COMMIT)], finish=False)


@pytest.mark.parametrize(
    ("chunks", "match"),
    [
        ([GOOD[0]], "ended inside 'b.bin'"),
        (GOOD[:3], "without the final-file marker"),
        ([], "without the final-file marker"),
        ([C("a.json", 0, 3, 3, last_chunk=True, last_file=True, commit=COMMIT)], "without 2 requested files"),
    ],
)
def test_finish_needs_marker_and_every_file(chunks: list[C], match: str) -> None:
    v = StreamValidator(EXPECTED, COMMIT)
    for c in chunks:
        v.accept(c.path, c.offset, c.total, c.n, last_chunk=c.last_chunk, last_file=c.last_file, commit=c.commit)
    with pytest.raises(ProtocolError, match=match):
        v.finish()


def test_listing_checks() -> None:
    assert check_listing([("a", 1), ("b", 2)], 3) == {"a": 1, "b": 2}
    with pytest.raises(ProtocolError, match="twice"):
        check_listing([("a", 1), ("a", 1)], 2)
    with pytest.raises(ProtocolError, match="add up to 3"):
        check_listing([("a", 1), ("b", 2)], 4)
    with pytest.raises(UnsafePathError):
        check_listing([("../a", 1)], 1)


def test_commit_ids() -> None:
    assert check_commit(COMMIT, "x") == COMMIT
    for bad in (None, "main", "A" * 40, "a" * 39, "../" + "a" * 37):
        with pytest.raises(ProtocolError):
            check_commit(bad, "resolved_revision")
