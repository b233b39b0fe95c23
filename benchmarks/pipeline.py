"""Pipeline overhead: the whole job (read, preprocess, caption, commit on local Ray) vs Captioner.generate alone,
on the same images, checkpoint, batch size and number of replicas (one here).

    python benchmarks/pipeline.py                          # 96 images in 12 WebDataset shards, CPU
    python benchmarks/pipeline.py --images 192 --shards 24 --new-tokens 32

Both sides include preprocessing (Captioner.generate decodes and tiles too); neither includes loading the model
for the bare engine. The job's number is reported twice: end to end (its replica starts, loads and warms up
inside the timing) and in steady state (after its first committed shard); the bare call is also timed inside a
1-CPU Ray worker, which tells what Ray's worker process costs apart from what the pipeline costs.
"""

import argparse
import importlib.util
import json
import logging
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fms_smolvlm import Captioner  # noqa: E402
from fms_smolvlm.testing import write_random_checkpoint  # noqa: E402
from generate import CONFIGS  # noqa: E402
from pipeline.testing import write_sample_shards  # noqa: E402

PROMPT = "Describe this image in one sentence."  # the job's default


def shard_images(directory: Path) -> list[bytes]:
    images = []
    for shard in sorted(directory.glob("*.tar")):
        with tarfile.open(shard) as archive:
            images += [archive.extractfile(m).read() for m in archive.getmembers() if not m.name.endswith(".json")]
    return images


def load_job_cli():
    spec = importlib.util.spec_from_file_location("caption_dataset", REPO / "jobs" / "caption_dataset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def captioner_rate(model: Path, images: list[bytes], batch_size: int, new_tokens: int, threads=None) -> float:
    """Images/s of one Captioner.generate call over every image (preprocessing included), after a warm-up."""
    if threads:  # a Ray worker starts with one thread; the job gives a CPU replica its node's share
        torch.set_num_threads(threads)
    captioner = Captioner.from_pretrained(model, max_batch_size=batch_size)
    captioner.generate(images[:batch_size], PROMPT, max_new_tokens=new_tokens)
    started = time.perf_counter()
    captioner.generate(images, PROMPT, max_new_tokens=new_tokens)
    return len(images) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--shards", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="cpu-mid")
    args = parser.parse_args()

    import ray

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = write_random_checkpoint(tmp / "model", **CONFIGS[args.config])
        write_sample_shards(tmp / "shards", shards=args.shards, images_per_shard=args.images // args.shards)
        images = shard_images(tmp / "shards")

        bare = captioner_rate(model, images, args.batch_size, args.new_tokens)
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level=logging.WARNING,
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
        # the same call in a 1-CPU Ray worker with the job's thread count: what Ray's process costs, without Ray Data
        in_worker = ray.get(ray.remote(num_cpus=1)(captioner_rate).remote(
            model, images, args.batch_size, args.new_tokens, threads=os.cpu_count()))
        status = load_job_cli().main(["--input", str(tmp / "shards"), "--output", str(tmp / "out"), "--model", str(model),
                           "--batch-size", str(args.batch_size), "--max-new-tokens", str(args.new_tokens),
                           "--replicas", "1", "--device", "cpu"])
        summary = json.loads((tmp / "out" / "_summary.json").read_text())
        ray.shutdown()
    assert status == 0, "the job failed"

    end_to_end = summary["images_per_second"]
    per_shard = len(images) / args.shards
    steady = (summary["images"] - per_shard) / (summary["wall_seconds"] - summary["seconds_to_first_commit"])
    print(f"\n{len(images)} images in {args.shards} WebDataset shards, {args.config} config, batch {args.batch_size}, "
          f"{args.new_tokens} new tokens, 1 replica, CPU ({os.cpu_count()} cores)")
    print(f"{'':42s}{'images/s':>10s}{'vs bare':>9s}")
    print(f"{'Captioner.generate alone':42s}{bare:10.2f}{1:9.2f}")
    print(f"{'the same in a Ray worker (no Ray Data)':42s}{in_worker:10.2f}{in_worker / bare:9.2f}")
    print(f"{'job, end to end (replica start-up included)':42s}{end_to_end:10.2f}{end_to_end / bare:9.2f}")
    print(f"{'job, steady state (after the first commit)':42s}{steady:10.2f}{steady / bare:9.2f}")
    print(f"job start-up until its first commit: {summary['seconds_to_first_commit']:.1f} s "
          f"of {summary['wall_seconds']:.1f} s")


if __name__ == "__main__":
    main()
