"""The captioning job end to end on a real local Ray instance, on local disk and on S3 (moto's server)."""

import io
import json
import os
import shutil
import tarfile
import warnings
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import pytest

from fms_smolvlm import Captioner
from fms_smolvlm.processing import SmolVLMPreprocessor, SourceImage
from pipeline.commit import OUTPUT_SCHEMA
from pipeline.lease import OutputLease
from pipeline.testing import (
    encode,
    synthetic_image,
    write_folder_shard,
    write_parquet_shard,
    write_sample_shards,
    write_webdataset_shard,
)
from tests.pipeline.conftest import expected_images

PROMPT = "Describe this image in one sentence."  # the CLI's default
IMAGES_PER_SHARD = 3


def read_outputs(fs, root: str) -> dict[str, list[dict]]:
    """shard_id -> rows, from the committed Parquet files."""
    outputs = {}
    for path in sorted(fs.glob(f"{root}/shards/*.parquet")):
        with fs.open(path, "rb") as handle:
            table = pq.read_table(handle)
        assert table.schema.equals(OUTPUT_SCHEMA), table.schema
        outputs[path.rsplit("/", 1)[-1][: -len(".parquet")]] = table.to_pylist()
    return outputs


def read_json(fs, path: str) -> dict:
    with fs.open(path, "rb") as handle:
        return json.loads(handle.read())


def write_mixed_input(directory: Path) -> dict[str, tuple[list[str], list[bytes]]]:
    """One shard of each format; returns shard_id -> (keys, image bytes) in shard order."""
    images = {fmt: expected_images(IMAGES_PER_SHARD, i) for i, fmt in enumerate(["webdataset", "parquet", "folder"])}
    with_ext = {fmt: [("jpg", data) for data in images[fmt]] for fmt in images}
    directory.mkdir(parents=True)
    return {
        "part-0.tar": (write_webdataset_shard(directory / "part-0.tar", with_ext["webdataset"]), images["webdataset"]),
        "part-1.parquet": (write_parquet_shard(directory / "part-1.parquet", with_ext["parquet"]), images["parquet"]),
        "photos%2Fday1": (write_folder_shard(directory / "photos" / "day1", with_ext["folder"]), images["folder"]),
    }


@pytest.fixture(scope="module")
def reference_captions(checkpoint):
    """What Captioner.generate says about every image of the mixed input."""
    captioner = Captioner.from_pretrained(checkpoint, dtype="float32")
    captions = {}
    for shard in range(3):
        images = expected_images(IMAGES_PER_SHARD, shard)
        for data, result in zip(images, captioner.generate(images, PROMPT, max_new_tokens=6)):
            captions[data] = result.text
    return captions


def assert_output_matches(fs, root, shards, reference_captions):
    outputs = read_outputs(fs, root)
    assert sorted(outputs) == sorted(shards)
    for shard_id, (keys, images) in shards.items():
        rows = outputs[shard_id]
        assert [row["key"] for row in rows] == keys  # exactly one row per sample, in shard order
        for row, data in zip(rows, images):
            assert row["shard_id"] == shard_id and row["error"] is None
            assert row["caption"] == reference_captions[data]
            assert row["finish_reason"] in ("stop", "length") and 0 < row["num_generated_tokens"] <= 6
            assert row["num_image_tokens"] > 0 and row["width"] > 0 and row["height"] > 0
        checkpoint = read_json(fs, f"{root}/_checkpoints/{shard_id}.json")
        assert checkpoint["rows"] == len(keys) and checkpoint["error_rows"] == 0 and checkpoint["replicas"]
    summary = read_json(fs, f"{root}/_summary.json")
    assert summary["shards_done"] == len(shards) and summary["images"] == len(shards) * IMAGES_PER_SHARD
    assert read_json(fs, f"{root}/_job.json")["prompt"] == PROMPT


def test_every_format_on_local_disk(run_job, tmp_path, reference_captions):
    shards = write_mixed_input(tmp_path / "input")
    assert run_job(tmp_path / "input", tmp_path / "output") == 0
    assert_output_matches(fsspec.filesystem("file"), str(tmp_path / "output"), shards, reference_captions)


def test_every_format_on_s3(run_job, tmp_path, s3_server, reference_captions):
    fs, options = s3_server
    shards = write_mixed_input(tmp_path / "input")
    fs.put(str(tmp_path / "input"), "captions-test/mixed/input", recursive=True)
    status = run_job("s3://captions-test/mixed/input", "s3://captions-test/mixed/output",
                     "--storage-options", json.dumps(options))
    assert status == 0
    fs.invalidate_cache()
    assert_output_matches(fs, "captions-test/mixed/output", shards, reference_captions)


def test_resizing_on_the_replica_gives_the_cpu_path_output_locally_and_on_s3(run_job, tmp_path, s3_server, checkpoint):
    """The GPU replicas' way (the CPU stage ships a decoded image when that is fewer bytes than its tiles, the replica
    resizes and tiles it) on CPU replicas: the CPU path's output, every column of every row, from local disk and S3.
    The e2e shards and one of small images, which travel as pixels (the others as tiles)."""
    shards = write_mixed_input(tmp_path / "input")
    small = [("png", encode(synthetic_image(w, h, seed=i), "PNG")) for i, (w, h) in enumerate([(96, 96), (60, 45), (100, 120)])]
    write_webdataset_shard(tmp_path / "input" / "small.tar", small)
    preprocessor = SmolVLMPreprocessor.from_pretrained(checkpoint, resize_on="replica")
    images = [data for _, images in shards.values() for data in images] + [data for _, data in small]
    shipped = [isinstance(preprocessor.process(data, [PROMPT]).tiles, SourceImage) for data in images]
    assert shipped[-3:] == [True] * 3 and not any(shipped[:-3])
    local = fsspec.filesystem("file")
    assert run_job(tmp_path / "input", tmp_path / "cpu", "--resize-on", "cpu") == 0
    assert run_job(tmp_path / "input", tmp_path / "replica", "--resize-on", "replica") == 0
    expected = read_outputs(local, str(tmp_path / "cpu"))
    assert read_outputs(local, str(tmp_path / "replica")) == expected and len(expected) == 4
    fs, options = s3_server
    fs.put(str(tmp_path / "input"), "captions-test/resize/input", recursive=True)
    status = run_job("s3://captions-test/resize/input", "s3://captions-test/resize/output", "--resize-on", "replica",
                     "--storage-options", json.dumps(options))
    assert status == 0
    fs.invalidate_cache()
    assert read_outputs(fs, "captions-test/resize/output") == expected


def tar_of(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as archive:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))


def test_bad_data_becomes_error_rows(run_job, tmp_path):
    good = expected_images(2, 0)
    (tmp_path / "input").mkdir()
    tar_of(tmp_path / "input" / "bad.tar", {
        "a.jpg": good[0],
        "b.jpg": good[1][: len(good[1]) // 3],  # truncated
        "c.png": b"this is a text file with an image extension",
        "d.json": b"{}",  # a sample without an image
    })
    tar_of(tmp_path / "input" / "empty.tar", {})
    tar_of(tmp_path / "input" / "single.tar", {"only.jpg": good[0]})
    assert run_job(tmp_path / "input", tmp_path / "output") == 0
    outputs = read_outputs(fsspec.filesystem("file"), str(tmp_path / "output"))
    assert sorted(outputs) == ["bad.tar", "empty.tar", "single.tar"]
    assert outputs["empty.tar"] == []
    assert [row["key"] for row in outputs["single.tar"]] == ["only"] and outputs["single.tar"][0]["error"] is None
    bad = {row["key"]: row for row in outputs["bad.tar"]}
    assert sorted(bad) == ["a", "b", "c", "d"]
    assert bad["a"]["error"] is None and bad["a"]["caption"]
    assert "truncated" in bad["b"]["error"] and bad["b"]["caption"] is None
    assert bad["c"]["error"] == "not an image (unrecognised file format)"
    assert bad["d"]["error"] == "sample has no image or video file (json)"
    checkpoint = json.loads((tmp_path / "output" / "_checkpoints" / "bad.tar.json").read_text())
    assert checkpoint["rows"] == 4 and checkpoint["error_rows"] == 3


def test_an_image_too_long_for_the_model_is_an_error_row(run_job, tmp_path):
    """With a large image budget a square image's tiles (16 x 16 + 1 of 16 tokens) outgrow the model's positions:
    that row says so, the wide image beside it is captioned, the run succeeds."""
    (tmp_path / "input").mkdir()
    tar_of(tmp_path / "input" / "budget.tar", {"square.png": encode(synthetic_image(300, 300, seed=1), "PNG"),
                                              "wide.png": encode(synthetic_image(400, 50, seed=2), "PNG")})
    assert run_job(tmp_path / "input", tmp_path / "output", "--image-longest-edge", "512") == 0
    rows = {row["key"]: row for row in read_outputs(fsspec.filesystem("file"), str(tmp_path / "output"))["budget.tar"]}
    assert "exceeds the model's 4091 positions" in rows["square"]["error"] and rows["square"]["caption"] is None
    assert rows["wide"]["error"] is None and rows["wide"]["caption"] is not None


def test_unreadable_shard_fails_alone(run_job, tmp_path, capsys):
    write_sample_shards(tmp_path / "input", shards=1, images_per_shard=2)
    (tmp_path / "input" / "broken.tar").write_bytes(b"\x00garbage that is no tar archive" * 40)
    assert run_job(tmp_path / "input", tmp_path / "output") == 1
    assert "1 of 2 pending shards not committed" in capsys.readouterr().err
    outputs = read_outputs(fsspec.filesystem("file"), str(tmp_path / "output"))
    assert sorted(outputs) == ["part-00000.tar"]
    summary = json.loads((tmp_path / "output" / "_summary.json").read_text())
    assert summary["shards_failed"] == 1 and "broken.tar" in summary["failed_shards"]


def test_resume_after_failure_processes_only_unfinished_shards(run_job, tmp_path, fail_on_shards, capsys):
    written = write_sample_shards(tmp_path / "input", shards=6, images_per_shard=2)
    output = tmp_path / "output"
    fail_on_shards("part-00005.tar")  # the replica raises when the last shard reaches it
    assert run_job(tmp_path / "input", output, "--batch-size", "1") == 1
    assert "RuntimeError: injected failure on shard part-00005.tar" in capsys.readouterr().err  # not Ray's wrapper
    committed = sorted(p.name for p in (output / "_checkpoints").glob("*.json"))
    # progress is durable while the job runs: shards were committed before the failure, not none
    # (how many of the 5 earlier ones reached the commit before the failure surfaced is up to Ray's scheduling)
    assert 1 <= len(committed) <= 5 and "part-00005.tar.json" not in committed, committed
    first_run = {p.name: p.stat().st_mtime_ns for p in (output / "shards").glob("*.parquet")}

    fail_on_shards()
    assert run_job(tmp_path / "input", output, "--batch-size", "1") == 0
    summary = json.loads((output / "_summary.json").read_text())
    assert summary["shards_skipped"] == len(committed) and summary["shards_done"] == 6 - len(committed)
    outputs = read_outputs(fsspec.filesystem("file"), str(output))
    assert {shard: [row["key"] for row in rows] for shard, rows in outputs.items()} == written
    for name in (f"{shard}.parquet" for shard in (c[: -len(".json")] for c in committed)):
        assert (output / "shards" / name).stat().st_mtime_ns == first_run[name]  # not redone

    # a rerun with the same flags does no model work: a replica that would fail on any batch is never used
    fail_on_shards("*")
    assert run_job(tmp_path / "input", output, "--batch-size", "1") == 0
    assert json.loads((output / "_summary.json").read_text())["shards_done"] == 0


def test_changed_settings_are_refused_unless_overwrite(run_job, tmp_path, capsys):
    write_sample_shards(tmp_path / "input", shards=2, images_per_shard=1)
    assert run_job(tmp_path / "input", tmp_path / "output") == 0
    capsys.readouterr()
    assert run_job(tmp_path / "input", tmp_path / "output", "--prompt", "What color dominates?") == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "different settings (prompt changed)" in error and "--overwrite" in error
    assert run_job(tmp_path / "input", tmp_path / "output", "--prompt", "What color dominates?", "--overwrite") == 0
    assert json.loads((tmp_path / "output" / "_summary.json").read_text())["shards_done"] == 2
    assert json.loads((tmp_path / "output" / "_job.json").read_text())["prompt"] == "What color dominates?"


def test_output_inside_the_input_is_not_read_back(run_job, tmp_path):
    write_sample_shards(tmp_path / "data", shards=2, images_per_shard=1)
    assert run_job(tmp_path / "data", tmp_path / "data" / "captions") == 0
    assert run_job(tmp_path / "data", tmp_path / "data" / "captions") == 0
    summary = json.loads((tmp_path / "data" / "captions" / "_summary.json").read_text())
    assert (summary["shards_done"], summary["shards_skipped"], summary["shards_failed"]) == (0, 2, 0)


def test_an_upgrade_continues_the_job(run_job, tmp_path):
    """The package version (and the dtype) are recorded in _job.json but do not make a rerun a different job."""
    write_sample_shards(tmp_path / "input", shards=2, images_per_shard=1)
    assert run_job(tmp_path / "input", tmp_path / "output", "--limit-shards", "1") == 0
    job_file = tmp_path / "output" / "_job.json"
    job_file.write_text(job_file.read_text().replace('"package_version": "', '"package_version": "0.0.0-old-'))
    assert run_job(tmp_path / "input", tmp_path / "output") == 0
    assert json.loads((tmp_path / "output" / "_summary.json").read_text())["shards_done"] == 1


def test_new_shard_in_a_growing_input_is_the_only_work(run_job, tmp_path):
    write_sample_shards(tmp_path / "input", shards=2, images_per_shard=1)
    assert run_job(tmp_path / "input", tmp_path / "output") == 0
    write_sample_shards(tmp_path / "new", shards=3, images_per_shard=1)
    shutil.copy(tmp_path / "new" / "part-00002.tar", tmp_path / "input" / "part-00002.tar")
    assert run_job(tmp_path / "input", tmp_path / "output") == 0
    summary = json.loads((tmp_path / "output" / "_summary.json").read_text())
    assert (summary["shards_done"], summary["shards_skipped"], summary["images"]) == (1, 2, 1)


def test_dry_run_lists_and_writes_nothing(run_job, tmp_path, capsys):
    write_sample_shards(tmp_path / "input", shards=2, images_per_shard=1)
    assert run_job(tmp_path / "input", tmp_path / "output", "--limit-shards", "1") == 0
    capsys.readouterr()
    assert run_job(tmp_path / "input", tmp_path / "output", "--dry-run") == 0
    out = capsys.readouterr().out
    assert "2 shards: 1 done, 1 to do" in out and "todo  part-00001.tar" in out and "done  part-00000.tar" in out
    assert sorted(p.name for p in (tmp_path / "output" / "shards").iterdir()) == ["part-00000.tar.parquet"]


def test_a_second_run_on_a_leased_output_is_refused(run_job, tmp_path, capsys):
    write_sample_shards(tmp_path / "input", shards=1, images_per_shard=1)
    output = str(tmp_path / "output")
    with OutputLease(fsspec.filesystem("file"), output).acquire():  # another run holds the output
        assert run_job(tmp_path / "input", output) == 2
        error = capsys.readouterr().err.strip()
        assert error.count("\n") == 0 and "is in use by another run" in error
        assert run_job(tmp_path / "input", output, "--dry-run") == 0
        assert "lease: " in capsys.readouterr().out
    assert not (tmp_path / "output" / "shards").exists()
    assert run_job(tmp_path / "input", output) == 0  # released: the next run proceeds


def test_a_one_shard_run_shows_its_user_no_warnings(run_job, tmp_path):
    """Nothing in a clean run should make its user wonder: no warning from the job's code (Ray's deprecation of
    ``ray_remote_args_fn`` is a note to us) and none from Ray about the pools we size (a read pool larger than the
    shards). Ray's deprecation warnings about its own internals name Ray's files; Python's default filters keep those
    quiet, so they are not counted."""
    import ray

    write_sample_shards(tmp_path / "input", shards=1, images_per_shard=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run_job(tmp_path / "input", tmp_path / "output") == 0
    rays_own = os.path.dirname(ray.__file__)
    shown = [f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}" for w in caught
             if not (issubclass(w.category, DeprecationWarning) and w.filename.startswith(rays_own))]
    assert shown == []


UNREACHABLE = '{"key": "a", "secret": "b", "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}'


@pytest.mark.parametrize(
    "input_url, model, flags, message",
    [
        ("/nonexistent/shards", None, [], "cannot list --input /nonexistent/shards"),
        (None, "/nonexistent/model", [], "--model /nonexistent/model: not a checkpoint directory"),
        # an endpoint that refuses connections is a store that is away: retried for --store-retry-seconds, then named
        ("s3://no-such-bucket/x", None, ["--storage-options", UNREACHABLE, "--store-retry-seconds", "0"],
         "cannot list --input s3://no-such-bucket/x: the connection to the store failed (EndpointConnectionError"),
    ],
    ids=["missing-input", "missing-model", "unreachable-bucket"],
)
def test_bad_flags_stop_before_any_work(run_job, tmp_path, capsys, input_url, model, flags, message):
    write_sample_shards(tmp_path / "input", shards=1, images_per_shard=1)
    status = run_job(input_url or tmp_path / "input", tmp_path / "output", *flags, model=model)
    error = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(error) == 1 and message in error[0], error
    assert not (tmp_path / "output").exists()
