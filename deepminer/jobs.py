"""Long jobs (``POST /explanations``: peer saliency; a set evaluation's calls): progress readable while
they run, cancel by id, and a client that goes away frees its work.

TorchServe has no per-request cancel and never tells a handler that its HTTP client left, so the job
layer is ours: one small SQLite file (:class:`JobStore`, ``DEEPMINER_JOBS``; ``make run``:
``var/jobs.sqlite``) shared by the processes of one host (TorchServe's Python workers, the workbench,
a script). The client names a job in the request (the ``job`` option, a random id) and writes its row
(``queued``) before sending; the worker, between steps (each forward pass of a method: one batch of
Integrated Gradients steps or SmoothGrad samples, Guided Backprop's one pass), writes the progress
(``done``/``total``, the method) and reads the row: cancelled, or its client's heartbeat older than
``heartbeat_s``, and the step raises :class:`JobCancelled` (409 ``Cancelled``), the worker's
answer is that one line and it serves the next request. A client touches the row while it waits
(:func:`heartbeat`): a killed client, or one that gave up (timeout), stops touching it, and the job
stops at the next step. Nothing here imports torch, Streamlit or TorchServe.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from deepminer.errors import DeepMinerError, InputError

ENV_JOBS = "DEEPMINER_JOBS"  #: the job file shared by the server's workers and its clients
HEARTBEAT_EVERY_S = 2.0  #: how often a waiting client touches its job
HEARTBEAT_TIMEOUT_S = 15.0  #: a job whose client has not touched it for this long is dropped (handler setting)
KEEP_S = 24 * 3600.0  #: finished jobs are forgotten after a day
#: the request header the lab profile's sign-in proxy (serve/proxy.py) sets to the signed-in user (a
#: client-sent header of that name never passes it); the owner a job named in a request must have
USER_HEADER = "X-Deepminer-User"
ID_PATTERN = r"^[A-Za-z0-9_-]{8,64}$"  #: a job id (the ``job`` option)
STATES = ("queued", "running", "done", "failed", "cancelled")
FINISHED = ("done", "failed", "cancelled")

_SCHEMA = """CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, grp TEXT, state TEXT NOT NULL, step TEXT, done INTEGER NOT NULL DEFAULT 0,
    total INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL, started REAL, updated REAL NOT NULL,
    heartbeat REAL, cancel INTEGER NOT NULL DEFAULT 0, reason TEXT, message TEXT, owner TEXT)"""


class JobCancelled(DeepMinerError):
    """The job was cancelled (by id, with its group, or because its client stopped waiting): the
    request answers ``409 Cancelled`` with this one line, and the worker serves the next one."""

    status = 409

    def __init__(self, message: str):
        super().__init__(message, kind="Cancelled")


def new_id() -> str:
    """A fresh job id (128 random bits, 32 hex digits: never starts with '-', which a command line
    would read as an option): it is the only thing that names a job."""
    return secrets.token_hex(16)


def default_path() -> Path:
    """``$DEEPMINER_JOBS``, else ``deepminer-jobs-<uid>.sqlite`` in the temporary folder."""
    env = os.environ.get(ENV_JOBS, "").strip()
    if env:
        return Path(env)
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(tempfile.gettempdir()) / f"deepminer-jobs-{uid}.sqlite"


class JobStore:
    """The job rows in the SQLite file ``path`` (made on first use, mode 0600, WAL: readers never wait
    for the writer). One short connection per call, so it is safe across threads and processes."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path else default_path()
        self._ready = False

    def _connect(self) -> sqlite3.Connection:
        if not self._ready and not self.path.exists():
            # made here, mode 0600. Never open (and close) an existing file: closing any descriptor of
            # a SQLite file drops every POSIX lock this process holds on it (its other connections')
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
            except FileExistsError:
                pass
        con = sqlite3.connect(self.path, timeout=10, isolation_level=None)
        if not self._ready:
            _wal(con)
            con.execute(_SCHEMA)
            if "owner" not in {r[1] for r in con.execute("PRAGMA table_info(jobs)")}:  # a file made before owners
                with contextlib.suppress(sqlite3.OperationalError):  # another process added it just now
                    con.execute("ALTER TABLE jobs ADD COLUMN owner TEXT")
            self._ready = True
        return con

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        con = self._connect()
        try:
            yield con
        finally:
            con.close()

    # -- the client's side ------------------------------------------------------------------------
    def create(self, job_id: str, *, group: str | None = None, owner: str | None = None) -> bool:
        """A ``queued`` row for ``job_id`` (its heartbeat now), in ``group`` (e.g. a set run); finished
        jobs older than :data:`KEEP_S` are forgotten. ``owner`` (a signed-in name: the lab's jobs API,
        :mod:`serve.auth`): only a new id, False (nothing written) when the id is taken; without, a
        row of that id is replaced (the host's own clients)."""
        now = time.time()
        verb = "INSERT OR IGNORE" if owner is not None else "INSERT OR REPLACE"
        with self._db() as con:
            con.execute("DELETE FROM jobs WHERE state IN ('done','failed','cancelled') AND updated < ?",
                        (now - KEEP_S,))
            cur = con.execute(f"{verb} INTO jobs (id, grp, state, created, updated, heartbeat, owner) "  # noqa: S608 - a fixed verb
                              "VALUES (?, ?, 'queued', ?, ?, ?, ?)", (job_id, group, now, now, now, owner))
            return cur.rowcount > 0

    def touch(self, job_id: str) -> None:
        """The client still waits for ``job_id`` (its heartbeat now)."""
        with self._db() as con:
            con.execute("UPDATE jobs SET heartbeat = ? WHERE id = ?", (time.time(), job_id))

    def cancel(self, job_id: str, reason: str = "cancelled") -> bool:
        """Ask ``job_id`` to stop (at its next step; a queued one stops before any work). False when
        there is no such job or it has finished already: nothing to do."""
        with self._db() as con:
            cur = con.execute("UPDATE jobs SET cancel = 1, reason = ?, updated = ? WHERE id = ? "
                              "AND state IN ('queued','running') AND cancel = 0", (reason, time.time(), job_id))
            return cur.rowcount > 0

    def cancel_group(self, group: str, reason: str = "cancelled", *, owner: str | None = None) -> int:
        """:meth:`cancel` every unfinished job of ``group`` (``owner``: only that user's); how many were
        asked to stop."""
        with self._db() as con:
            cur = con.execute("UPDATE jobs SET cancel = 1, reason = ?, updated = ? WHERE grp = ? "
                              "AND state IN ('queued','running') AND cancel = 0 AND (? IS NULL OR owner = ?)",
                              (reason, time.time(), group, owner, owner))
            return cur.rowcount

    def get(self, job_id: str) -> dict[str, Any] | None:
        """The row of ``job_id`` (``state``, ``step``, ``done``, ``total``, ``elapsed_s``, ``cancel``,
        ``message`` ...), or None."""
        with self._db() as con:
            con.row_factory = sqlite3.Row
            row = con.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            return None
        out = dict(row)
        out["elapsed_s"] = round((out["updated"] if out["state"] in FINISHED else time.time())
                                 - (out["started"] or out["created"]), 3)
        out["fraction"] = min(1.0, out["done"] / out["total"]) if out["total"] else 0.0
        return out

    def rows(self, *, finished: bool = True) -> list[dict[str, Any]]:
        """Every job's row (:meth:`get`'s fields), newest first; ``finished`` False: queued and running only."""
        where = "" if finished else " WHERE state IN ('queued','running')"
        with self._db() as con:
            ids = [r[0] for r in con.execute(f"SELECT id FROM jobs{where} ORDER BY created DESC")]  # noqa: S608 - a fixed clause
        return [row for i in ids if (row := self.get(i)) is not None]

    def group(self, group: str) -> list[dict[str, Any]]:
        """The rows of ``group``'s jobs, oldest first (:meth:`get`'s fields)."""
        with self._db() as con:
            ids = [r[0] for r in con.execute("SELECT id FROM jobs WHERE grp = ? ORDER BY created", (group,))]
        return [row for i in ids if (row := self.get(i)) is not None]

    # -- the worker's side ------------------------------------------------------------------------
    def tracker(self, job_id: str, *, heartbeat_s: float = HEARTBEAT_TIMEOUT_S) -> Tracker:
        """The worker's handle on ``job_id`` (a row is made when the client made none: progress and
        cancel by id still work, there is just no heartbeat to miss)."""
        return Tracker(self, job_id, heartbeat_s)


class Tracker:
    """The worker's side of one job: :meth:`begin`, then :meth:`step` between steps (progress
    written, cancel and heartbeat read: :class:`JobCancelled`), then :meth:`finish`."""

    def __init__(self, store: JobStore, job_id: str, heartbeat_s: float):
        self.store, self.id, self.heartbeat_s = store, job_id, float(heartbeat_s)
        self.done, self.total, self.name = 0, 0, ""

    def begin(self, total: int, step: str = "") -> None:
        """The job starts now, with ``total`` steps; :class:`JobCancelled` when it was cancelled (or
        its client left) while it waited in the queue."""
        now = time.time()
        with self.store._db() as con:
            con.execute("INSERT OR IGNORE INTO jobs (id, state, created, updated) VALUES (?, 'queued', ?, ?)",
                        (self.id, now, now))
            con.execute("UPDATE jobs SET state = 'running', started = ?, updated = ?, total = ?, done = 0, step = ? "
                        "WHERE id = ?", (now, now, int(total), step, self.id))
        self.total, self.name = int(total), step
        self.check()

    def add_total(self, n: int) -> None:
        self.total += int(n)

    def step(self, name: str | None = None, advance: int = 1) -> None:
        """``advance`` more steps done (now on ``name``), written; then :meth:`check`."""
        self.done = min(self.total, self.done + advance) if self.total else self.done + advance
        self.name = name if name is not None else self.name
        with self.store._db() as con:
            con.execute("UPDATE jobs SET done = ?, total = ?, step = ?, updated = ? WHERE id = ?",
                        (self.done, max(self.total, self.done), self.name, time.time(), self.id))
        self.check()

    def check(self) -> None:
        """:class:`JobCancelled` when the job was cancelled or its client's heartbeat is older than
        ``heartbeat_s`` (a client that sent none is never dropped for it)."""
        with self.store._db() as con:
            row = con.execute("SELECT cancel, reason, heartbeat FROM jobs WHERE id = ?", (self.id,)).fetchone()
        if row is None:
            return
        cancel, reason, beat = row
        if cancel:
            raise JobCancelled(f"job {self.id}: {reason or 'cancelled'} after {self.done} of {self.total} steps")
        if beat is not None and self.heartbeat_s > 0 and time.time() - beat > self.heartbeat_s:
            with self.store._db() as con:
                con.execute("UPDATE jobs SET cancel = 1, reason = ? WHERE id = ?", ("client gone", self.id))
            raise JobCancelled(f"job {self.id}: its client stopped waiting (no heartbeat for "
                               f"{time.time() - beat:.0f} s) after {self.done} of {self.total} steps")

    def finish(self, state: str, message: str = "") -> None:
        """The job ended: ``done``, ``failed`` or ``cancelled`` (``message``: why)."""
        if state not in FINISHED:
            raise ValueError(f"state: {state!r} is not one of {FINISHED}")
        with self.store._db() as con:
            con.execute("UPDATE jobs SET state = ?, message = ?, updated = ?, done = CASE WHEN ? = 'done' "
                        "THEN total ELSE done END WHERE id = ?", (state, message[:500], time.time(), state, self.id))


def check_owner(store: "JobStore", job_id: str, user: str | None) -> None:
    """A request of signed-in ``user`` (the lab proxy's :data:`USER_HEADER`) may name only a job of
    its own: the row must exist (the lab's ``POST /api/jobs`` made it) with that ``owner``; anything
    else is ``404 JobNotFound``, as ``/api/jobs`` answers (another user's job is not revealed). No
    user (a client on the server's host, or a server without the proxy): no check."""
    if not user:
        return
    row = store.get(job_id)
    if row is None or row.get("owner") != user:
        raise DeepMinerError(f"options.job: no job {job_id} of yours (create it with POST /api/jobs first)",
                             status=404, kind="JobNotFound")


def check_id(job_id: Any, *, name: str = "options.job") -> str:
    """``job_id`` if it is a job id (:data:`ID_PATTERN`), else a one-line :class:`InputError`."""
    import re

    if not isinstance(job_id, str) or not re.match(ID_PATTERN, job_id):
        raise InputError(f"{name}: a job id is 8-64 letters, digits, '-' or '_', got {job_id!r}")
    return job_id


@contextlib.contextmanager
def heartbeat(store: JobStore, job_id: str, every_s: float = HEARTBEAT_EVERY_S,
              alive: Callable[[], bool] | None = None) -> Iterator[None]:
    """Touch ``job_id`` every ``every_s`` seconds in a thread while the block runs (and ``alive()``,
    when given, is true): the worker drops the job once the touches stop (the process died, or the
    block was left)."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every_s):
            if alive is not None and not alive():
                continue
            try:
                store.touch(job_id)
            except sqlite3.Error:
                pass  # a busy file: the next beat

    t = threading.Thread(target=beat, name=f"deepminer-job-{job_id[:8]}", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()


def _wal(con: sqlite3.Connection, *, tries: int = 100) -> None:
    """Put the file in WAL mode once (readers never wait for the writer). Switching needs a moment
    alone with the file and SQLite answers "database is locked" at once, without its busy timeout,
    while another process holds it: read the mode first (a file already in WAL is left alone) and
    retry the switch for up to ~10 s."""
    for attempt in range(tries):
        try:
            if str(con.execute("PRAGMA journal_mode").fetchone()[0]).lower() == "wal":
                return
            con.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or attempt == tries - 1:
                raise
            time.sleep(0.1)
