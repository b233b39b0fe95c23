"""`make demo`: a small random SmolVLM2 checkpoint, a few WebDataset shards of synthetic images and one with a short
generated video clip beside stills, the real captioning job on a local Ray instance, then its summary and a few
output rows.

Random weights caption nonsense; point --model at a real checkpoint (a local directory or a hub id such
as HuggingFaceTB/SmolVLM-256M-Instruct) to get real captions.
"""

import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pyarrow.parquet as pq  # noqa: E402

from fms_smolvlm.testing import write_random_checkpoint  # noqa: E402
from pipeline.testing import sample_images, synthetic_clip, write_sample_shards, write_webdataset_shard  # noqa: E402

OUT = REPO / "demo_out"


def main() -> int:
    model = OUT / "model"
    if not (model / "config.json").exists():  # SmolVLM2's architecture: it captions videos too
        write_random_checkpoint(model, architecture="SmolVLMForConditionalGeneration",
                                vision_config=dict(image_size=64, patch_size=8))
    if not (OUT / "shards").exists():
        write_sample_shards(OUT / "shards", shards=3, images_per_shard=4)
        clip = ("mp4", synthetic_clip(seconds=4, fps=8, width=160, height=96))
        write_webdataset_shard(OUT / "shards" / "part-00003.tar", [clip] + sample_images(2, seed=3), "clip")
    shutil.rmtree(OUT / "captions", ignore_errors=True)

    sys.argv = ["caption_dataset.py", "--input", str(OUT / "shards"), "--output", str(OUT / "captions"),
                "--model", str(model), "--max-new-tokens", "12"]
    import runpy

    try:
        runpy.run_path(str(REPO / "jobs" / "caption_dataset.py"), run_name="__main__")
    except SystemExit as done:
        if done.code:
            return int(done.code)

    print("\nA few rows of", OUT / "captions" / "shards")
    for path in sorted((OUT / "captions" / "shards").glob("*.parquet"))[::3]:  # part-00000 and the one with a clip
        for row in pq.read_table(path).to_pylist()[:2]:
            media = f"video, {row['num_frames']} frames" if row["num_frames"] else "image"
            print(f"  {row['shard_id']}/{row['key']} {media} {row['width']}x{row['height']} "
                  f"({row['num_image_tokens']} image tokens): {row['caption']!r}")
    print("\nRandom weights caption nonsense: pass --model HuggingFaceTB/SmolVLM-256M-Instruct (or a local "
          "checkpoint directory) to jobs/caption_dataset.py for real captions.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
