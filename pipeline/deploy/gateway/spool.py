"""A local, fsync'd spool for the exchanges the store could not take, replayed in order later.

While the store is unreachable (or the in-memory queue is full) the gateway keeps answering and
writes each batch here as one JSONL segment: written to a temporary file, fsync'd, renamed into
place, directory fsync'd, so a segment is either whole on disk or absent, even across a power cut.
A segment is named by the sequence number of its first line, and `segments()` lists them in that
order, which is the order the writer replays them in. A replayed segment is deleted only after its
batch is committed; a crash in between replays it again, which stores nothing twice (interaction
ids and feedback's `given_at` are idempotency keys). A segment that cannot be read back is set aside
as `*.jsonl.bad` for a person to look at, instead of blocking every segment behind it.

The mutex guards only the list of segments: file writes and fsyncs happen outside it, so a request
asking for the backlog (`len`) never waits on the disk.

One gateway process per directory: the spool holds an exclusive lock on `.lock` while it is open,
so two processes never replay (or delete) the same segment. Hand-written: what is needed is a few
dozen lines of file handling whose durability is the whole point, and is tested as such.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from storage.errors import UserError

__all__ = ["Spool"]

logger = logging.getLogger(__name__)

_SUFFIX = ".jsonl"


class Spool:
    """Segments of JSON lines in `directory`, by first sequence number; thread-safe."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._lock_file = (self.directory / ".lock").open("a+")
        except OSError as error:
            raise UserError(
                f"gateway.spool_dir: cannot use {self.directory}: {error.strerror or error}"
            ) from None
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise UserError(
                f"gateway.spool_dir: {self.directory} is in use by another gateway process (give each its own)"
            ) from None
        self._mutex = threading.Lock()
        for leftover in self.directory.glob(".*.tmp"):
            leftover.unlink()  # a segment whose write never completed: its batch was never acknowledged
        self._segments = sorted(
            int(path.stem) for path in self.directory.glob(f"*{_SUFFIX}") if path.stem.isdigit()
        )

    def segments(self) -> list[int]:
        """First sequence numbers of the segments on disk, oldest first."""
        with self._mutex:
            return list(self._segments)

    def __len__(self) -> int:
        with self._mutex:
            return len(self._segments)

    def append(self, first_seq: int, lines: Sequence[dict[str, Any]]) -> None:
        """Write `lines` as one durable segment named `first_seq`; raises OSError when the disk refuses."""
        with self._mutex:
            if first_seq in self._segments:
                raise ValueError(f"spool segment {first_seq} exists already")
        self._write_durably(self._path(first_seq), lines)
        with self._mutex:
            self._segments.append(first_seq)
            self._segments.sort()

    def read(self, first_seq: int) -> list[dict[str, Any]]:
        """The segment's lines; raises OSError or ValueError (not JSON) when it cannot be read back."""
        return [
            orjson.loads(line) for line in self._path(first_seq).read_bytes().splitlines() if line.strip()
        ]

    def set_aside(self, first_seq: int, why: str) -> None:
        """Keep a segment that cannot be replayed as `.bad` (out of the replay order), saying why."""
        path = self._path(first_seq)
        logger.error("spool segment %s cannot be replayed (%s); kept as %s.bad", path, why, path.name)
        with self._mutex:
            self._segments.remove(first_seq)
        path.rename(path.with_name(path.name + ".bad"))
        self._fsync_directory()

    def remove(self, first_seq: int) -> None:
        """Delete a segment whose lines are stored."""
        with self._mutex:
            self._segments.remove(first_seq)
        self._path(first_seq).unlink(missing_ok=True)
        self._fsync_directory()

    def writable(self) -> bool:
        return not self._lock_file.closed and os.access(self.directory, os.W_OK)

    def close(self) -> None:
        if not self._lock_file.closed:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()

    def _path(self, first_seq: int) -> Path:
        return self.directory / f"{first_seq:020d}{_SUFFIX}"

    def _write_durably(self, path: Path, lines: Sequence[dict[str, Any]]) -> None:
        """Temporary file, fsync, rename, directory fsync: `path` is whole on disk or absent."""
        temporary = self.directory / f".{path.name}.tmp"
        with temporary.open("wb") as handle:
            handle.write(b"".join(orjson.dumps(line) + b"\n" for line in lines))
            handle.flush()
            os.fsync(handle.fileno())
        temporary.rename(path)
        self._fsync_directory()

    def _fsync_directory(self) -> None:
        descriptor = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
