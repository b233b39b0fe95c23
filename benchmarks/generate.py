"""Batched generation: HF `generate` (eager, SDPA) vs this engine eager vs compiled, in one run.

Same checkpoint (random weights, written here), same images, same prompt, and a fixed decode length: stop
tokens are ignored on both sides so every row generates exactly --new-tokens tokens. Inputs are
preprocessed once up front; the timings cover generation only.

    python benchmarks/generate.py --device cpu                      # a mid-size config that fits 2 cores
    python benchmarks/generate.py --device cuda --config 256m --batch-size 32
    python benchmarks/generate.py --device cuda --config 256m --batch-size 128 --images 256

Prints images/s, generated tokens/s, prefill and decode time, peak memory and the ratio to HF.
"""

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fms_smolvlm import Captioner  # noqa: E402
from fms_smolvlm.testing import write_random_checkpoint  # noqa: E402
from pipeline.testing import synthetic_image  # noqa: E402

PROMPT = "Describe this image."
CONFIGS = {
    # fits 2 CPU cores in minutes: 16 image tokens per tile, up to 17 tiles per image
    "cpu-mid": dict(
        vision_config=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                           image_size=64, patch_size=8),
        text_config=dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
                         num_key_value_heads=2),
        scale_factor=2,
    ),
}
# the published shapes (random weights), from the registered FMS variants, and their processors' longest edge
PUBLISHED = {"256m": 2048, "500m": 2048, "2.2b": 1536}
SIZES = [(640, 480), (480, 640), (800, 600), (1024, 512), (500, 500), (1200, 800), (300, 900), (960, 720)]


def published_config(variant: str) -> dict:
    """write_random_checkpoint's arguments for a published shape: the variant's config handed back to HF."""
    from fms.models import get_model

    from fms_smolvlm.hf_api import fms_to_hf_config

    hf = fms_to_hf_config(get_model("smolvlm", variant, device_type="meta").config)
    return dict(vision_config=hf.vision_config.to_dict(), text_config=hf.text_config.to_dict(),
                scale_factor=hf.scale_factor, longest_edge=PUBLISHED[variant])


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:  # Linux: resident pages are the second field
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak GPU memory, or peak process RSS on the CPU (sampled), above the level at start."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.base = self.peak = resident_bytes()
        self._stop = threading.Event()

        def sample():
            while not self._stop.wait(0.005):
                self.peak = max(self.peak, resident_bytes())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
        self.used = self.peak - self.base


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def hf_runner(path: Path, images, batch_size: int, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForImageTextToText, Idefics3Processor

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    processor = Idefics3Processor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}], add_generation_prompt=True
    )
    batches = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        inputs = processor(text=[text] * len(chunk), images=[[image] for image in chunk], return_tensors="pt",
                           padding=True)
        batches.append({k: v.to(device) for k, v in inputs.items()})

    def run(new_tokens: int):
        with torch.inference_mode():
            for inputs in batches:
                model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                               eos_token_id=None)

    return run


def engine_runner(path: Path, images, batch_size: int, device: torch.device, dtype: torch.dtype, compile: bool):
    captioner = Captioner.from_pretrained(path, device=device.type, dtype=dtype, compile=compile,
                                          max_batch_size=batch_size)
    captioner.engine.stop_ids = captioner.engine.stop_ids[:0]  # fixed decode length: never stop early
    samples = captioner.preprocess(images, PROMPT)

    def run(new_tokens: int):
        captioner.generate_processed(samples, [0] * len(samples), max_new_tokens=new_tokens)

    return run


def measure(name: str, run, device: torch.device, new_tokens: int, images: int, repeats: int) -> dict:
    compile_seconds = timed(lambda: (run(1), run(new_tokens)), device)  # warm-up: compiles every shape used
    prefill = statistics.median(timed(lambda: run(1), device) for _ in range(repeats))
    with PeakMemory(device) as memory:
        total = statistics.median(timed(lambda: run(new_tokens), device) for _ in range(repeats))
    return {
        "name": name,
        "warmup_s": compile_seconds,
        "images_per_s": images / total,
        "tokens_per_s": images * new_tokens / total,
        "prefill_s": prefill,
        "decode_s": total - prefill,
        "total_s": total,
        "peak_mb": memory.used / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--config", choices=sorted(CONFIGS) + sorted(PUBLISHED), default=None, help="default: cpu-mid on cpu, 256m on cuda")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--images", type=int, default=None, help="default: 2 batches")
    parser.add_argument("--new-tokens", type=int, default=64, help="the job's default --max-new-tokens")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip", nargs="*", default=[], choices=["hf", "eager", "compiled"])
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config_name = args.config or ("256m" if device.type == "cuda" else "cpu-mid")
    config = CONFIGS[config_name] if config_name in CONFIGS else published_config(config_name)
    n_images = args.images or 2 * args.batch_size
    images = [synthetic_image(*SIZES[i % len(SIZES)], seed=i) for i in range(n_images)]
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        path = write_random_checkpoint(Path(tmp) / config_name, dtype=dtype, **config)
        runners = {
            "hf": lambda: hf_runner(path, images, args.batch_size, device, dtype),
            "eager": lambda: engine_runner(path, images, args.batch_size, device, dtype, compile=False),
            "compiled": lambda: engine_runner(path, images, args.batch_size, device, dtype, compile=True),
        }
        labels = {"hf": "HF generate (eager, sdpa)", "eager": "FMS engine, eager", "compiled": "FMS engine, compiled"}
        results = [
            measure(labels[key], build(), device, args.new_tokens, n_images, args.repeats)
            for key, build in runners.items() if key not in args.skip
        ]

    hf_rate = next((r["images_per_s"] for r in results if r["name"].startswith("HF")), None)
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"\n{config_name} config, {dtype}, {where}; {n_images} images, batch {args.batch_size}, "
          f"{args.new_tokens} new tokens per image (stop tokens ignored), median of {args.repeats}")
    header = f"{'':26s}{'images/s':>10s}{'tokens/s':>10s}{'prefill s':>11s}{'decode s':>10s}{'peak MB':>9s}{'warm-up s':>11s}{'vs HF':>8s}"
    print(header)
    for r in results:
        ratio = f"{r['images_per_s'] / hf_rate:.2f}x" if hf_rate else "-"
        print(f"{r['name']:26s}{r['images_per_s']:10.2f}{r['tokens_per_s']:10.1f}{r['prefill_s']:11.2f}"
              f"{r['decode_s']:10.2f}{r['peak_mb']:9.0f}{r['warmup_s']:11.1f}{ratio:>8s}")


if __name__ == "__main__":
    main()
