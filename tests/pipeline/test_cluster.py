"""The job on more than one node, and the rules that decide where its work runs: one replica per node, a refusal
up front when the replicas would leave no CPU to preprocess with, and preprocessing never folded into the replicas
(issue 13)."""

import contextlib
import io
import threading

import fsspec
import pytest

from pipeline.config import JobConfig, parse_prompts
from pipeline.job import Resources, build_dataset, preprocess_settings
from pipeline.sources import discover_shards
from pipeline.testing import write_sample_shards
from tests.pipeline.cluster import (
    BARRIER_ENV,
    NODES_ENV,
    JobProcess,
    read_checkpoints,
    read_keys,
    replica_pid,
)

RUN_TIMEOUT_S = 300


def test_two_nodes_one_replica_each(checkpoint, tmp_path):
    """A head and a second node (``ray.cluster_utils.Cluster``, 2 CPUs each, in a subprocess: the session already has
    its own Ray in this process), ``--replicas 2``: the replicas go one to each node (SPREAD), both caption, and the
    output has every sample exactly once.

    A checkpoint's replica name (host:pid:device:node-ID) says where each replica ran; the test's worker hook also
    records the Ray node id of each replica's pid, and holds each replica's first batch until both have one, so that
    the work of this small job reaches both however far apart they start."""
    written = write_sample_shards(tmp_path / "input", shards=6, images_per_shard=1)
    output, nodes = tmp_path / "output", tmp_path / "nodes"
    nodes.mkdir()
    flags = ["--input", tmp_path / "input", "--output", output, "--model", checkpoint, "--max-new-tokens", "4",
             "--batch-size", "1", "--replicas", "2"]
    job = JobProcess(flags, env={NODES_ENV: str(nodes), BARRIER_ENV: "2"}, nodes=2, cpus_per_node=2)
    try:
        status = job.wait(timeout=RUN_TIMEOUT_S)
    finally:
        job.stop()

    assert status == 0, job.tail()
    cluster_nodes = set(job.wait_for("cluster nodes:")[0].split(":", 1)[1].split())
    assert len(cluster_nodes) == 2
    assert read_keys(output) == written  # exactly once
    pids = {replica_pid(replica) for record in read_checkpoints(output).values() for replica in record["replicas"]}
    node_of = {int(record.name): record.read_text() for record in nodes.iterdir() if record.name.isdigit()}
    assert len(pids) == 2 and pids <= set(node_of), (pids, node_of)  # two replicas captioned
    assert {node_of[pid] for pid in pids} == cluster_nodes  # one on each node
    # and the checkpoints themselves say so: a replica's name ends with its Ray node's id
    named = {replica.rsplit(":node-", 1)[1] for record in read_checkpoints(output).values() for replica in record["replicas"]}
    assert named == {node[:12] for node in cluster_nodes}


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
    resources = Resources(device="cpu", dtype="float32", replicas=replicas, batch_size=2, compile=False)
    dataset = build_dataset(config, shards, resources, preprocess_settings(config, None), video=False)
    operators = optimized_physical_plan(dataset)
    assert [op for op in operators if "preprocess_batch" in op and "CaptionActor" in op] == [], operators
    assert any("preprocess_batch" in op for op in operators) and any("CaptionActor" in op for op in operators), operators
    assert any(op.startswith("ActorPoolMapOperator[") and "CaptionActor" in op for op in operators), operators
