"""Logging every served exchange and every piece of feedback, off the request path, losing nothing.

A request hands its finished exchange to `Capture.record` and returns: the record goes into a
bounded in-memory queue that one writer thread drains in batches (`batch_size`, or whatever waited
`flush_seconds`) through `storage.writes.log_in_order`, one transaction a batch (passed in as
`write`, so the ordering rules are unit-tested against a store that fails on demand). Ids are the gateway's
interaction ids, so a batch written twice stores each interaction once.

When the store is unreachable the writer puts each batch in the fsync'd local spool instead and
retries the store every `flush_seconds`; once it answers, spooled batches are replayed in order,
before anything newer. When the queue is full, exchanges overflow to a second thread that writes
them to the spool in batches (and keep overflowing until the writer has caught up and the overflow
is on disk, so that the queue never holds anything newer than the spool): a request never blocks
on the disk or the store, nor fails because of logging. Every item carries a sequence number; the
writer always writes spooled segments older than its batch first, so log positions follow the order
in which exchanges finished, whatever the store did meanwhile.

A store that refuses data (as opposed to being unreachable: see `_is_outage`), such as PostgreSQL
refusing a NUL character, never blocks the log: the batch is written item by item and each refused
item is quarantined with the store's reason. A spooled segment that cannot be read back is set
aside in the spool directory as `*.jsonl.bad`.

Feedback goes through the same queue, after its interaction. The interactions not yet in the store
(being served, queued or spooled) are remembered with the key that made them, so feedback may come
at any time after the response headers: feedback on a reply still streaming is queued right after it.
Hand-written: the ordering and durability rules across queue, spool and store are the point.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field

import orjson
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from pipeline.deploy.gateway.exchange import (
    SOURCE,
    Exchange,
    Outcome,
    build_record,
    item_from_json,
    item_to_json,
)
from pipeline.deploy.gateway.spool import Spool
from storage.errors import InvalidRecord
from storage.keys import InteractionOwner
from storage.records import Feedback, InteractionRecord
from storage.writes import BadRow, LaterFeedback, LogItem

__all__ = ["Capture"]

logger = logging.getLogger(__name__)

CLOSE_TIMEOUT_SECONDS = 60.0
# DB-API exception classes (SQLAlchemy's wrappers and the drivers' own) that mean "cannot reach it"
_OUTAGE_ERRORS = frozenset({"OperationalError", "InterfaceError"})

# Stores a batch in one transaction, in order (`storage.writes.log_in_order` on an engine); raises
# when it cannot (SQLAlchemy's errors, or the driver's own on PostgreSQL's COPY path).
WriteBatch = Callable[[Sequence[LogItem]], object]


@dataclass(frozen=True)
class Queued:
    seq: int  # global order of logging; spool segments are named by their first item's
    item: LogItem
    at: float = 0.0  # time.monotonic() when queued


@dataclass
class _Pending:
    """An interaction the store does not have yet."""

    key_name: str | None
    submitted: bool = False  # its record is queued or spooled (else: still being served)
    early_feedback: list[LaterFeedback] = field(default_factory=list)  # given while it was being served


class Capture:
    """The queue, the writer thread and the spool; `record`, `feedback` and `owner` are for requests."""

    def __init__(
        self, write: WriteBatch, spool: Spool, *, queue_size: int, batch_size: int, flush_seconds: float
    ) -> None:
        self.write = write
        self.spool = spool
        self.batch_size = batch_size
        self.flush_seconds = flush_seconds
        self.store_ok = True  # the last write reached the store
        self._queue: queue.Queue[Queued | None] = queue.Queue(maxsize=queue_size)  # None: wake up, stop
        self._lock = threading.Lock()  # orders sequence numbers with queue/spool placement
        self._pending: dict[str, _Pending] = {}
        self._spilling = False  # the queue overflowed: new items overflow until it drains
        self._overflow: list[Queued] = []  # overflowed items the spill thread has yet to take, in order
        self._overflow_taken = 0  # items the spill thread took and has not finished writing
        self._overflowed = threading.Event()  # wakes the spill thread
        self._last_seq = 0
        self._retry_at = 0.0
        self._stopping = threading.Event()
        self._closed = False  # the threads have stopped: late items go straight to the spool
        self._writer = threading.Thread(target=self._run_writer, name="gateway-log-writer", daemon=True)
        self._spiller = threading.Thread(target=self._run_spiller, name="gateway-log-spill", daemon=True)
        self._recover_spool()

    # -- the request side (event loop) ----------------------------------------------------------------

    def start(self) -> None:
        self._writer.start()
        self._spiller.start()

    def close(self) -> None:
        """Write or spool everything queued, then stop; what the store did not take stays in the spool."""
        self._stopping.set()
        with suppress(queue.Full):  # a full queue: the writer is busy and sees `_stopping` soon anyway
            self._queue.put_nowait(None)
        self._overflowed.set()
        for thread in (self._writer, self._spiller):
            if thread.is_alive():
                thread.join(CLOSE_TIMEOUT_SECONDS)
            if thread.is_alive():
                logger.error("%s did not finish within %.0fs", thread.name, CLOSE_TIMEOUT_SECONDS)
        with self._lock:
            self._closed = True
            queued, overflowed, self._overflow = _drain(self._queue), self._overflow, []
        self._spool_items(queued)  # older than anything that overflowed: a segment of their own
        self._spool_items(overflowed)
        self.spool.close()

    def expect(self, exchange: Exchange) -> None:
        """An exchange is being served: feedback on it is accepted from now on."""
        if exchange.stored:
            with self._lock:
                self._pending[exchange.interaction_id] = _Pending(exchange.caller.key_name)

    def forget(self, interaction_id: str) -> None:
        """The exchange ended without a reply to log (an upstream error)."""
        with self._lock:
            dropped = self._pending.pop(interaction_id, None)
        if dropped is not None and dropped.early_feedback:
            logger.warning("feedback on %s dropped: the exchange failed", interaction_id)

    def record(self, exchange: Exchange, outcome: Outcome) -> None:
        """Log a finished exchange (never raises, never blocks on the store)."""
        if not exchange.stored:
            self.forget(exchange.interaction_id)
            return
        with self._lock:
            seq = self._next_seq()
            item = build_record(exchange, outcome, log_seq=seq)
            pending = self._pending.get(exchange.interaction_id)
            early = pending.early_feedback if pending else []
            if pending is not None:
                pending.submitted, pending.early_feedback = True, []
            if isinstance(item, BadRow):  # its feedback is quarantined after it, with the reason
                self._pending.pop(exchange.interaction_id, None)
            late = self._put_locked([(seq, item), *((self._next_seq(), fb) for fb in early)])
        self._spool_items(late)

    def feedback(self, interaction_id: str, feedback: Feedback) -> None:
        """Log feedback on an interaction known to exist (see `owner`)."""
        item = LaterFeedback(interaction_id, feedback, SOURCE)
        with self._lock:
            pending = self._pending.get(interaction_id)
            if pending is not None and not pending.submitted:
                pending.early_feedback.append(item)  # queued right after its record
                return
            late = self._put_locked([(self._next_seq(), item)])
        self._spool_items(late)

    def owner(self, interaction_id: str) -> InteractionOwner | None:
        """Who made an interaction not yet in the store; None when it is not pending here."""
        with self._lock:
            pending = self._pending.get(interaction_id)
        return InteractionOwner(pending.key_name) if pending is not None else None

    def can_log(self) -> bool:
        """The store takes writes, or the spool can hold them until it does."""
        return self.store_ok or self.spool.writable()

    def backlog(self) -> dict[str, int]:
        return {
            "queued": self._queue.qsize(),
            "spooled_segments": len(self.spool),
            "pending": len(self._pending),
        }

    def _next_seq(self) -> int:
        self._last_seq = max(self._last_seq + 1, time.time_ns())
        return self._last_seq

    def _put_locked(self, items: Sequence[tuple[int, LogItem]]) -> list[Queued]:
        """Queue (sequence number, item) pairs in order, or overflow them to the spill thread (see the
        module doc); lock held. Returns what arrived after `close`, for the caller to spool itself."""
        now = time.monotonic()
        late: list[Queued] = []
        for seq, item in items:
            queued = Queued(seq, item, now)
            if self._closed:
                late.append(queued)
                continue
            if not self._spilling:
                try:
                    self._queue.put_nowait(queued)
                    continue
                except queue.Full:
                    self._spilling = True
                    logger.warning(
                        "log queue full (%d): spilling to %s", self._queue.maxsize, self.spool.directory
                    )
            self._overflow.append(queued)
            self._overflowed.set()
        return late

    def _recover_spool(self) -> None:
        """Interactions spooled by an earlier run are pending too (their feedback is accepted)."""
        for segment in self.spool.segments():
            for queued in self._read_segment(segment) or []:
                self._last_seq = max(self._last_seq, queued.seq)
                item = queued.item
                if isinstance(item, InteractionRecord) and item.id is not None:
                    key = item.metadata.get("gateway", {}).get("key")
                    self._pending[item.id] = _Pending(key if isinstance(key, str) else None, submitted=True)
        if len(self.spool):
            logger.info("%d spooled segment(s) to replay from %s", len(self.spool), self.spool.directory)

    # -- the writer thread ----------------------------------------------------------------------------

    def _run_writer(self) -> None:
        while True:
            try:
                self.drain_once()
            except Exception:  # a bug in the handling of a failure: log it, never stop logging
                logger.exception("log writer turn failed")
            if self._stopping.is_set() and self._queue.empty():
                return

    def drain_once(self) -> None:
        """One turn of the writer: take a batch (see `_collect`) and write it, older spooled segments first."""
        batch = self._collect()
        try:
            self._write(batch)
        except Exception:  # a bug must not stop logging: keep the batch on disk, retry later
            logger.exception("log writer failed; batch of %d kept in the spool", len(batch))
            self._retry_at = time.monotonic() + self.flush_seconds
            self._spool_items(batch)

    def _collect(self) -> list[Queued]:
        """Up to `batch_size` items; returns when the first has waited `flush_seconds` (at once when stopping)."""
        first = self._take(self.flush_seconds)
        batch = [first] if first is not None else []
        while batch and len(batch) < self.batch_size:
            item = self._take(batch[0].at + self.flush_seconds - time.monotonic())
            if item is None:
                break
            batch.append(item)
        self._end_spilling_if_drained()
        return batch

    def _take(self, wait: float) -> Queued | None:
        """The next queued item, waiting up to `wait` seconds (none when stopping); None if there is none."""
        try:
            if wait <= 0 or self._stopping.is_set():
                return self._queue.get_nowait()
            return self._queue.get(timeout=wait)
        except queue.Empty:
            return None

    def _end_spilling_if_drained(self) -> None:
        """Back to queueing once the queue is empty and every overflowed item is on disk."""
        with self._lock:
            if self._spilling and self._queue.empty() and not self._overflow and not self._overflow_taken:
                self._spilling = False
                logger.info("log queue drained: back to queueing")

    def _write(self, batch: list[Queued]) -> None:
        """Spooled segments older than the batch, then the batch; whatever the store refuses is spooled."""
        replayed = self._replay(before=batch[0].seq if batch else None)
        if not replayed or (batch and not self._store(batch)):
            self._spool_items(batch)

    def _replay(self, before: int | None) -> bool:
        """Store spooled segments (older than `before`) in order; False as soon as the store fails."""
        for segment in self.spool.segments():
            if before is not None and segment > before:
                break
            items = self._read_segment(segment)
            if items is None:  # set aside
                continue
            if items and not self._store(items):
                return False
            self.spool.remove(segment)
        return True

    def _read_segment(self, segment: int) -> list[Queued] | None:
        """A spooled segment's items; None (the segment set aside as `.bad`) when it cannot be read back."""
        try:
            return [Queued(*item_from_json(line)) for line in self.spool.read(segment)]
        except (OSError, KeyError, TypeError, ValueError, InvalidRecord) as error:
            self.spool.set_aside(segment, _one_line(error))
            return None

    def _store(self, batch: Sequence[Queued]) -> bool:
        """Write a batch in one transaction; False (and retry later) when the store is unreachable."""
        if time.monotonic() < self._retry_at:
            return False
        try:
            self.write([queued.item for queued in batch])
        except Exception as error:
            if _is_outage(error):
                self._store_down(error)
                return False
            logger.error(
                "store refused a batch of %d (%s); writing it one by one", len(batch), _one_line(error)
            )
            if not self._store_one_by_one(batch):
                return False
        if not self.store_ok:
            logger.info("store reachable again")
        self.store_ok = True
        self._done(batch)
        return True

    def _store_one_by_one(self, batch: Sequence[Queued]) -> bool:
        """Isolate what the store refuses: each such item is quarantined with the store's reason."""
        for queued in batch:
            try:
                self.write([queued.item])
            except Exception as error:
                if _is_outage(error):
                    self._store_down(error)
                    return False
                if not self._quarantine(queued, error):
                    return False
        return True

    def _quarantine(self, queued: Queued, error: Exception) -> bool:
        """Keep a refused item in quarantine with the store's reason; False when the store cannot take even
        that (then the store is what is broken, not the item: the batch is spooled and retried)."""
        try:
            self.write([_refused(queued, error)])
        except Exception as again:
            self._store_down(again)
            return False
        return True

    def _store_down(self, error: Exception) -> None:
        if self.store_ok:
            logger.warning("store unreachable, spooling to %s: %s", self.spool.directory, _one_line(error))
        self.store_ok = False
        self._retry_at = time.monotonic() + self.flush_seconds

    def _done(self, batch: Sequence[Queued]) -> None:
        with self._lock:
            for queued in batch:
                if isinstance(queued.item, InteractionRecord) and queued.item.id is not None:
                    self._pending.pop(queued.item.id, None)

    # -- the spill thread -----------------------------------------------------------------------------------

    def _run_spiller(self) -> None:
        while not self._stopping.is_set():
            self._overflowed.wait()
            self._overflowed.clear()
            try:
                self.spill_once()
            except Exception:
                logger.exception("log spill turn failed")

    def spill_once(self) -> None:
        """One turn of the spill thread: what overflowed the queue, as one spool segment."""
        with self._lock:
            batch, self._overflow = self._overflow, []
            self._overflow_taken = len(batch)
        try:
            self._spool_items(batch)
        finally:
            with self._lock:
                self._overflow_taken = 0

    def _spool_items(self, batch: Sequence[Queued]) -> None:
        if not batch:
            return
        try:
            self.spool.append(batch[0].seq, [item_to_json(queued.seq, queued.item) for queued in batch])
        except OSError as error:  # the store and the disk both refuse: nothing left to do but say so
            ids = [q.item.id for q in batch if isinstance(q.item, InteractionRecord)]
            logger.error("LOST %d log item(s), spool not writable (%s): %s", len(batch), error, ids[:20])


def _drain(items: queue.Queue[Queued | None]) -> list[Queued]:
    drained: list[Queued] = []
    while True:
        try:
            item = items.get_nowait()
        except queue.Empty:
            return drained
        if item is not None:
            drained.append(item)


def _is_outage(error: BaseException) -> bool:
    """The store cannot be reached (as opposed to refusing this data).

    By DB-API class name, because PostgreSQL's COPY path raises psycopg's own errors, unwrapped by
    SQLAlchemy: `psycopg.OperationalError` is an outage, `psycopg.DataError` (a NUL byte) is refused data.
    """
    if isinstance(error, PoolTimeout) or (isinstance(error, DBAPIError) and error.connection_invalidated):
        return True
    return any(cls.__name__ in _OUTAGE_ERRORS for cls in type(error).__mro__)


def _refused(queued: Queued, error: BaseException) -> BadRow:
    raw = orjson.dumps(item_to_json(queued.seq, queued.item)).decode()
    track = queued.item.track if isinstance(queued.item, InteractionRecord) else None
    reason = f"store refused it: {_one_line(error)}".replace("\x00", "")
    return BadRow(SOURCE, None, reason, raw, track)


def _one_line(error: BaseException) -> str:
    text = str(getattr(error, "orig", None) or error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__
