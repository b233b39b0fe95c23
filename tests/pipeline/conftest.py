import importlib.util
import logging
from pathlib import Path

import pytest

from pipeline.testing import sample_images
from tests.pipeline.faults import FAULTS_FILE_ENV

REPO = Path(__file__).resolve().parents[2]
JOB_SCRIPT = REPO / "jobs" / "caption_dataset.py"


def _load_job_module():
    spec = importlib.util.spec_from_file_location("caption_dataset", JOB_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


caption_dataset = _load_job_module()


@pytest.fixture(scope="session")
def faults_file(tmp_path_factory):
    """Where a test names the shards a replica must fail on (tests/pipeline/faults.py)."""
    return tmp_path_factory.mktemp("faults") / "shards"


@pytest.fixture(scope="session")
def ray_local(faults_file):
    """One real local Ray instance for the in-process job runs (the job joins it instead of starting its own);
    its workers carry the test fault injection, idle until a test writes ``faults_file``."""
    import ray

    runtime_env = {
        "worker_process_setup_hook": "tests.pipeline.faults.install",
        # the hook lives in tests/, which is not installed: workers import it from the checkout
        "env_vars": {FAULTS_FILE_ENV: str(faults_file), "PYTHONPATH": str(REPO)},
    }
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, runtime_env=runtime_env)
    yield ray
    ray.shutdown()


@pytest.fixture
def fail_on_shards(faults_file):
    """``fail_on_shards("part-00005.tar")`` (or ``"*"``): replicas fail on those shards until the test ends."""

    def set_faults(*shard_ids: str) -> None:
        faults_file.write_text("\n".join(shard_ids))

    yield set_faults
    faults_file.unlink(missing_ok=True)


def run_cli(model, input_url, output_url, *flags) -> int:
    """The real CLI, in-process (it joins the session's Ray); its exit status. fp32 unless ``flags`` say otherwise (the
    outputs are compared with Captioner's fp32 captions; `--dtype auto` would be bf16 on a CPU with AMX)."""
    argv = ["--input", str(input_url), "--output", str(output_url), "--model", str(model), "--max-new-tokens", "6",
            "--dtype", "float32", *flags]
    return caption_dataset.main(argv)


@pytest.fixture
def run_job(ray_local, checkpoint):
    """``run_job(input, output, *flags)`` runs the real CLI in-process; returns its exit status."""

    def run(input_url, output_url, *flags, model=None):
        return run_cli(model or checkpoint, input_url, output_url, *flags)

    return run


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 HTTP server on 127.0.0.1, with one bucket; yields (fs, storage_options)."""
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": f"http://{host}:{port}"}}
    fs = s3fs.S3FileSystem(**options)
    fs.mkdir("captions-test")
    yield fs, options
    server.stop()


def expected_images(images_per_shard: int, shard: int, seed: int = 0) -> list[bytes]:
    """The bytes pipeline.testing wrote for shard number ``shard``."""
    return [data for _, data in sample_images(images_per_shard, seed + shard)]
