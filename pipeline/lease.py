"""One live run per output: a lease that a run takes atomically, renews while it works and releases.

Scheduled runs (a RayCronJob, a CronJob, a user's on-demand RayJob) overlap when one runs long; two runs
committing into one output would race on its shards and checkpoints. So a run first takes the output's lease:

    OUTPUT/_lease/<generation>.json   # owner, host, pid, pid_space, start_ticks, acquired_at, heartbeat_at,
                                      # expires_at, released

The newest generation is the lease. A run takes it by creating generation N+1 *exclusively* once generation N
is released, expired or held by a crashed process of this host (generation 0 when there is none). Of all the
runs racing for N+1 exactly one creates it, so taking a free lease and taking over a crashed run's one are the
same atomic step, with no delete-then-create window. The holder rewrites its own generation every
``heartbeat_s``; a crashed run stops doing so and its lease expires ``ttl_s`` after its last heartbeat.

A crash on this host need not wait for that. The record names the holder's process exactly: its pid, the pid
space that pid belongs to (the kernel boot and the pid and time namespaces) and its start time. A run in the
same pid space under the same hostname sees whether that process still runs; once its pid has exited, or
belongs to another process (a reused pid starts at another time), the lease is taken over at once. A holder
anywhere else (another host, pod or container) and a record without a start time (written off Linux, or by a
version before start times were recorded) keep the lease until it expires.

Expiry compares the holder's wall clock (``expires_at``) with the reader's: keep ``ttl_s`` well above the
clock skew between machines (NTP keeps it under a second; the default ttl is minutes).

Through a store outage. Every call to the store runs under the job's retry policy; a heartbeat that cannot be
written keeps being retried, but only for as long as the lease is certainly still ours. ``check()``, which the job
asks before every write, refuses once the lease could expire within one heartbeat interval: a write started before
that has the interval to land before another run could take over. A run cut off from its store past that point stops
committing and says why, and never writes into the output again: another run may hold it by the time the store
answers. (The interval covers a write that the store answers; a request that hangs longer than a heartbeat
interval and is then applied is beyond what a lease without fencing can rule out: keep the ttl well above the store
client's request timeouts.)
"""

import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.retry import RetryPolicy, StoreRetries, describe
from pipeline.storage import join, list_names, write_atomic, write_temporary_beside

logger = logging.getLogger(__name__)

LEASE_DIR = "_lease"


class LeaseHeldError(ValueError):
    """Another live run holds the output's lease."""

    def __init__(self, message: str, holder: "Holder"):
        super().__init__(message)
        self.holder = holder


class LeaseLostError(RuntimeError):
    """This run no longer holds its lease: it stalled past ``ttl_s`` and another run may have taken over."""


def create_exclusive(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write a whole new file at ``path``, or raise FileExistsError (and write nothing) if it exists.

    Local disk: write a temporary file and hard-link it into place; link() fails when the name exists, and
    readers never see a partly written file (an O_EXCL create would show them an empty one). S3: a
    conditional PUT (``If-None-Match: *``), which s3fs sends for ``mode="create"``. Other fsspec backends get
    their own ``mode="create"``, which fsspec's generic fallback implements as check-then-write (not atomic).
    """
    if isinstance(fs, LocalFileSystem):
        temporary = write_temporary_beside(path, data)
        try:
            os.link(temporary, path)
        finally:
            os.remove(temporary)
    else:
        fs.pipe_file(path, data, mode="create")


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="milliseconds")


def _timestamp(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def _pid_space() -> dict | None:
    """Where a pid names one process for this process: the kernel boot, and its pid and time namespaces.

    Every boot restarts pids, start ticks and namespace numbers; two containers on one machine can share a
    hostname but not a pid namespace; /proc gives start times in the reader's time namespace. (A namespace number
    is reused only once every process of the old namespace is gone, and the new ones start later.) None where
    this process cannot judge pids through /proc: no /proc (not Linux), or a /proc of another pid namespace than
    its own (then /proc/self is not its pid).
    """
    try:
        if os.readlink("/proc/self") != str(os.getpid()):
            return None
        return {
            "boot_id": Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
            "pid_namespace": os.readlink("/proc/self/ns/pid"),
            "time_namespace": _time_namespace(),
        }
    except OSError:
        return None


def _time_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/time")
    except FileNotFoundError:  # Linux before 5.6 has no time namespaces: one clock for every process
        return None


def _process_stat(pid: int) -> tuple[str, int] | None:
    """The state letter of ``pid`` and its start time in clock ticks since boot (fields 3 and 22 of
    /proc/PID/stat), or None where /proc shows no such pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # field 2, the command name, is in parentheses and may itself hold spaces and parentheses
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[0], int(fields[19])


def _process_gone(pid: int, start_ticks: int) -> str | None:
    """Why the process ``pid`` of this pid space that started at ``start_ticks`` certainly runs no more, or None
    while it may."""
    try:
        os.kill(pid, 0)  # signal 0 sends nothing: it asks whether the pid exists, which /proc may hide
    except ProcessLookupError:
        return "has exited"
    except PermissionError:
        pass  # another user's process: it exists
    stat = _process_stat(pid)
    if stat is None:
        return None  # /proc hides other users' processes (hidepid), or it exited just now: the ttl decides
    state, started = stat
    if state == "Z":
        return "has exited"  # killed, but not yet reaped by its parent
    if started != start_ticks:
        return "now belongs to another process"
    return None


@dataclass(frozen=True)
class Holder:
    """The newest lease record of an output."""

    generation: int
    record: dict

    def live(self, now: float) -> bool:
        """Whether the lease keeps other runs out: not ended, and its holder not known to have crashed."""
        return not self.ended(now) and self.crash() is None

    def ended(self, now: float) -> bool:
        """Released, or expired: not renewed for ``ttl_s``."""
        return self.record["released"] or now >= _timestamp(self.record["expires_at"])

    def crash(self) -> str | None:
        """Why the holder's process certainly runs no more, or None while it may: then only expiry ends its lease.

        Only a process in this process's pid space, under its hostname, is judged.
        """
        r = self.record
        space = r.get("pid_space")  # absent from the records of versions before start times were recorded
        if space is None or r["host"] != socket.gethostname() or space != _pid_space():
            return None
        gone = _process_gone(r["pid"], r["start_ticks"])
        return None if gone is None else f"pid {r['pid']} {gone}"

    def __str__(self) -> str:
        r = self.record
        return (
            f"owner {r['owner']} on host {r['host']} (pid {r['pid']}) since {r['acquired_at']}, "
            f"last heartbeat {r['heartbeat_at']}, lease expires {r['expires_at']}"
        )


class OutputLease:
    """The lease on one output directory/prefix ``root`` of ``fs``.

    ``with OutputLease(fs, root).acquire(wait_s=60):`` holds it for the block, renewing it from a background
    thread. Before each commit a long run can call ``check()``, which raises once the lease is lost or could expire
    before a write started now has landed. Its calls to the store run under ``retries`` (the default policy if None).
    """

    def __init__(
        self,
        fs: fsspec.AbstractFileSystem,
        root: str,
        ttl_s: float = 180.0,
        heartbeat_s: float = 30.0,
        retries: StoreRetries | None = None,
    ):
        if not 0 < 2 * heartbeat_s <= ttl_s:
            raise ValueError(f"heartbeat_s must be positive and at most ttl_s / 2, got {heartbeat_s} and {ttl_s}")
        self.fs = fs
        self.url = fs.unstrip_protocol(root)
        self.directory = join(root, LEASE_DIR)
        self.ttl_s = ttl_s
        self.heartbeat_s = heartbeat_s
        self.retries = retries or StoreRetries()
        self.owner = uuid.uuid4().hex
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.pid_space = _pid_space()
        self.start_ticks = None if self.pid_space is None else _process_stat(self.pid)[1]
        self.generation: int | None = None
        self._acquired_at = 0.0
        self._renewed_at = 0.0
        self._expires_at = 0.0
        self._lost = threading.Event()
        self._lost_reason = ""
        self._heartbeat_failure: str | None = None  # what the store said to the last heartbeat, while they fail
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def acquire(self, wait_s: float = 0.0) -> "OutputLease":
        """Take the lease; while another live run holds it, retry for up to ``wait_s`` seconds, then raise
        LeaseHeldError naming the holder. A lease whose holder crashed on this host is taken over at once."""
        deadline = time.monotonic() + wait_s
        waiting = False
        while True:
            holder = self.holder()
            free = holder is None or holder.ended(time.time())
            crash = None if free else holder.crash()
            if free or crash:
                if self._take(0 if holder is None else holder.generation + 1):
                    if crash:
                        logger.warning("took over the lease on %s from a crashed run (%s): %s", self.url, crash, holder)
                    return self
                continue  # another run created this generation first: read what it wrote
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LeaseHeldError(f"{self.url} is in use by another run: {holder}", holder)
            if not waiting:
                logger.info("%s is in use by another run (%s); waiting up to %.0f s", self.url, holder, wait_s)
                waiting = True
            # a release is seen within half a heartbeat; polling longer lists the store for nothing
            time.sleep(min(remaining, self.heartbeat_s / 2))

    def holder(self) -> Holder | None:
        """The newest lease record, or None if this output was never leased."""
        return self.retries.call(f"read the lease of {self.url}", self._read_holder)

    def _read_holder(self) -> Holder | None:
        while True:
            generations = [int(name) for name in list_names(self.fs, self.directory, ".json") if name.isdigit()]
            if not generations:
                return None
            newest = max(generations)
            try:
                # cat_file is one GET; open() could trust a listing's cached size for a file rewritten since
                return Holder(newest, json.loads(self.fs.cat_file(self._path(newest))))
            except FileNotFoundError:
                continue  # pruned by a newer holder between listing and reading: list again

    def check(self) -> None:
        """Raise LeaseLostError unless this run still holds the lease, for long enough that a write started now lands
        before it could expire (one heartbeat interval)."""
        if self.generation is None:
            raise LeaseLostError(f"the lease on {self.url} is not held")
        if self._lost.is_set():
            raise LeaseLostError(self._lost_reason)
        if time.time() >= self._safe_until():
            raise LeaseLostError(self._expiring_reason())

    def release(self) -> None:
        """Stop renewing and mark the lease released, so that the next run need not wait for it to expire.

        Not once the lease could have expired: another run may hold the output by now."""
        if self.generation is None:
            return
        self._stop.set()
        self._heartbeat.join()
        try:
            self.check()
            # no longer than any other call: the next run can take the lease over once it expires
            policy = self._policy_while_safe(self.retries.policy.budget_s)
            self.retries.call(f"release the lease on {self.url}", self._write_release, policy)
        except LeaseLostError as error:
            logger.warning("not releasing the lease: %s", error)
        except Exception as error:  # the run's work is done either way; only the next run may have to wait
            logger.warning("could not release the lease on %s (it expires at %s): %s", self.url,
                           _iso(self._expires_at), describe(error))
        self.generation = None

    def __enter__(self) -> "OutputLease":
        return self if self.generation is not None else self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()

    def _path(self, generation: int) -> str:
        return join(self.directory, f"{generation:08d}.json")

    def _record(self, now: float, released: bool = False) -> bytes:
        record = {
            "owner": self.owner,
            "host": self.host,
            "pid": self.pid,
            "pid_space": self.pid_space,
            "start_ticks": self.start_ticks,
            "acquired_at": _iso(self._acquired_at),
            "heartbeat_at": _iso(now),
            "expires_at": _iso(now if released else now + self.ttl_s),
            "released": released,
        }
        return (json.dumps(record, indent=2) + "\n").encode()

    def _take(self, generation: int) -> bool:
        now = self._acquired_at = time.time()
        record = self._record(now)
        try:
            self.retries.call(f"take the lease on {self.url}",
                              lambda: create_exclusive(self.fs, self._path(generation), record))
        except FileExistsError:
            if not self._created_by_us(generation):
                return False
        self.generation = generation
        self._renewed_at, self._expires_at = now, now + self.ttl_s
        self._lost.clear()
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, name=f"lease-heartbeat {self.url}", daemon=True)
        self._heartbeat.start()
        self._prune(generation)
        logger.info("took the lease on %s (generation %d, owner %s)", self.url, generation, self.owner)
        return True

    def _created_by_us(self, generation: int) -> bool:
        """Whether ``generation`` is this run's own record: an attempt whose answer was lost (a dropped connection)
        may have created it before the retry was refused."""
        path = self._path(generation)

        def read() -> dict:
            self.fs.invalidate_cache(self.directory)  # listed before this generation existed
            return json.loads(self.fs.cat_file(path))

        return self.retries.call(f"read the lease of {self.url}", read)["owner"] == self.owner

    def _prune(self, generation: int) -> None:
        """Keep the previous record (who ran last, and how it ended) and ours; older ones are history.

        Housekeeping only, tried once: a record that cannot be deleted now (a racing pruner got it first, the store
        is away) goes with the next run's pruning.
        """
        try:
            for name in list_names(self.fs, self.directory, ".json"):
                if name.isdigit() and int(name) < generation - 1:
                    self.fs.rm_file(self._path(int(name)))
        except Exception as error:  # whatever the store said, the lease is taken; the old records can wait
            logger.info("left old lease records of %s for later: %s", self.url, describe(error))

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                # retried for as long as commits may go on, however long the store is away; past that, the lease is as
                # good as lost
                what = f"renew the lease on {self.url}"
                self.retries.call(what, self._renew, self._policy_while_safe(), self._stop)
            except LeaseLostError as error:  # taken over
                self._lose(str(error))
                return
            except Exception as error:
                if self._stop.is_set():  # released while the store was away
                    return
                self._heartbeat_failure = describe(error)
                self._lose(self._expiring_reason())
                return

    def _renew(self) -> None:
        try:
            self._renew_once()
        except Exception as error:
            self._heartbeat_failure = describe(error)  # check() names it if commits stop before the heartbeat gives up
            raise
        self._heartbeat_failure = None

    def _renew_once(self) -> None:
        holder = self._read_holder()
        if holder is None or holder.generation != self.generation:
            raise LeaseLostError(f"lost the lease on {self.url}: taken over by {holder}")
        now = time.time()
        write_atomic(self.fs, self._path(self.generation), self._record(now))
        if time.time() >= self._expires_at:  # it hung until another run could have taken over, unseen by the read
            raise LeaseLostError(f"lost the lease on {self.url}: a heartbeat landed after the lease could expire "
                                 f"at {_iso(self._expires_at)}")
        self._renewed_at, self._expires_at = now, now + self.ttl_s

    def _write_release(self) -> None:
        write_atomic(self.fs, self._path(self.generation), self._record(time.time(), released=True))

    def _lose(self, reason: str) -> None:
        logger.error("%s", reason)
        self._lost_reason = reason
        self._lost.set()

    def _safe_until(self) -> float:
        """Until when a write may start: one heartbeat interval before the lease could expire."""
        return self._expires_at - self.heartbeat_s

    def _policy_while_safe(self, budget_s: float = math.inf) -> RetryPolicy:
        """The store retry policy for a write of this run's lease record: retried for as long as a write into the
        output may still start, and at most ``budget_s``."""
        policy = self.retries.policy
        safe_s = max(0.0, self._safe_until() - time.time())
        if budget_s < safe_s:
            return replace(policy, budget_s=budget_s)
        return replace(policy, budget_s=safe_s, limit="while the lease lasts")

    def _expiring_reason(self) -> str:
        reason = (
            f"stopped committing to {self.url}: its lease was last renewed at {_iso(self._renewed_at)} and could "
            f"expire at {_iso(self._expires_at)} (--lease-ttl {self.ttl_s:g}), when another run may take over"
        )
        return reason + (f"; its heartbeats failed: {self._heartbeat_failure}" if self._heartbeat_failure else "")
