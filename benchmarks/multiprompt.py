"""Several annotations per image: one call with k prompts vs k calls with one prompt each, same images, same run.

One call decodes and tiles each image once, runs the vision tower once and writes the prompts' common prefix (the
template's start and the image tokens) once; k calls do all of that k times. Each prompt has its own caption
length (a short caption, a detailed description, a list of objects), stop tokens ignored so both sides generate
exactly the same tokens.

    python benchmarks/multiprompt.py                          # cpu-mid config, compiled, CPU
    python benchmarks/multiprompt.py --device cuda --config 256m --images 64 --batch-size 32
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fms_smolvlm import Captioner  # noqa: E402
from fms_smolvlm.testing import PUBLISHED_LONGEST_EDGE, published_config, write_random_checkpoint  # noqa: E402
from generate import CONFIGS, SIZES  # noqa: E402
from pipeline.testing import encode, synthetic_image  # noqa: E402

PROMPTS = {  # name: (instruction, tokens it generates)
    "caption": ("Write a short caption for this image.", 16),
    "description": ("Describe this image in detail.", 64),
    "objects": ("List the objects you can see.", 32),
}


def timed(fn, device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--config", choices=sorted(CONFIGS) + sorted(PUBLISHED_LONGEST_EDGE), default=None)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8, help="images per batch; the engine has 3x as many slots")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config_name = args.config or ("256m" if device.type == "cuda" else "cpu-mid")
    config = CONFIGS[config_name] if config_name in CONFIGS else published_config(config_name)
    images = [encode(synthetic_image(*SIZES[i % len(SIZES)], seed=i), "JPEG") for i in range(args.images)]
    names = list(PROMPTS)

    with tempfile.TemporaryDirectory() as tmp:
        path = write_random_checkpoint(Path(tmp) / config_name, dtype=dtype, **config)
        # both sides get the slots the job gives a replica for --batch-size images and three prompts
        slots = args.batch_size * len(names)
        captioner = Captioner.from_pretrained(path, device=device.type, dtype=dtype, compile=True,
                                              max_batch_size=slots)

        def one_call(k: int):
            prompts = [PROMPTS[name][0] for name in names[:k]]
            limits = [PROMPTS[name][1] for name in names[:k]]
            return captioner.generate(images, prompts=prompts, max_new_tokens=limits, ignore_eos=True)

        def separate_calls(k: int):
            return [captioner.generate(images, PROMPTS[name][0], max_new_tokens=PROMPTS[name][1], ignore_eos=True)
                    for name in names[:k]]

        def shared_work():  # decoding, tiling, vision and the prompt up to its end, for the first prompt
            return captioner.generate(images, PROMPTS[names[0]][0], max_new_tokens=1, ignore_eos=True)

        for k in (1, 2, 3):  # warm-up: compiles every shape the timed calls use
            one_call(k), separate_calls(k)
        shared_work()
        together = one_call(3)
        alone = separate_calls(3)
        same = all(together[i][j].token_ids == alone[j][i].token_ids for i in range(len(images)) for j in range(3))
        rows = []
        for k in (1, 2, 3):
            rows.append((k, timed(lambda: one_call(k), device, args.repeats), timed(lambda: separate_calls(k), device, args.repeats)))
        shared = timed(shared_work, device, args.repeats)
        stats = captioner.engine.stats()

    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"\n{config_name} config, {dtype}, {where}, compiled; {len(images)} JPEG images (5-17 tiles), "
          f"{slots} slots (batch {args.batch_size} x 3 prompts) on both sides; prompts "
          f"{', '.join(f'{n} ({PROMPTS[n][1]} tokens)' for n in names)}; median of "
          f"{args.repeats}; tokens identical to separate calls: {same}")
    print(f"{'prompts':>8s}{'one call s':>12s}{'separate s':>12s}{'images/s one':>14s}{'images/s sep':>14s}{'speed-up':>10s}")
    for k, one, separate in rows:
        print(f"{k:8d}{one:12.2f}{separate:12.2f}{len(images) / one:14.2f}{len(images) / separate:14.2f}{separate / one:9.2f}x")
    single = rows[0][1]
    print(f"shared work (decode, tile, vision, prompt prefill: a 1-token call) = {shared:.2f} s, "
          f"{100 * shared / single:.0f}% of a one-prompt call")
    print(f"engine: {stats['vision_tiles']} tiles through the vision tower, {stats['shared_prefix_tokens']} prompt "
          "tokens written once for several prompts")


if __name__ == "__main__":
    main()
