"""`make demo`: a small random SmolVLM checkpoint, a few WebDataset shards of synthetic images, the real
captioning job on a local Ray instance, then its summary and a few output rows.

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
from pipeline.testing import write_sample_shards  # noqa: E402

OUT = REPO / "demo_out"


def main() -> int:
    model = OUT / "model"
    if not (model / "config.json").exists():
        write_random_checkpoint(model, vision_config=dict(image_size=64, patch_size=8))
    if not (OUT / "shards").exists():
        write_sample_shards(OUT / "shards", shards=3, images_per_shard=4)
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
    for path in sorted((OUT / "captions" / "shards").glob("*.parquet"))[:1]:
        for row in pq.read_table(path).to_pylist()[:3]:
            print(f"  {row['shard_id']}/{row['key']} {row['width']}x{row['height']} "
                  f"({row['num_image_tokens']} image tokens): {row['caption']!r}")
    print("\nRandom weights caption nonsense: pass --model HuggingFaceTB/SmolVLM-256M-Instruct (or a local "
          "checkpoint directory) to jobs/caption_dataset.py for real captions.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
