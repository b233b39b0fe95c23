"""Compiled graphs shared by a job's replicas through its output, so that a job compiles once.

    OUTPUT/_compiled/<digest>.tar     # one replica's compile artifact (fms_smolvlm.compiled), packed
    OUTPUT/_compiled/<digest>.claim   # the replica compiling it now, and until when the others wait for it

A compiled replica starts from its node's compile cache. When that lacks the artifact it takes it from the output;
when the output lacks it too, the replica claims the compile (an exclusive create: one replica wins) and compiles,
or waits while another replica's claim is live, then loads what that one published. So the replicas of a run
compile once, a replica restarted after a fault loads instead of compiling, and a scheduled rerun on fresh nodes
starts warm. The digest names what makes the graphs valid (torch, the model's shape, dtype, device kind): another
GPU model or torch version gets its own artifact. A claim past its deadline (its replica died compiling) is taken
over; an artifact that does not load is ignored by the engine (and compiled again), never trusted. Every call to the
store runs under the job's retry policy.
"""

import io
import json
import logging
import os
import shutil
import socket
import tarfile
import time
import uuid
from pathlib import Path
import fsspec

from fms_smolvlm.errors import one_line
from pipeline.lease import create_exclusive
from pipeline.retry import StoreRetries
from pipeline.storage import join, write_atomic

logger = logging.getLogger(__name__)

COMPILED_DIR = "_compiled"
# how long others wait for a claimed compile before compiling themselves (the 256M shape compiles in minutes on 2
# CPU cores, well under this)
CLAIM_SECONDS = 1800.0
POLL_SECONDS = (1.0, 10.0)  # first and longest pause between looks for a claimed artifact


class SharedArtifacts:
    """The compile artifacts under one job output."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, retries: StoreRetries):
        self.fs = fs
        self.directory = join(root, COMPILED_DIR)
        self.retries = retries

    def _tar(self, digest: str) -> str:
        return join(self.directory, f"{digest}.tar")

    def _claim(self, digest: str) -> str:
        return join(self.directory, f"{digest}.claim")

    def prepare(self, digest: str, local: Path) -> str:
        """Put the artifact ``digest`` into the local folder ``local`` if the output has it (waiting for a replica
        that is compiling it). Returns how the replica starts: ``"local"`` (its node had it), ``"fetched"`` (from
        the output), or ``"compile"`` (this replica holds the claim: it compiles, then :meth:`publish`)."""
        if local.exists():
            return "local"
        pause = POLL_SECONDS[0]
        while True:
            if self.has(digest) and self._fetch(digest, local):
                return "fetched"
            if self._take_claim(digest):
                if self.has(digest) and self._fetch(digest, local):  # published (and released) since the look above
                    self.release(digest)
                    return "fetched"
                return "compile"
            logger.info("another replica is compiling %s: waiting for its artifact", digest)
            time.sleep(pause)
            pause = min(2 * pause, POLL_SECONDS[1])

    def has(self, digest: str) -> bool:
        return self._call(f"look for {self._tar(digest)}", lambda: self._exists(self._tar(digest)))

    def publish(self, digest: str, local: Path) -> None:
        """Upload the artifact at ``local`` (one PUT: readers see all of it or nothing), then drop any claim."""
        data = pack(local)
        self._call(f"write {self._tar(digest)}", lambda: write_atomic(self.fs, self._tar(digest), data))
        self.release(digest)
        logger.info("published the compiled artifact %s (%.1f MB) to %s", digest, len(data) / 1e6, self.directory)

    def release(self, digest: str) -> None:
        """Drop the claim on compiling ``digest``, if any (published, or the compile failed: another may compile)."""
        claim = self._claim(digest)
        self._call(f"remove {claim}", lambda: self.fs.rm(claim) if self._exists(claim) else None)

    def _call(self, what: str, function):
        return self.retries.call(what, function)

    def _exists(self, path: str) -> bool:
        self.fs.invalidate_cache(self.directory)  # another replica may have written since
        return self.fs.exists(path)

    def _take_claim(self, digest: str) -> bool:
        claim = self._claim(digest)
        record = {"host": socket.gethostname(), "pid": os.getpid(), "deadline": time.time() + CLAIM_SECONDS}
        try:
            self._call(f"create {claim}", lambda: create_exclusive(self.fs, claim, json.dumps(record).encode()))
            return True
        except FileExistsError:
            pass
        try:
            deadline = json.loads(self._call(f"read {claim}", lambda: self.fs.cat_file(claim)))["deadline"]
        except FileNotFoundError:  # released between the two calls: look again
            return False
        if deadline < time.time():
            logger.warning("the claim on compiling %s expired (its replica died?): compiling here", digest)
            self.release(digest)
        return False

    def _fetch(self, digest: str, local: Path) -> bool:
        """Unpack the output's artifact into ``local``; False (with a warning) for one that is not a tar archive."""
        data = self._call(f"read {self._tar(digest)}", lambda: self.fs.cat_file(self._tar(digest)))
        staging = local.with_name(f"{local.name}.fetching-{uuid.uuid4().hex[:8]}")
        try:
            unpack(data, staging)
        except (tarfile.TarError, OSError) as error:
            logger.warning("ignoring the compiled artifact %s in the output: %s", digest, one_line(error, with_type=True))
            shutil.rmtree(staging, ignore_errors=True)
            return False
        try:
            staging.rename(local)
        except OSError:  # another replica on this node fetched it first
            shutil.rmtree(staging, ignore_errors=True)
        logger.info("fetched the compiled artifact %s from %s", digest, self.directory)
        return True


def pack(directory: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(directory, arcname=".")
    return buffer.getvalue()


def unpack(data: bytes, directory: Path) -> None:
    directory.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(directory, filter="data")  # no paths outside it, no devices or setuid bits


def warm_up(engine, artifacts: SharedArtifacts) -> dict:
    """Ready a compiled replica's engine with the job's artifact: from this node's compile cache, else from the
    output (waiting while another replica compiles it), else compiled here and published. Returns the engine's
    warm-up report and ``artifact_source``: ``local``, ``fetched`` or ``compiled``."""
    compiled = engine.compiled
    source = artifacts.prepare(compiled.digest, compiled.directory)
    if source == "fetched":
        compiled.load()
    try:
        report = engine.warmup()
    except BaseException:
        if source == "compile":
            artifacts.release(compiled.digest)
        raise
    # publish what this replica compiled (also over a broken artifact), or a node's artifact the output lacks
    if report["artifact"] is not None and (report["graphs_compiled"] or not artifacts.has(compiled.digest)):
        artifacts.publish(compiled.digest, Path(report["artifact"]))
    elif source == "compile":
        artifacts.release(compiled.digest)
    return {**report, "artifact_source": "compiled" if report["graphs_compiled"] else source}
