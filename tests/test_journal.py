"""The local unsubscribe journal: fsync'd appends, hand-over to replay, several processes."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from relay.store.journal import JOURNAL, Journal, JournalError


def test_append_take_claim_finish(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "state")
    assert journal.pending() == 0 and journal.take() == []
    journal.append({"id": "a", "address": "a@example.net"})
    journal.append({"id": "b", "address": "b@example.net"})
    assert journal.pending() == 2
    [taken] = journal.take()
    assert not (tmp_path / "state" / JOURNAL).exists()
    journal.append({"id": "c", "address": "c@example.net"})  # a new journal meanwhile
    assert journal.pending() == 3
    with journal.claim(taken) as records:
        assert records is not None
        assert [r["id"] for r in records] == ["a", "b"]
        with journal.claim(taken) as again:
            assert again is None  # held by the first claim
        journal.finish(taken)
    assert journal.pending() == 1


def test_a_torn_line_does_not_swallow_the_next_record(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.append({"id": "a"})
    with (tmp_path / JOURNAL).open("ab") as f:
        f.write(b'{"id":"cut-by-a-cra')  # never acknowledged
    journal.append({"id": "b"})
    [taken] = journal.take()
    with journal.claim(taken) as records:
        assert records is not None
        assert [r["id"] for r in records] == ["a", "b"]


def test_unwritable_folder_is_a_journal_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    journal = Journal(tmp_path / "file" / "state")
    assert journal.check_writable() is not None
    with pytest.raises(JournalError):
        journal.append({"id": "a"})


def _writer(folder: str, worker: int, count: int) -> None:
    journal = Journal(Path(folder))
    for i in range(count):
        journal.append({"id": f"{worker}-{i}"})


def test_processes_appending_while_another_takes_lose_nothing(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    writers = [ctx.Process(target=_writer, args=(str(tmp_path), w, 200)) for w in range(3)]
    for p in writers:
        p.start()
    journal = Journal(tmp_path)
    seen: list[str] = []
    while any(p.is_alive() for p in writers) or journal.pending():
        for path in journal.take():
            with journal.claim(path) as records:
                if records is not None:
                    seen.extend(str(r["id"]) for r in records)
                    journal.finish(path)
    for p in writers:
        p.join()
        assert p.exitcode == 0
    assert sorted(seen) == sorted(f"{w}-{i}" for w in range(3) for i in range(200))
