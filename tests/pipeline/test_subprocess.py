"""The job as users start it: a driver process that can be killed, and `ray job submit` to `ray start --head`."""

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import fsspec
import pytest

from pipeline.testing import write_sample_shards
from tests.pipeline.conftest import JOB_SCRIPT, REPO
from tests.pipeline.test_job import read_outputs

RAY = os.path.join(os.path.dirname(sys.executable), "ray")


def wait_for_log_lines(process: subprocess.Popen, marker: str, count: int, timeout: float) -> None:
    """Read the process's log until ``count`` lines contain ``marker``; a watchdog kills it after ``timeout`` s."""
    watchdog = threading.Timer(timeout, os.killpg, (process.pid, signal.SIGKILL))
    watchdog.start()
    try:
        seen = 0
        for line in process.stderr:
            seen += marker in line
            if seen == count:
                return
    finally:
        watchdog.cancel()
    raise AssertionError(f"the process ended (or ran past {timeout} s) before logging {count} lines with {marker!r}")


def job_command(input_dir, output_dir, model, *flags):
    return [sys.executable, str(JOB_SCRIPT), "--input", str(input_dir), "--output", str(output_dir),
            "--model", str(model), "--max-new-tokens", "4", *flags]


def test_kill_9_of_the_driver_loses_nothing_and_duplicates_nothing(checkpoint, tmp_path, run_job):
    written = write_sample_shards(tmp_path / "input", shards=10, images_per_shard=2)
    output = tmp_path / "output"
    env = {**os.environ, "RAY_ADDRESS": "local"}  # its own local Ray, which dies with its process group
    killed_run = job_command(tmp_path / "input", output, checkpoint, "--batch-size", "1", "--lease-ttl", "3")
    driver = subprocess.Popen(killed_run, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        wait_for_log_lines(driver, "committed shard", count=2, timeout=300)  # the job logs each commit
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    killed_at = {p.name for p in (output / "_checkpoints").glob("*.json")}
    assert 2 <= len(killed_at) < 10

    # the dead run's lease expires 3 s after its last heartbeat; the rerun waits for that instead of refusing
    assert run_job(tmp_path / "input", output, "--max-new-tokens", "4", "--batch-size", "1", "--wait-for-lease", "60") == 0
    summary = json.loads((output / "_summary.json").read_text())
    assert summary["shards_done"] + summary["shards_skipped"] == 10 and summary["shards_skipped"] >= len(killed_at)
    outputs = read_outputs(fsspec.filesystem("file"), str(output))
    assert {shard: [row["key"] for row in rows] for shard, rows in outputs.items()} == written
    assert not list(output.rglob("*.tmp-*"))  # no half-written file survives


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def ray_head():
    """`ray start --head` with the dashboard on 127.0.0.1 and token authentication (Ray's default) kept on.

    It runs with --block in a process group of its own, so the teardown stops this cluster only (`ray stop`
    would stop every Ray on the machine, the test session's own included).
    """
    dashboard = free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's unix socket paths must fit 107 bytes
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]  # as in an activated venv: `python` is ours
    env.pop("RAY_ADDRESS", None)
    start = [RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(free_port()),
             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--num-cpus", "2",
             "--include-dashboard", "true", "--disable-usage-stats", "--temp-dir", temp_dir,
             # its own agent ports: the test session's Ray already holds the fixed defaults
             "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
             "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port())]
    head = subprocess.Popen(start, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        # ready when the node's job agent takes a job (the dashboard answers before the agent is up); each try
        # is a CLI run of a second or more, which paces the loop
        probe = [RAY, "job", "submit", "--address", address, "--", "true"]
        deadline = time.monotonic() + 180
        while subprocess.run(probe, env=env, capture_output=True).returncode != 0:
            assert time.monotonic() < deadline, "the Ray job agent did not come up in 180 s"
        yield address, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_to_a_head_node(checkpoint, tmp_path, ray_head):
    address, env = ray_head
    written = write_sample_shards(tmp_path / "input", shards=2, images_per_shard=2)
    submit = [RAY, "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
              "python", "jobs/caption_dataset.py", "--input", str(tmp_path / "input"),
              "--output", str(tmp_path / "output"), "--model", str(checkpoint), "--max-new-tokens", "4"]
    result = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout
    listed = subprocess.run([RAY, "job", "list", "--address", address], env=env, capture_output=True, text=True)
    assert "SUCCEEDED" in listed.stdout
    outputs = read_outputs(fsspec.filesystem("file"), str(tmp_path / "output"))
    assert {shard: [row["key"] for row in rows] for shard, rows in outputs.items()} == written

    # without the cluster's token the job API refuses: authentication stays on
    anonymous = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"}
    anonymous["RAY_AUTH_TOKEN_PATH"] = str(tmp_path / "no-token")
    refused = subprocess.run([RAY, "job", "list", "--address", address], env=anonymous, capture_output=True, text=True)
    assert refused.returncode != 0
