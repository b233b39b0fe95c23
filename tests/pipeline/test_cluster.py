"""The job on more than one node, and the rules that decide where its work runs: one replica per node, a node lost
mid-run (issue 22), a refusal up front when the replicas would leave no CPU to preprocess with, and preprocessing never
folded into the replicas (issue 13)."""

import contextlib
import io
import itertools
import os
import re
import signal
import threading

import fsspec
import pytest

from pipeline.config import JobConfig, parse_prompts
from pipeline.job import Resources, build_dataset, preprocess_settings
from pipeline.sources import discover_shards
from pipeline.testing import write_sample_shards
from tests.pipeline.cluster import (
    BARRIER_ENV,
    GATE_ENV,
    HEAD_NODE,
    HOLDING,
    NODES_ENV,
    OUTPUT_ENV,
    JobProcess,
    raylet_of,
    read_checkpoints,
    read_keys,
)

RUN_TIMEOUT_S = 300


def test_two_nodes_one_replica_each_and_a_lost_node_is_ridden_out(checkpoint, tmp_path):
    """A head and a second node (``ray.cluster_utils.Cluster``, 3 CPUs each, in a subprocess: the session already has
    its own Ray in this process), ``--replicas 2``: the replicas go one to each node (SPREAD) and both caption.

    Then the second node is lost mid-run (issue 22): once its replica has committed a shard and holds a batch, its
    raylet is killed, and the node, the replica and the batches it held are gone. Ray restarts the replica on the
    head, which has a CPU for it beside the one reading and preprocessing need, and sends it the lost batches again
    (Ray Data's actor restarts and actor task retries): the same run ends with exit 0, every sample exactly once.
    (Where the nodes that remain have no CPU to spare, the restarted replica waits for a node, or takes the CPU the
    reads need: the run waits for a replacement node until the stall watchdog ends it; the README says so.)

    A checkpoint's replica name (host:pid:device:node-ID) says where each replica ran; the test's worker hooks record
    the Ray node id of each replica's pid, hold each replica's first batch until both have one (so that the work of
    this small job reaches both however far apart they start), and hold the batches a replica gets once it has
    committed a shard until the test opens the gate (so that the kill lands with work in the lost replica: the head's
    replica holds at most 3, the rest go to the other). The kill waits until the head's replica has committed a shard
    too (the worker's may be first)."""
    written = write_sample_shards(tmp_path / "input", shards=12, images_per_shard=1)
    output, nodes, gate = tmp_path / "output", tmp_path / "nodes", tmp_path / "gate"
    nodes.mkdir()
    gate.mkdir()
    flags = ["--input", tmp_path / "input", "--output", output, "--model", checkpoint, "--max-new-tokens", "4",
             "--batch-size", "1", "--replicas", "2", "--dtype", "float32"]
    env = {NODES_ENV: str(nodes), BARRIER_ENV: "2", GATE_ENV: str(gate), OUTPUT_ENV: str(output)}
    job = JobProcess(flags, env=env, nodes=2, cpus_per_node=3)
    try:
        head = job.wait_for(HEAD_NODE, timeout=RUN_TIMEOUT_S)[0].split()[-1]
        lost = held_by_a_replica_off(head, job, nodes)
        worker = (nodes / str(lost)).read_text()
        wait_for_a_commit_on(head, job, output)  # both replicas have captioned before the loss
        committed_before, replicas_before = read_checkpoints(output), replica_nodes(nodes)
        os.kill(raylet_of(job.process.pid, worker), signal.SIGKILL)
        (gate / "open").touch()
        status = job.wait(timeout=RUN_TIMEOUT_S)
    finally:
        job.stop()

    assert status == 0, job.tail()
    assert job.error_lines() == []
    cluster_nodes = set(job.wait_for("cluster nodes:")[0].split(":", 1)[1].split())
    assert cluster_nodes == {head, worker}
    assert set(replicas_before.values()) == cluster_nodes  # one replica on each node
    # both captioned: a committed shard's replica name ends with its Ray node's id
    named = {replica.rsplit(":node-", 1)[1] for record in committed_before.values() for replica in record["replicas"]}
    assert named == {node[:12] for node in cluster_nodes}
    assert 2 <= len(committed_before) < len(written)  # lost mid-run
    assert read_keys(output) == written  # every sample exactly once
    restarted = {pid: node for pid, node in replica_nodes(nodes).items() if pid not in replicas_before}
    assert list(restarted.values()) == [head], restarted  # the lost replica, again, on the head


def held_by_a_replica_off(head: str, job: JobProcess, nodes) -> int:
    """The pid of the first replica outside node ``head`` that holds a batch (the gate's log lines name their pid)."""
    for count in itertools.count(1):
        line = job.wait_for(HOLDING, count=count, timeout=RUN_TIMEOUT_S)[-1]
        pid = int(re.search(rf"{HOLDING} \(pid (\d+)\)", line).group(1))  # Ray may append "[repeated 4x ...]"
        if (nodes / str(pid)).read_text() != head:
            return pid


def wait_for_a_commit_on(node: str, job: JobProcess, output) -> None:
    """Until a committed shard names a replica on Ray node ``node``: looked up at each "committed shard" line the
    driver logs (it logs a shard once its checkpoint is written)."""
    for count in itertools.count(1):
        job.wait_for("committed shard", count=count, timeout=RUN_TIMEOUT_S)
        if any(replica.endswith(f":node-{node[:12]}") for record in read_checkpoints(output).values()
               for replica in record["replicas"]):
            return


def replica_nodes(nodes) -> dict[int, str]:
    """pid -> Ray node id of each replica that has got a batch (the test hook's records)."""
    return {int(record.name): record.read_text() for record in nodes.iterdir() if record.name.isdigit()}


def run_in_thread(function, timeout: float):
    """``function()``'s result; fails the test (instead of blocking the suite) if it takes longer than ``timeout``."""
    outcome = {}

    def target():
        try:
            outcome["result"] = function()
        except BaseException as error:  # noqa: BLE001  (handed to the test)
            outcome["error"] = error

    thread = threading.Thread(target=target, name="job-under-test", daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"still running after {timeout} s: it hangs"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def test_replicas_that_leave_no_cpu_are_refused_up_front(run_job, tmp_path, capsys):
    """The session's Ray has 2 CPUs: 2 replicas would hold both and leave none to read and preprocess with, so the
    job stops before any work with exit 2 and one line naming the numbers; 1 replica runs to completion. Each run
    has a time limit, so a job that would wait forever for CPUs fails the test instead of hanging the suite."""
    written = write_sample_shards(tmp_path / "input", shards=2, images_per_shard=1)
    refused = run_in_thread(lambda: run_job(tmp_path / "input", tmp_path / "refused", "--replicas", "2"), timeout=120)
    error = capsys.readouterr().err.strip().splitlines()
    assert refused == 2 and len(error) == 1, error
    assert error[0].startswith("error: --replicas 2:") and "2 of the cluster's 2 CPUs" in error[0], error
    assert "use at most 1 replicas" in error[0], error
    assert not (tmp_path / "refused").exists()  # refused before any work

    status = run_in_thread(lambda: run_job(tmp_path / "input", tmp_path / "output", "--replicas", "1",
                                           "--max-new-tokens", "4"), timeout=RUN_TIMEOUT_S)
    assert status == 0, capsys.readouterr().err[-3000:]
    assert read_keys(tmp_path / "output") == written


def optimized_physical_plan(dataset) -> list[str]:
    """The operators Ray Data will run, from ``Dataset.explain()``'s optimized physical plan (the plan the streaming
    executor gets; explain() executes nothing)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        dataset.explain()
    text = printed.getvalue()
    marker = "-------- Physical Plan (Optimized) --------"
    assert marker in text, text
    return [line.strip().lstrip("+- ").strip() for line in text.split(marker, 1)[1].splitlines() if line.strip()]


@pytest.mark.parametrize("replicas", [1, 2, 3])
def test_preprocessing_never_runs_in_the_replicas(ray_local, checkpoint, tmp_path, replicas):
    """Whatever the replica count, Ray Data's optimizer keeps the CPU preprocessing an operator of its own: no
    physical operator holds both ``preprocess_batch`` and ``CaptionActor`` (decoding in the replicas would stall
    them)."""
    write_sample_shards(tmp_path / "input", shards=2, images_per_shard=1)
    shards = discover_shards(fsspec.filesystem("file"), str(tmp_path / "input"), None)
    config = JobConfig(input=str(tmp_path / "input"), output=str(tmp_path / "output"), model=str(checkpoint),
                       prompts=parse_prompts(None, None, ["4"]), replicas=replicas, batch_size=2)
    resources = Resources(device="cpu", dtype="float32", replicas=replicas, batch_size=2, compile=False, resize_on="cpu")
    dataset = build_dataset(config, shards, resources, preprocess_settings(config, None), video=False)
    operators = optimized_physical_plan(dataset)
    assert [op for op in operators if "preprocess_batch" in op and "CaptionActor" in op] == [], operators
    assert any("preprocess_batch" in op for op in operators) and any("CaptionActor" in op for op in operators), operators
    assert any(op.startswith("ActorPoolMapOperator[") and "CaptionActor" in op for op in operators), operators
