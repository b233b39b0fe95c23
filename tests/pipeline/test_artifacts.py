"""Compiled artifacts shared through the job's output (pipeline/artifacts.py): one replica compiles, the others wait
and fetch what it published, a dead compiler's claim is taken over, a broken artifact is never trusted."""

import io
import json
import tarfile
import threading
import time

import fsspec
import pytest

from pipeline import artifacts
from pipeline.artifacts import SharedArtifacts, pack
from pipeline.retry import StoreRetries

DIGEST = "0123456789abcdef01234567"


@pytest.fixture
def output(tmp_path):
    return SharedArtifacts(fsspec.filesystem("file"), str(tmp_path / "output"), StoreRetries())


def an_artifact(path):
    """A folder shaped like fms_smolvlm.compiled's (its content does not matter here)."""
    (path / "graphs").mkdir(parents=True)
    (path / "graphs" / "decode.greedy-many.0.pt").write_bytes(b"graph")
    (path / "manifest.json").write_text(json.dumps({"graphs": ["decode.greedy-many.0.pt"]}))
    return path


def test_one_replica_compiles_and_the_others_fetch_what_it_published(output, tmp_path, monkeypatch):
    monkeypatch.setattr(artifacts, "POLL_SECONDS", (0.01, 0.05))
    first = output.prepare(DIGEST, tmp_path / "node-a" / DIGEST)
    assert first == "compile"
    waiting = {}
    waiter = threading.Thread(target=lambda: waiting.update(how=output.prepare(DIGEST, tmp_path / "node-b" / DIGEST)))
    waiter.start()  # finds the claim: waits for the artifact
    compiled = an_artifact(tmp_path / "node-a" / DIGEST)
    output.publish(DIGEST, compiled)
    waiter.join(timeout=30)
    assert waiting == {"how": "fetched"}
    fetched = tmp_path / "node-b" / DIGEST
    assert (fetched / "graphs" / "decode.greedy-many.0.pt").read_bytes() == b"graph"
    assert not (tmp_path / "output" / "_compiled" / f"{DIGEST}.claim").exists()  # released with the publish
    assert output.prepare(DIGEST, fetched) == "local"  # a restarted replica on the same node
    assert output.prepare(DIGEST, tmp_path / "node-c" / DIGEST) == "fetched"  # a fresh node, a later run


def test_an_artifact_published_while_claiming_is_fetched_not_compiled(output, tmp_path, monkeypatch):
    """The compiling replica publishes (and drops its claim) between another replica's look for the artifact and
    that replica's claim: the claim succeeds, and the replica fetches what was published instead of compiling."""
    take_claim = output._take_claim

    def published_meanwhile(digest):
        output.publish(digest, an_artifact(tmp_path / "compiled"))
        return take_claim(digest)

    monkeypatch.setattr(output, "_take_claim", published_meanwhile)
    assert output.prepare(DIGEST, tmp_path / "node" / DIGEST) == "fetched"
    assert not (tmp_path / "output" / "_compiled" / f"{DIGEST}.claim").exists()


def test_an_expired_claim_is_taken_over(output, tmp_path, monkeypatch):
    """A replica that died compiling leaves its claim; once its deadline has passed another replica compiles."""
    monkeypatch.setattr(artifacts, "POLL_SECONDS", (0.01, 0.05))
    claim = tmp_path / "output" / "_compiled" / f"{DIGEST}.claim"
    claim.parent.mkdir(parents=True)
    claim.write_text(json.dumps({"host": "gone", "pid": 1, "deadline": time.time() - 1}))
    assert output.prepare(DIGEST, tmp_path / "node" / DIGEST) == "compile"
    assert json.loads(claim.read_text())["host"] != "gone"


def test_a_broken_artifact_in_the_output_is_ignored(output, tmp_path, caplog):
    tar = tmp_path / "output" / "_compiled" / f"{DIGEST}.tar"
    tar.parent.mkdir(parents=True)
    tar.write_bytes(b"not a tar archive")
    assert output.prepare(DIGEST, tmp_path / "node" / DIGEST) == "compile"  # compiles instead
    assert not (tmp_path / "node" / DIGEST).exists()
    assert "ignoring the compiled artifact" in caplog.text
    output.publish(DIGEST, an_artifact(tmp_path / "compiled"))  # replaced by the good one
    assert output.prepare(DIGEST, tmp_path / "other" / DIGEST) == "fetched"


def test_pack_keeps_the_folder_and_refuses_paths_outside_it(tmp_path):
    data = pack(an_artifact(tmp_path / "a"))
    artifacts.unpack(data, tmp_path / "b")
    assert (tmp_path / "b" / "graphs" / "decode.greedy-many.0.pt").read_bytes() == b"graph"
    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w") as archive:
        info = tarfile.TarInfo("../escaped")
        info.size = 1
        archive.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(tarfile.TarError):
        artifacts.unpack(evil.getvalue(), tmp_path / "c")
    assert not (tmp_path / "escaped").exists()
