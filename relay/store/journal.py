"""The local unsubscribe journal: where a request is kept while Redis cannot take it.

A one-click POST or a mailto request is answered 2xx only once it is durable. When
Redis is unreachable the request goes here instead: one JSON line per request,
appended and ``fsync``'d before the reply. When Redis is back, the lines are
replayed into the suppression store (an unsubscribe written twice is the same
suppression, so replaying is idempotent) and the file is removed.

Files under ``state_dir``::

    unsubscribe.journal            JSONL   requests not yet in Redis (appended to)
    unsubscribe.journal.lock               flock: appends and the hand-over to replay
    unsubscribe.replay.<id>        JSONL   a journal taken over for replay (flock'd
                                           while a process replays it)

Several processes (``smtp.workers``) share the folder: an append and the rename
that hands the journal over to replay exclude each other through the lock file,
and a writer that finds the journal renamed under it opens the new one. A replay
file left by a process that died is replayed by the next one.

The calls block on the disk: run them in a thread (``asyncio.to_thread``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from relay.eventlog import EventLog

log = EventLog(__name__)

JOURNAL = "unsubscribe.journal"
LOCK = "unsubscribe.journal.lock"
REPLAY_PREFIX = "unsubscribe.replay."

Record = dict[str, Any]


class JournalError(Exception):
    """The journal cannot be written (no folder, no permission, disk full)."""


class Journal:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._path = folder / JOURNAL
        self._lock_path = folder / LOCK

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def append(self, record: Record) -> None:
        """Append one record and fsync it (and, for a new file, its folder)."""
        line = json.dumps(record, separators=(",", ":"), ensure_ascii=True).encode() + b"\n"
        try:
            self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            with self._locked():
                created = not self._path.exists()
                fd = os.open(self._path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    size = os.fstat(fd).st_size
                    if size and os.pread(fd, 1, size - 1) != b"\n":
                        line = b"\n" + line  # after a torn append: keep records apart
                    written = os.write(fd, line)
                    if written != len(line):
                        raise OSError(f"short write ({written} of {len(line)} bytes)")
                    os.fsync(fd)
                finally:
                    os.close(fd)
                if created:
                    _fsync_dir(self.folder)
        except OSError as exc:
            raise JournalError(f"{self._path}: {exc.strerror or exc}") from exc

    def pending(self) -> int:
        """Records not yet replayed (the journal and any replay file left behind)."""
        count = 0
        for path in self._files():
            with contextlib.suppress(OSError), path.open("rb") as f:
                count += sum(1 for line in f if line.strip())
        return count

    def _files(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        files = sorted(self.folder.glob(REPLAY_PREFIX + "*"))
        if self._path.exists():
            files.append(self._path)
        return files

    def take(self) -> list[Path]:
        """Hand the journal over to replay: rename it, so new requests start a new one.

        Answers every replay file no other process is replaying, the new one included.
        """
        if not self.folder.is_dir():
            return []
        with self._locked():
            if self._path.exists():
                target = self.folder / f"{REPLAY_PREFIX}{uuid.uuid4().hex}"
                os.rename(self._path, target)
                _fsync_dir(self.folder)
        return sorted(self.folder.glob(REPLAY_PREFIX + "*"))

    @contextlib.contextmanager
    def claim(self, path: Path) -> Iterator[list[Record] | None]:
        """The records of one replay file, held exclusively; None if another has it.

        The caller replays them inside the ``with`` block and calls ``finish``.
        """
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            yield None
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield None
                return
            if not path.exists():  # finished by another process just before we locked it
                yield None
                return
            with os.fdopen(os.dup(fd), "rb") as f:
                yield list(_records(path, f.read()))
        finally:
            os.close(fd)

    def finish(self, path: Path) -> None:
        """Every record of ``path`` is in Redis: remove it."""
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        _fsync_dir(self.folder)

    def check_writable(self) -> str | None:
        """Why the journal could not be written, or None (checked at start, for the log)."""
        folder = self.folder
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not os.access(folder, os.W_OK | os.X_OK):
            return f"{folder} is not writable"
        return None


def _records(path: Path, data: bytes) -> Iterator[Record]:
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            # a line cut by a crash mid-append was never acknowledged: nothing is lost
            log.error("journal line skipped", file=path.name, line=number, reason="not a record")
            continue
        if isinstance(record, dict):
            yield record


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
