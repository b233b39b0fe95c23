"""Fault injection for the job tests, in test code: Ray runs ``install`` in every worker process it starts for the
test session's Ray instance (``worker_process_setup_hook``), and a replica then fails on the shards a test names.

A test names them in the file at ``FAULTS_FILE_ENV`` (one shard id per line, ``*`` for every shard) for as long as
it wants the faults; the file is read at every batch, so faults come and go while the workers live on.
"""

import os
from pathlib import Path

FAULTS_FILE_ENV = "FMS_SMOLVLM_TEST_FAULTS"


def faulty_shards() -> set[str]:
    path = Path(os.environ[FAULTS_FILE_ENV])
    return set(path.read_text().split()) if path.exists() else set()


def install() -> None:
    from pipeline import stages

    serve = stages.CaptionActor.__call__

    async def serve_or_fail(self, batch):
        shards = set(batch.column("shard_id").to_pylist())
        failing = faulty_shards()
        if "*" in failing or shards & failing:
            raise RuntimeError(f"injected failure on shard {', '.join(sorted(shards))} (pid {os.getpid()})")
        return await serve(self, batch)

    stages.CaptionActor.__call__ = serve_or_fail
