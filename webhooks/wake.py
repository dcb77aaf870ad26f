"""Waking the delivery workers after a commit: one NOTIFY per burst, from a thread.

procrastinate's workers LISTEN on these channels (its own naming) and, once
told a job was inserted, fetch jobs until none is left. Its insert trigger
would NOTIFY inside the transition's transaction; PostgreSQL commits
notifying transactions one at a time, each through its WAL flush, so the
transitions that carry a webhook would commit single file
(docs/PERFORMANCE.md, "Webhooks"). The trigger is disabled (migration 0002)
and the wake-up is sent after the commit instead.

Not by the request that committed: each process has one waker thread that
sends it on a connection of its own, at once when it has been idle, and then
at most once per ``INTERVAL`` however many commits asked meanwhile (a woken
worker drains the queue, so one notification serves them all). Under load
the requests send no statement for it, and the database commits a few dozen
notifications a second instead of one per transition. Hand-written: neither
procrastinate nor Django wakes a listener after a commit.

A wake-up is no state: one lost to a crash, to a database error or to the
process exiting first only delays the delivery to the worker's next poll
(``deliver_webhooks --poll-interval``); the job itself is committed.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import threading
from collections.abc import Callable
from functools import partial

from django.db import connection, connections, transaction
from procrastinate.manager import get_channel_for_queues

logger = logging.getLogger(__name__)

QUEUE = "webhooks"  # the delivery task's queue (``webhooks.tasks``)
CHANNELS = (*get_channel_for_queues([QUEUE]), *get_channel_for_queues(None))
# A statement of its own (autocommit): as a wake-up is no state, its commit
# need not wait for the WAL flush (``synchronous_commit`` off for that one
# transaction).
NOTIFY_SQL = "SELECT set_config('synchronous_commit', 'off', true), " + ", ".join(
    ["pg_notify(%s, %s)"] * len(CHANNELS)
)
INTERVAL = 0.02  # seconds between two notifications of one process, at least
# An idle waker lets its connection go (a pooled one goes back to the pool
# after every notification anyway).
IDLE_SECONDS = 60.0


class Waker:
    """A process's waker thread, started on its first wake-up (and anew in
    a forked child: threads do not survive ``fork``)."""

    def __init__(self, interval: float = INTERVAL) -> None:
        self.interval = interval
        self.after_fork()

    def after_fork(self) -> None:
        """Start afresh (``os.register_at_fork``): the parent's thread, lock
        and wake-ups are not the child's."""
        self._lock = threading.Lock()
        self._due = threading.Event()
        self._stopping = threading.Event()  # the running thread's
        self._thread: threading.Thread | None = None
        # Bumped by every wake-up; the thread notifies when it has moved since
        # its last notification. Two requests may bump it at once and count
        # one: the count still moves, and the notification that follows is
        # sent after both their commits.
        self._asked = 0
        self._job_id = 0

    def wake(self, job_id: int) -> None:
        """Have the workers woken for ``job_id`` (and whatever else is due)."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            self._start()
        self._job_id = job_id
        self._asked += 1
        # Only an idle thread waits on this; one inside its interval does not
        # hear it (the request pays no thread switch), and finds it set after.
        self._due.set()

    def _start(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            # Each thread has its own stop flag: a stop() of the previous one
            # must not end this one.
            stopping = threading.Event()
            thread = threading.Thread(
                target=self._run,
                args=(self._asked, stopping),
                name="webhook waker",
                daemon=True,
            )
            thread.start()
            self._thread, self._stopping = thread, stopping

    def stop(self, timeout: float = 5.0) -> bool:
        """Send what is due, then end the thread and close its connection;
        whether it ended within ``timeout``."""
        with self._lock:
            thread, self._thread = self._thread, None
            stopping = self._stopping
        if thread is None:
            return True
        stopping.set()
        self._due.set()
        thread.join(timeout)
        return not thread.is_alive()

    def _run(self, told: int, stopping: threading.Event) -> None:
        try:
            while True:
                woken = self._due.wait(IDLE_SECONDS)
                self._due.clear()
                if self._asked != told:
                    told = self._asked
                    self._notify(self._job_id)
                elif not woken:
                    self._release(connection.close)  # idle: let it go
                # At most one notification per interval.
                if stopping.is_set() or stopping.wait(self.interval):
                    if self._asked != told:
                        self._notify(self._job_id)
                    return
                if not self._due.is_set():
                    # The burst is over. What Django does at the end of a
                    # request: a broken connection is dropped, a pooled one
                    # returned, an old one closed (and the next use checks
                    # the connection first, ``CONN_HEALTH_CHECKS``).
                    self._release(connection.close_if_unusable_or_obsolete)
        finally:
            self._release(connections.close_all)

    @staticmethod
    def _release(close: Callable[[], None]) -> None:
        """Let a connection go; closing a broken one may fail, and the thread
        must outlive that (its next use connects afresh)."""
        try:
            close()
        except Exception:
            logger.warning(
                "webhook waker: closing its connection failed", exc_info=True
            )

    def _notify(self, job_id: int) -> None:
        # The notification names one job; procrastinate's workers only read
        # its type.
        payload = json.dumps({"type": "job_inserted", "job_id": job_id})
        params = [value for channel in CHANNELS for value in (channel, payload)]
        for retry in (False, True):
            try:
                with connection.cursor() as cursor:
                    cursor.execute(NOTIFY_SQL, params)
            except Exception:  # the thread must outlive any failure; see above
                # A connection lost mid-burst (a restart, a proxy's timeout):
                # once more on a new one, then the workers' poll finds it.
                self._release(connection.close)
                if retry:
                    logger.warning(
                        "could not wake the webhook delivery workers; they "
                        "will find the job at their next poll",
                        exc_info=True,
                    )
                continue
            if connection.pool is not None:
                # A pool sized for the request threads: the slot goes back
                # at once, or a busy waker would keep one from them.
                self._release(connection.close)
            return


waker = Waker()
os.register_at_fork(after_in_child=waker.after_fork)
atexit.register(waker.stop, 1.0)


_commit = threading.local()  # per thread, as Django's connections are


def wake_after_commit(job_id: int) -> None:
    """Wake the delivery workers once the current transaction commits.

    Called for every job written; one wake-up per commit however many: the
    first of the transaction's callbacks asks, the others find it asked. A
    transaction that rolls back wakes nobody (its flag stays up, and the
    next commit asks, which it would anyway). ``robust``: the commit has
    happened whatever the wake-up does.
    """
    _commit.pending = True
    transaction.on_commit(partial(_wake_once, job_id), robust=True)


def _wake_once(job_id: int) -> None:
    if getattr(_commit, "pending", False):
        _commit.pending = False
        waker.wake(job_id)
