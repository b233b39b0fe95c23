"""Helpers for test_resilience.py and test_cluster.py: the job as a subprocess with a Ray of its own (one node, or a
two-node cluster on this machine), this module's worker hooks, reading its log as it runs, finding Ray workers.

``python -m tests.pipeline.cluster [--nodes N] [--cpus-per-node C] -- JOB FLAGS...`` starts the Ray instance (with
``ray.cluster_utils.Cluster`` for several nodes), installs :func:`install` in every worker it starts, and runs the
real CLI (``jobs/caption_dataset.py``'s ``main``) in that process, which joins it as ``ray job submit`` would.

Worker hooks, each off unless its environment variable is set (the runner passes them on to the workers):

* ``FMS_SMOLVLM_TEST_GATE=DIR``: once the output (``FMS_SMOLVLM_TEST_OUTPUT``) holds a checkpoint of a shard it
  captioned, a replica holds every batch it is given until the file ``DIR/open`` exists, and prints
  ``test-hook: holding a batch (pid N)`` (Ray forwards it to the driver's log) when it starts to hold one;
* ``FMS_SMOLVLM_TEST_STALL=SHARD_ID``: a replica never returns a batch of that shard (prints ``test-hook: stalling``);
* ``FMS_SMOLVLM_TEST_NODES=DIR``: a replica writes ``DIR/<pid>`` holding the Ray node id it runs on, when its
  first batch arrives; with ``FMS_SMOLVLM_TEST_BARRIER=N`` too, it then holds that batch until N replicas have
  (or 120 s have passed), so that a small job's work reaches every replica however far apart they start.
"""

import argparse
import asyncio
import faulthandler
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GATE_ENV = "FMS_SMOLVLM_TEST_GATE"
OUTPUT_ENV = "FMS_SMOLVLM_TEST_OUTPUT"
STALL_ENV = "FMS_SMOLVLM_TEST_STALL"
NODES_ENV = "FMS_SMOLVLM_TEST_NODES"
BARRIER_ENV = "FMS_SMOLVLM_TEST_BARRIER"
HOOK_ENVS = (GATE_ENV, OUTPUT_ENV, STALL_ENV, NODES_ENV, BARRIER_ENV)
BARRIER_TIMEOUT_S = 120
REPLICA_TITLE = "ray::MapWorker(MapBatches(CaptionActor))"
HEAD_NODE = "head node:"
HOLDING = "test-hook: holding a batch"
STALLING = "test-hook: stalling"


# ---- in the Ray workers -------------------------------------------------------------------------------------------


_STALLED: list = []


def install() -> None:
    """Ray's ``worker_process_setup_hook``: wraps ``CaptionActor.__call__`` with the hooks the environment asks for."""
    if not any(os.environ.get(name) for name in HOOK_ENVS):
        return
    from pipeline import stages

    serve = stages.CaptionActor.__call__

    async def hooked(self, batch):
        await _record_node()
        shards = set(batch.column("shard_id").to_pylist())
        if os.environ.get(STALL_ENV) in shards:
            print(f"{STALLING} on {os.environ[STALL_ENV]} (pid {os.getpid()})", file=sys.stderr, flush=True)
            never = asyncio.Event()
            _STALLED.append(never)  # kept reachable: a coroutine that only garbage references would be collected
            await never.wait()  # never set: this batch never returns
        await _gate(self.replica)
        return await serve(self, batch)

    stages.CaptionActor.__call__ = hooked


async def _record_node() -> None:
    directory = os.environ.get(NODES_ENV)
    if not directory:
        return
    record = Path(directory) / str(os.getpid())
    if not record.exists():
        import ray

        temporary = record.with_suffix(".tmp")
        temporary.write_text(ray.get_runtime_context().get_node_id())
        temporary.rename(record)
    replicas = int(os.environ.get(BARRIER_ENV) or 0)
    deadline = time.monotonic() + BARRIER_TIMEOUT_S
    while len([p for p in Path(directory).iterdir() if p.name.isdigit()]) < replicas and time.monotonic() < deadline:
        await asyncio.sleep(0.05)  # a condition in other processes: look again every 50 ms


async def _gate(replica: str) -> None:
    gate = os.environ.get(GATE_ENV)
    if not gate:
        return
    opened = Path(gate) / "open"
    records = read_checkpoints(Path(os.environ[OUTPUT_ENV])).values()
    if opened.exists() or not any(replica in record["replicas"] for record in records):
        return
    print(f"{HOLDING} (pid {os.getpid()})", file=sys.stderr, flush=True)
    while not opened.exists():  # a condition in another process: look again every 50 ms
        await asyncio.sleep(0.05)


# ---- the runner (a subprocess of the test) ------------------------------------------------------------------------


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.pipeline.cluster")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--cpus-per-node", type=int, default=2)
    parser.add_argument("job", nargs=argparse.REMAINDER, help="-- then the job's flags")
    args = parser.parse_args(argv)
    job_args = args.job[1:] if args.job[:1] == ["--"] else args.job

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # JobProcess.wait() asks a hung job where it hangs

    import ray

    env_vars = {name: os.environ[name] for name in HOOK_ENVS if os.environ.get(name)}
    runtime_env = {
        "worker_process_setup_hook": "tests.pipeline.cluster.install",
        "env_vars": {**env_vars, "PYTHONPATH": str(REPO)},  # the hook lives in tests/, which is not installed
    }
    cluster = None
    if args.nodes == 1:
        ray.init(address="local", num_cpus=args.cpus_per_node, include_dashboard=False,
                 logging_level=logging.WARNING, runtime_env=runtime_env)
    else:
        from ray.cluster_utils import Cluster

        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": args.cpus_per_node, "include_dashboard": False})
        for _ in range(args.nodes - 1):
            cluster.add_node(num_cpus=args.cpus_per_node)
        ray.init(address=cluster.address, logging_level=logging.WARNING, runtime_env=runtime_env)
        cluster.wait_for_nodes()
        nodes = [node["NodeID"] for node in ray.nodes() if node["Alive"]]
        print(f"cluster nodes: {' '.join(nodes)}", file=sys.stderr, flush=True)
        print(f"{HEAD_NODE} {cluster.head_node.node_id}", file=sys.stderr, flush=True)

    sys.path.insert(0, str(REPO / "jobs"))
    import caption_dataset

    try:
        return caption_dataset.main(job_args)
    finally:
        if cluster is not None:  # a single node ends as the CLI's own does: Ray's exit handler shuts it down
            ray.shutdown()
            cluster.shutdown()


# ---- in the test process ------------------------------------------------------------------------------------------


class JobProcess:
    """The runner in a session of its own; a thread reads its log (stderr) while it runs, so that a test can
    wait for lines; ``stop()`` kills the whole group (its Ray instance included)."""

    def __init__(self, job_flags: list, env: dict | None = None, nodes: int = 1, cpus_per_node: int = 2):
        command = [sys.executable, "-m", "tests.pipeline.cluster", "--nodes", str(nodes),
                   "--cpus-per-node", str(cpus_per_node), "--", *map(str, job_flags)]
        # RAY_DEDUP_LOGS=0: Ray folds worker log lines that differ only in their numbers, and the hooks' lines are told
        # apart by the pid they name
        environment = {**os.environ, "PYTHONPATH": str(REPO), "RAY_DEDUP_LOGS": "0", **(env or {})}
        environment.pop("RAY_ADDRESS", None)
        self.process = subprocess.Popen(command, cwd=REPO, env=environment, start_new_session=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.stdout = ""
        self._changed = threading.Condition()
        self._done = False
        self._readers = [threading.Thread(target=self._read_log, daemon=True),
                         threading.Thread(target=self._read_stdout, daemon=True)]
        for reader in self._readers:
            reader.start()

    def _read_log(self) -> None:
        for line in self.process.stderr:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._done = True
            self._changed.notify_all()

    def _read_stdout(self) -> None:
        self.stdout = self.process.stdout.read()

    def wait_for(self, marker: str, count: int = 1, timeout: float = 120) -> list[str]:
        """Until ``count`` log lines contain ``marker``: returns them; fails if the process ends first or time runs
        out."""

        def matching() -> list[str]:
            return [line for line in self.lines if marker in line]

        with self._changed:
            found = self._changed.wait_for(lambda: len(matching()) >= count or self._done, timeout)
            lines = matching()
        assert len(lines) >= count, (
            f"{'the job ended' if found else f'{timeout} s passed'} before {count} log lines with {marker!r}:\n"
            + self.tail()
        )
        return lines[:count]

    def wait(self, timeout: float) -> int:
        """The exit status; kills the group and fails if the process runs past ``timeout``."""
        try:
            status = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.send_signal(signal.SIGUSR1)  # the runner dumps its threads' stacks to its log
            with self._changed:
                self._changed.wait_for(lambda: any("most recent call first" in line for line in self.lines), 10)
                seen = -1
                while seen != len(self.lines):  # the rest of the dump: until no line comes for a second
                    seen = len(self.lines)
                    self._changed.wait_for(lambda seen=seen: len(self.lines) > seen, 1)
            self.stop()
            raise AssertionError(f"the job ran past {timeout} s:\n{self.tail(200)}") from None
        for reader in self._readers:
            reader.join(timeout=30)
        return status

    def stop(self) -> None:
        """Kill the runner's session: its process group (the job, its Ray instance), and the Ray workers, which
        each have a process group of their own; idempotent."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        for pid in processes_in_session(self.process.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.lines[-lines:])

    def error_lines(self) -> list[str]:
        """The job's own one-line reasons: stderr lines that start with ``error:``."""
        return [line for line in self.lines if line.startswith("error:")]


def processes_in_session(session: int, title: str = "") -> list[int]:
    """Pids of the live processes of session ``session`` whose command line (Ray sets it to the worker's title)
    starts with ``title``. (Ray gives each worker a process group of its own; the session is the runner's.)"""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # exited while we looked
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # the command name (field 2) may hold spaces
        state, sid = fields[0], int(fields[3])
        if sid == session and state != "Z" and cmdline.startswith(title):
            pids.append(int(entry.name))
    return sorted(pids)


def raylet_of(session: int, node_id: str) -> int:
    """The pid of Ray node ``node_id``'s raylet (its command line names the node) among session ``session``'s
    processes."""

    def arguments(pid: int) -> list[bytes]:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")

    node = f"--node_id={node_id}".encode()
    [pid] = [pid for pid in processes_in_session(session) if arguments(pid)[0].endswith(b"/raylet") and node in arguments(pid)]
    return pid


def read_checkpoints(output: Path) -> dict[str, dict]:
    return {path.name[: -len(".json")]: json.loads(path.read_text()) for path in (output / "_checkpoints").glob("*.json")}


def read_keys(output: Path) -> dict[str, list]:
    """shard_id -> the keys of its committed Parquet file, in order."""
    import pyarrow.parquet as pq

    return {path.name[: -len(".parquet")]: pq.read_table(path).column("key").to_pylist()
            for path in sorted((output / "shards").glob("*.parquet"))}


def replica_pid(replica: str) -> int:
    """The pid in a checkpoint's replica name ``host:pid:device:node-ID``."""
    return int(replica.split(":")[1])


if __name__ == "__main__":
    sys.exit(main())
