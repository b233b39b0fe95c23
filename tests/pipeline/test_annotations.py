"""The job beyond one caption per image: several named prompts, video clips beside stills, bf16 compiled replicas
on a checkpoint saved by transformers 5.x."""

import io
import json
import tarfile

import av
import numpy as np
import pyarrow.parquet as pq
import pytest

from fms_smolvlm import Captioner
from fms_smolvlm.testing import write_random_checkpoint
from pipeline.testing import encode, synthetic_clip, synthetic_image, write_sample_shards

PROMPTS = {"caption": "Caption:", "objects": "List the objects you can see.", "text": "What text is visible?"}
LIMITS = {"caption": 4, "objects": 8, "text": 6}
FLAGS = [arg for name, text in PROMPTS.items() for arg in ("--prompt", f"{name}={text}")] + [
    arg for name, limit in LIMITS.items() for arg in ("--max-new-tokens", f"{name}={limit}")
]


def tar_of(path, members: dict) -> None:
    with tarfile.open(path, "w") as archive:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))


def rows_of(output) -> dict:
    """shard file name -> rows of its committed Parquet file."""
    return {path.name: pq.read_table(path).to_pylist() for path in sorted((output / "shards").glob("*.parquet"))}


@pytest.fixture(scope="module")
def annotated(checkpoint):
    """What Captioner.generate says about each image for the three prompts at once."""
    captioner = Captioner.from_pretrained(checkpoint, dtype="float32")

    def expected(images: list) -> list:
        return captioner.generate(images, prompts=list(PROMPTS.values()), max_new_tokens=list(LIMITS.values()))

    return expected


def assert_annotated(rows: list, images: list, annotated) -> None:
    for row, results in zip(rows, annotated(images)):
        for (name, _), result in zip(PROMPTS.items(), results):
            assert row[name] == result.text and row[f"{name}_finish_reason"] == result.finish_reason
            assert row[f"{name}_num_generated_tokens"] == result.num_generated_tokens
        assert row["error"] is None and row["num_image_tokens"] == results[0].num_image_tokens
        assert "caption_num_generated_tokens" in row and "finish_reason" not in row


def test_three_named_prompts_resume_after_a_failure_and_refuse_a_changed_set(
    run_job, tmp_path, annotated, fail_on_shards, capsys
):
    written = write_sample_shards(tmp_path / "input", shards=3, images_per_shard=2, fmt="folder")
    output = tmp_path / "output"
    fail_on_shards("part-00002")
    assert run_job(tmp_path / "input", output, *FLAGS, "--batch-size", "1") == 1
    committed = {p.name for p in (output / "_checkpoints").glob("*.json")}
    assert "part-00002.json" not in committed
    fail_on_shards()
    assert run_job(tmp_path / "input", output, *FLAGS, "--batch-size", "1") == 0
    summary = json.loads((output / "_summary.json").read_text())
    assert summary["shards_skipped"] == len(committed) and summary["shards_done"] == 3 - len(committed)
    rows = rows_of(output)
    assert {name[: -len(".parquet")]: [r["key"] for r in shard] for name, shard in rows.items()} == written
    for shard in range(3):
        images = [(tmp_path / "input" / f"part-{shard:05d}" / key).read_bytes() for key in written[f"part-{shard:05d}"]]
        assert_annotated(rows[f"part-{shard:05d}.parquet"], images, annotated)
    job = json.loads((output / "_job.json").read_text())
    assert job["prompts"] == {name: {"text": PROMPTS[name], "max_new_tokens": LIMITS[name]} for name in PROMPTS}

    capsys.readouterr()
    fewer = FLAGS[:4] + ["--max-new-tokens", "caption=4", "--max-new-tokens", "objects=8"]
    assert run_job(tmp_path / "input", output, *fewer) == 2
    (error,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert "different settings (prompt text dropped)" in error and "--overwrite" in error


def test_named_prompts_on_s3_with_a_bad_image(run_job, tmp_path, s3_server, annotated):
    fs, options = s3_server
    good = encode(synthetic_image(120, 90, seed=3), "JPEG")
    (tmp_path / "input").mkdir()
    tar_of(tmp_path / "input" / "part.tar", {"a.jpg": good, "b.png": b"not an image at all"})
    fs.put(str(tmp_path / "input"), "captions-test/annotations/input", recursive=True)
    status = run_job("s3://captions-test/annotations/input", "s3://captions-test/annotations/output", *FLAGS,
                     "--storage-options", json.dumps(options))
    assert status == 0
    with fs.open("captions-test/annotations/output/shards/part.tar.parquet", "rb") as handle:
        rows = pq.read_table(handle).to_pylist()
    assert [row["key"] for row in rows] == ["a", "b"]
    assert_annotated(rows[:1], [good], annotated)
    bad = rows[1]  # its error once, and no prompt's columns filled
    assert bad["error"] == "not an image (unrecognised file format)"
    assert all(bad[name] is None and bad[f"{name}_finish_reason"] is None for name in PROMPTS)


def audio_only_clip() -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as output:
        stream = output.add_stream("aac", rate=16000)
        samples = (np.sin(np.arange(16000) / 10) * 3000).astype(np.int16)[None]
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = 16000
        for packet in list(stream.encode(frame)) + list(stream.encode()):
            output.mux(packet)
    return buffer.getvalue()


def test_clips_beside_stills(run_job, tmp_path, checkpoint_factory):
    """A SmolVLM2 checkpoint: a shard of stills and clips gives one row per sample; a clip's caption is
    Captioner.generate's on the same bytes; bad clips are error rows."""
    model = checkpoint_factory("mha-s3-tied")  # SmolVLMForConditionalGeneration: has a video processor
    still = encode(synthetic_image(60, 40, seed=1), "JPEG")
    clip = synthetic_clip(seconds=3, fps=8, width=48, height=32)
    webm = synthetic_clip(seconds=2, fps=5, width=32, height=32, codec="libvpx-vp9", container="webm")
    (tmp_path / "input").mkdir()
    tar_of(tmp_path / "input" / "mixed.tar", {
        "a.jpg": still, "b.mp4": clip, "c.webm": webm,
        "d.mp4": clip[: len(clip) // 3], "e.mp4": audio_only_clip(), "f.mp4": synthetic_clip(seconds=9, fps=2),
    })
    assert run_job(tmp_path / "input", tmp_path / "output", "--max-video-seconds", "5", model=model) == 0
    rows = {row["key"]: row for row in rows_of(tmp_path / "output")["mixed.tar.parquet"]}
    assert sorted(rows) == ["a", "b", "c", "d", "e", "f"]

    captioner = Captioner.from_pretrained(model, dtype="float32")
    expected = captioner.generate([still, clip, webm], max_new_tokens=6)
    seq_len = captioner.preprocessor.image_seq_len
    for key, result, frames, size in zip("abc", expected, (None, 3, 2), ((60, 40), (48, 32), (32, 32))):
        row = rows[key]
        assert row["error"] is None and row["caption"] == result.text and row["num_frames"] == frames
        assert (row["width"], row["height"]) == size and row["num_image_tokens"] == result.num_image_tokens
    assert rows["b"]["num_image_tokens"] == 3 * seq_len and rows["c"]["num_image_tokens"] == 2 * seq_len
    assert "corrupt video data" in rows["d"]["error"] or "not a decodable video" in rows["d"]["error"]
    assert rows["e"]["error"] == "no video stream (audio only)"
    assert rows["f"]["error"] == "video is 9 s long, over the limit of 5 s"
    job = json.loads((tmp_path / "output" / "_job.json").read_text())
    assert (job["video_fps"], job["video_max_frames"], job["max_video_seconds"]) == (1, 64, 5.0)


def test_bf16_compiled_replicas_on_a_transformers_saved_checkpoint(run_job, tmp_path):
    model = write_random_checkpoint(tmp_path / "model", seed=5, layout="transformers")
    written = write_sample_shards(tmp_path / "input", shards=2, images_per_shard=2)
    status = run_job(tmp_path / "input", tmp_path / "output", "--dtype", "bfloat16", "--compile", model=model)
    assert status == 0
    rows = rows_of(tmp_path / "output")
    assert {name[: -len(".parquet")]: [r["key"] for r in shard] for name, shard in rows.items()} == written
    for row in (row for shard in rows.values() for row in shard):
        assert row["error"] is None and row["finish_reason"] in ("stop", "length") and row["num_image_tokens"] > 0
    assert json.loads((tmp_path / "output" / "_job.json").read_text())["dtype"] == "bfloat16"
