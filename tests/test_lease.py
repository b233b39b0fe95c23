"""The output lease with real processes: of two racing runs exactly one proceeds, a run that crashed on this host
is taken over at once, a crashed run's lease elsewhere expires and is taken over, a waiting run gets a released
lease, a live holder's heartbeat keeps its lease.

Every scenario runs on local disk and on S3 (moto's S3 app served on 127.0.0.1). The processes synchronise
through barriers, events and queues, never through sleeps.
"""

import json
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import boto3
import pytest

from pipeline.lease import LEASE_DIR, LeaseHeldError, OutputLease, create_exclusive
from pipeline.storage import join, resolve

ROOT = Path(__file__).resolve().parents[1]
# Generous: a live holder must not expire while the test machine is busy. The test that waits for an expiry
# writes a record that expires in a second instead.
LONG = dict(ttl_s=10.0, heartbeat_s=1.0)
# the heartbeat test needs a ttl to outlive, with room for a late heartbeat on a busy machine (8 beats per ttl)
BEATING = dict(ttl_s=4.0, heartbeat_s=0.5)
TIMEOUT = 60.0  # bounds every wait, so a hung child fails its test instead of hanging the suite

# Not fork: the pytest process has threads (the S3 server, torch's pools) that a fork would copy mid-state. A fork
# server is a clean single-threaded process that imports this module once and forks each run from there.
spawn = multiprocessing.get_context("forkserver")
spawn.set_forkserver_preload([__name__])


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's S3 app on 127.0.0.1, serving one request at a time.

    AWS S3 applies a conditional PUT (If-None-Match: *) atomically. moto checks the condition, then stores, with
    no lock between the two, so in its threaded server two racing PUTs could both pass the check. Serving one
    request at a time gives back S3's guarantee; the app is moto's own.
    """
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    class OneConnectionPerRequest(MotoRequestHandler):
        protocol_version = "HTTP/1.0"  # no keep-alive: an idle client cannot hold the single-threaded server

    app = DomainDispatcherApplication(create_backend_app)
    server = make_server("127.0.0.1", 0, app, threaded=False, request_handler=OneConnectionPerRequest)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join()


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    """``(url, storage_options)`` of a new, empty output on local disk or in a new S3 bucket."""
    if request.param == "local":
        return str(tmp_path / "captions"), {}
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = f"lease-{uuid.uuid4().hex[:12]}"
    credentials = dict(aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1")
    boto3.client("s3", endpoint_url=endpoint, **credentials).create_bucket(Bucket=bucket)
    options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
    return f"s3://{bucket}/captions", options


def lease_for(output, timing=LONG) -> OutputLease:
    url, storage_options = output
    fs, root = resolve(url, storage_options)
    return OutputLease(fs, root, **timing)


def iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat()


def record_of(expires_in_s: float, **holder) -> dict:
    """The lease record another run left, by default pid 4242 on another host; ``holder`` overrides its host,
    pid, pid_space and start_ticks. Expired if ``expires_in_s`` < 0."""
    now = time.time()
    return {
        "owner": "other-run",
        "host": "elsewhere",
        "pid": 4242,
        "pid_space": {"boot_id": "another-boot", "pid_namespace": "pid:[1]", "time_namespace": None},
        "start_ticks": 1,
        "acquired_at": iso(now - 3600),
        "heartbeat_at": iso(now - 60),
        "expires_at": iso(now + expires_in_s),
        "released": False,
        **holder,
    }


def write_record(output, generation: int, record: dict) -> None:
    fs, root = resolve(*output)
    create_exclusive(fs, join(root, LEASE_DIR, f"{generation:08d}.json"), json.dumps(record).encode())


def this_host(output, pid: int) -> dict:
    """Holder fields naming ``pid`` on this host, in this process's pid space, started when this process did."""
    here = lease_for(output)
    return dict(host=here.host, pid=pid, pid_space=dict(here.pid_space), start_ticks=here.start_ticks)


def exited_pid() -> int:
    """The pid of a process of this host that has exited and been reaped."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


# --- the runs, each in its own process -------------------------------------------------------------------------


def race(output, start, results, release):
    """Wait for the start signal, try once to take the lease, report; hold it until told to release."""
    lease = lease_for(output)
    start.wait(TIMEOUT)
    try:
        lease.acquire()
    except LeaseHeldError as error:
        results.put(("refused", str(error)))
        return
    results.put(("acquired", lease.owner))
    release.wait(TIMEOUT)
    lease.release()


def hold_until_killed(output, held):
    lease = lease_for(output).acquire()
    held.put(lease.owner)
    threading.Event().wait()  # until SIGKILL: no release, no more heartbeats


class SetOnWaiting(logging.Handler):
    """Sets an event when the lease logs that it found the output held and started waiting."""

    def __init__(self, event):
        super().__init__(logging.INFO)
        self.event = event

    def emit(self, record):
        if "waiting up to" in record.getMessage():
            self.event.set()


def wait_for_lease(output, waiting, results):
    logger = logging.getLogger("pipeline.lease")
    logger.setLevel(logging.INFO)
    logger.addHandler(SetOnWaiting(waiting))
    lease = lease_for(output).acquire(wait_s=TIMEOUT)
    results.put(lease.owner)
    lease.release()


# --- the tests -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("previous", ["none", "expired", "crashed here"])
def test_of_two_racing_runs_exactly_one_proceeds(output, previous):
    """On a new output, and on one whose last run crashed: the takeover is as atomic as the first take."""
    if previous == "expired":
        write_record(output, 0, record_of(expires_in_s=-60))
    if previous == "crashed here":
        write_record(output, 0, record_of(expires_in_s=3600, **this_host(output, exited_pid())))
    start, results, release = spawn.Barrier(3), spawn.Queue(), spawn.Event()
    runs = [spawn.Process(target=race, args=(output, start, results, release)) for _ in range(2)]
    for run in runs:
        run.start()
    start.wait(TIMEOUT)
    outcomes = sorted(results.get(timeout=TIMEOUT) for _ in runs)
    release.set()
    for run in runs:
        run.join(TIMEOUT)

    assert [kind for kind, _ in outcomes] == ["acquired", "refused"]
    (_, winner), (_, refusal) = outcomes
    assert f"owner {winner} on host " in refusal and "\n" not in refusal
    assert [run.exitcode for run in runs] == [0, 0]
    newest = lease_for(output).holder()
    assert newest.generation == (0 if previous == "none" else 1)
    assert newest.record["owner"] == winner and newest.record["released"]


def test_a_live_lease_refuses_and_names_its_holder(output):
    write_record(output, 0, record_of(expires_in_s=3600))
    with pytest.raises(LeaseHeldError, match=r"in use by another run: owner other-run on host elsewhere \(pid 4242\)") as refused:
        lease_for(output).acquire()
    assert refused.value.holder.generation == 0


def test_an_expired_lease_is_taken_over(output):
    write_record(output, 0, record_of(expires_in_s=-1))
    with lease_for(output).acquire() as lease:
        assert lease.holder().generation == 1 and lease.holder().record["owner"] == lease.owner
    assert lease.holder().record["released"]


def test_a_run_on_this_host_keeps_its_lease_while_it_runs_and_loses_it_at_once_when_killed(output, caplog):
    held = spawn.Queue()
    holder = spawn.Process(target=hold_until_killed, args=(output, held))
    holder.start()
    holder_owner = held.get(timeout=TIMEOUT)
    with pytest.raises(LeaseHeldError, match=rf"in use by another run: owner {holder_owner} on host .* \(pid {holder.pid}\)"):
        lease_for(output).acquire()
    holder.kill()
    holder.join(TIMEOUT)
    assert holder.exitcode == -signal.SIGKILL

    with caplog.at_level(logging.WARNING, logger="pipeline.lease"):
        with lease_for(output).acquire() as lease:  # no wait: long before the killed run's lease would expire
            assert lease.generation == 1
    (warning,) = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert f"from a crashed run (pid {holder.pid} has exited): owner {holder_owner} on host" in warning
    fs, root = resolve(*output)
    crashed_record = json.loads(fs.cat_file(join(root, LEASE_DIR, "00000000.json")))
    assert crashed_record["owner"] == holder_owner and not crashed_record["released"]


# a run as a plain child process of the test, which reaps it only when the test says so
HOLD_IN_A_CHILD = """
import json, sys
from pipeline.lease import OutputLease
from pipeline.storage import resolve
fs, root = resolve(sys.argv[1], json.loads(sys.argv[2]))
print(OutputLease(fs, root, ttl_s=10.0, heartbeat_s=1.0).acquire().owner, flush=True)
sys.stdin.read()
"""


def test_a_killed_run_not_yet_reaped_is_taken_over_at_once(output):
    """A zombie: its pid exists until its parent collects its exit status, but it runs no more."""
    url, storage_options = output
    command = [sys.executable, "-c", HOLD_IN_A_CHILD, url, json.dumps(storage_options)]
    holder = subprocess.Popen(command, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        holder_owner = holder.stdout.readline().strip()
        assert holder_owner, "the child never took the lease"
        holder.kill()
        os.waitid(os.P_PID, holder.pid, os.WEXITED | os.WNOWAIT)  # until it has exited, left unreaped
        with lease_for(output).acquire() as lease:
            assert lease.generation == 1
    finally:
        holder.kill()
        holder.wait()
    fs, root = resolve(*output)
    assert json.loads(fs.cat_file(join(root, LEASE_DIR, "00000000.json")))["owner"] == holder_owner


def test_a_reused_pid_is_taken_over_at_once(output, caplog):
    """The record names a running pid of this host (this test's), but one that started at another time."""
    reused = this_host(output, os.getpid())
    reused["start_ticks"] -= 1
    write_record(output, 0, record_of(expires_in_s=3600, **reused))
    with caplog.at_level(logging.WARNING, logger="pipeline.lease"):
        with lease_for(output).acquire() as lease:
            assert lease.generation == 1
    assert f"from a crashed run (pid {os.getpid()} now belongs to another process): owner other-run" in caplog.text


OUTSIDE_THIS_PID_SPACE = {  # a holder's record as another host, boot or container writes it
    "another host": lambda record: record.update(host="elsewhere"),
    "another boot": lambda record: record["pid_space"].update(boot_id="another-boot"),
    "another pid namespace": lambda record: record["pid_space"].update(pid_namespace="pid:[1]"),
    "another time namespace": lambda record: record["pid_space"].update(time_namespace="time:[1]"),
    "a host without /proc": lambda record: record.update(pid_space=None, start_ticks=None),
    "an older version": lambda record: (record.pop("pid_space"), record.pop("start_ticks")),
}


@pytest.mark.parametrize("writer", OUTSIDE_THIS_PID_SPACE)
def test_a_live_lease_from_outside_this_pid_space_is_respected(output, writer):
    """Its pid has exited here, but names another process there (or was recorded without its start time)."""
    record = record_of(expires_in_s=3600, **this_host(output, exited_pid()))
    OUTSIDE_THIS_PID_SPACE[writer](record)
    write_record(output, 0, record)
    with pytest.raises(LeaseHeldError) as refused:
        lease_for(output).acquire()
    message = str(refused.value)
    assert f"in use by another run: owner other-run on host {record['host']} (pid {record['pid']})" in message
    assert "\n" not in message


def test_a_crashed_run_elsewhere_is_waited_for_until_its_lease_expires(output):
    crashed = record_of(expires_in_s=1.0)
    write_record(output, 0, crashed)
    with lease_for(output).acquire(wait_s=TIMEOUT) as lease:
        assert lease.generation == 1
        assert time.time() >= datetime.fromisoformat(crashed["expires_at"]).timestamp()


def test_a_waiting_run_gets_the_lease_when_it_is_released(output):
    holder = lease_for(output).acquire()
    waiting, results = spawn.Event(), spawn.Queue()
    waiter = spawn.Process(target=wait_for_lease, args=(output, waiting, results))
    waiter.start()
    assert waiting.wait(TIMEOUT), "the waiter never found the lease held"
    holder.release()
    waiter_owner = results.get(timeout=TIMEOUT)
    waiter.join(TIMEOUT)

    assert waiter.exitcode == 0
    newest = lease_for(output).holder()
    assert (newest.generation, newest.record["owner"]) == (1, waiter_owner)


def test_the_heartbeat_keeps_a_live_holder_past_its_ttl(output):
    with lease_for(output, BEATING).acquire() as holder:
        with pytest.raises(LeaseHeldError):
            lease_for(output, BEATING).acquire(wait_s=1.5 * BEATING["ttl_s"])
        holder.check()
        assert holder.holder().generation == 0
