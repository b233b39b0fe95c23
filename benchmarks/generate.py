"""Generation: HF `generate` (eager, SDPA) vs this engine, in one run, on the same checkpoint, images and prompt.

Two workloads (random weights; inputs are preprocessed once up front, timings cover generation only):

* fixed: every image generates exactly --new-tokens tokens (stop tokens ignored on both sides). Also prints the
  decode step time beside its floor measured in the same run: a bare loop of the step's matmuls (the text layers'
  weights and the KV cache read once at the same batch size).
* mixed: caption lengths as real captions have them: per-image limits drawn (seeded) from a log-normal with
  median 20 tokens, clipped to 3..96. HF `generate` runs each batch until its longest row is done; "static"
  feeds this engine one batch at a time (finished rows leave, nothing joins: today's batching); "continuous"
  gives it every request at once, so a freed slot takes the next request at the next sync. Each engine's time is
  split into prefill (the same run with one new token per image) and decode (the rest), and the prefill is printed
  beside its floor measured in the same run: a bare loop of the prefill's matmuls (the vision tower's and
  connector's weights over every tile, the text layers' weights over every prompt token).

    python benchmarks/generate.py --device cpu                                   # cpu-mid config, batch 8 and 1
    python benchmarks/generate.py --config 256m --batch-sizes 8 --longest-edge 512 --workloads fixed   # 1 tile
    python benchmarks/generate.py --config 256m --batch-sizes 8 --longest-edge 2048 --dtype bfloat16  # 13 tiles
    python benchmarks/generate.py --device cuda --config 256m --batch-sizes 32 128 --images 256

The vision tower is timed on its own too (ms per tile: HF, the engine eager and compiled), beside its floor measured
in the same run in the same dtype: a bare loop of its linears over the same tiles, plus attention's matmuls (scores
and weighted sums) at the linears' rate.

Greedy tokens are compared with HF's on the fixed workload (they must be identical).
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fms_smolvlm import Captioner  # noqa: E402
from fms_smolvlm.generation import Request, SamplingParams  # noqa: E402
from fms_smolvlm.testing import PUBLISHED_LONGEST_EDGE, published_config, write_random_checkpoint  # noqa: E402
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
SIZES = [(640, 480), (480, 640), (800, 600), (1024, 512), (500, 500), (1200, 800), (300, 900), (960, 720)]


def mixed_lengths(count: int, seed: int = 0) -> list[int]:
    """Caption lengths: log-normal around a median of 20 tokens, clipped to 3..96."""
    rng = np.random.default_rng(seed)
    return [int(x) for x in np.clip(np.round(rng.lognormal(np.log(20), 0.8, count)), 3, 96)]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, repeats: int = 1) -> float:
    """The median wall time of ``fn()``."""
    times = []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


@dataclass
class Runner:
    name: str
    run: callable  # (limits) -> list of token lists


def hf_runner(path: Path, images, batch_size: int, device: torch.device, dtype: torch.dtype, longest_edge=None) -> Runner:
    """HF generate in batches; each batch decodes until its longest row is done (rows are cut afterwards)."""
    from transformers import Idefics3Processor

    model = hf_model(path, device, dtype)
    processor = Idefics3Processor.from_pretrained(path)
    if longest_edge:
        processor.image_processor.size = {"longest_edge": longest_edge}
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

    def run(limits):
        tokens = []
        with torch.inference_mode():
            for index, inputs in enumerate(batches):
                own = limits[index * batch_size : (index + 1) * batch_size]
                out = model.generate(**inputs, max_new_tokens=max(own), min_new_tokens=max(own), do_sample=False,
                                     eos_token_id=None)
                new = out[:, inputs["input_ids"].shape[1] :].tolist()
                tokens += [row[:limit] for row, limit in zip(new, own)]
        return tokens

    return Runner("HF generate (eager, sdpa)", run)


def hf_model(path: Path, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device).eval()


def engine_runners(path: Path, images, batch_size: int, device: torch.device, dtype: torch.dtype, compile: bool,
                   longest_edge=None):
    captioner = Captioner.from_pretrained(path, device=device.type, dtype=dtype, compile=compile, warmup=compile,
                                          max_batch_size=batch_size, image_longest_edge=longest_edge)
    samples = captioner.preprocess(images, PROMPT)

    def requests(limits):
        return [Request((s.input_ids,), s.tiles, (SamplingParams(limit, ignore_eos=True),)) for s, limit in zip(samples, limits)]

    def continuous(limits):
        return [g[0].token_ids for g in captioner.engine.generate(requests(limits))]

    def static(limits):  # one batch at a time: the next batch waits for this one's longest row
        all_requests = requests(limits)
        return [g[0].token_ids for start in range(0, len(all_requests), batch_size)
                for g in captioner.engine.generate(all_requests[start : start + batch_size])]

    label = "compiled" if compile else "eager"
    return (Runner(f"engine {label}, static", static), Runner(f"engine {label}, continuous", continuous), captioner,
            samples)


def decode_floor(captioner: Captioner, batch: int, kv_len: int, device: torch.device) -> float:
    """Seconds for one pass over the decode step's data at this batch: every linear weight of the text layers and
    the head multiplied once, and a KV cache of ``kv_len`` positions read once by attention."""
    model = captioner.model
    text = model.config.text_config
    weights = [m.weight for m in model.language_model.modules() if isinstance(m, torch.nn.Linear)]
    kv = text.kvheads or text.nheads
    head_dim = text.emb_dim // text.nheads
    cache = torch.zeros(batch, kv, kv_len, head_dim, dtype=model.dtype, device=device)
    query = torch.zeros(batch, kv, 1, head_dim, dtype=model.dtype, device=device)

    def step():
        for weight in weights:
            F.linear(torch.zeros(batch, weight.shape[1], dtype=model.dtype, device=device), weight)
        for _ in range(text.nlayers):
            F.scaled_dot_product_attention(query, cache, cache)

    with torch.inference_mode():
        step()
        return timed(lambda: [step() for _ in range(20)], device, repeats=3) / 20


def prefill_floor(captioner: Captioner, samples, device: torch.device) -> float:
    """Seconds for the prefill's matmuls alone: every vision and connector weight over every tile (128 tiles per
    call, as the engine's vision calls), every text weight over every prompt token, the head once per image.
    Attention, norms and activations are left out, so the real prefill cannot reach it."""
    model = captioner.model
    vision = model.config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    tiles = sum(s.tiles.shape[0] for s in samples)
    tokens = sum(len(s.input_ids) for s in samples)

    def weights(module, skip=None):
        return [m.weight for m in module.modules() if isinstance(m, torch.nn.Linear) and m is not skip]

    head = model.language_model.head
    work = [(w, patches, tiles) for w in weights(model.vision_tower)]
    work += [(w, patches // model.config.scale_factor**2, tiles) for w in weights(model.connector)]
    work += [(w, 32, -(-tokens // 32)) for w in weights(model.language_model, skip=head)]
    work += [(head.weight, 1, len(samples))]

    def run():
        for weight, rows_per_unit, units in work:
            for start in range(0, units, 128):
                rows = rows_per_unit * min(128, units - start)
                F.linear(torch.zeros(rows, weight.shape[1], dtype=model.dtype, device=device), weight)

    with torch.inference_mode():
        run()
        return timed(run, device, repeats=3)


def vision_floor(model, tiles: int) -> tuple[float, float]:
    """Seconds for the vision tower's and connector's matmuls alone over ``tiles`` tiles, in the model's dtype: the
    linears timed as a bare loop (every weight over every patch, one call per weight), and attention's matmuls
    (scores and weighted sum per tile and head) counted at the linears' rate. (A bare loop of those small-K matmuls
    is no floor: in fp32 it runs at half the linears' rate, slower than SDPA's own kernel.) Norms, activations
    and the softmax are left out. Returns (linears, attention's matmuls)."""
    vision = model.config.vision_config
    patches_per_tile = (vision.image_size // vision.patch_size) ** 2
    patches = tiles * patches_per_tile
    work = [(m.weight, patches) for m in model.vision_tower.modules() if isinstance(m, torch.nn.Linear)]
    work += [(model.connector.proj.weight, patches // model.config.scale_factor**2)]
    inputs = [torch.zeros(rows, weight.shape[1], dtype=weight.dtype, device=weight.device) for weight, rows in work]
    linear_flops = sum(2 * rows * weight.numel() for weight, rows in work)
    attention_flops = tiles * vision.nlayers * 4 * patches_per_tile**2 * vision.hidden_size

    def run():
        for (weight, _), x in zip(work, inputs):
            F.linear(x, weight)

    with torch.no_grad():
        run()
        linears = timed(run, model.device, repeats=3)
        return linears, linears * attention_flops / linear_flops


def vision(path: Path, captioners: list, dtype: torch.dtype, device: torch.device, tiles: int, repeats: int) -> None:
    """The vision tower (and connector) alone over ``tiles`` 512-px tiles: ms per tile for HF, the engine eager and
    compiled, beside the matmul floor in this dtype."""
    model = hf_model(path, device, dtype)
    side = model.config.vision_config.image_size
    pixels = torch.randint(0, 256, (tiles, 3, side, side), dtype=torch.uint8, device=device)
    normalised = ((pixels.float() / 255 - 0.5) / 0.5).to(dtype)
    mask = torch.ones(tiles, side, side, dtype=torch.bool, device=device)

    def hf():
        model.model.get_image_features(normalised[None], pixel_attention_mask=mask[None])

    rows = [("HF (eager, sdpa)", hf)]
    for captioner in captioners:
        label = "engine, compiled" if captioner.engine.compiled is not None else "engine, eager"
        rows.append((label, lambda c=captioner: c.engine._vision(c.model, pixels)))
    linears, attention = vision_floor(captioners[0].model, tiles)
    floor = linears + attention
    print(f"vision tower + connector over {tiles} tiles, {dtype}: ms per tile (median of {repeats}); matmul floor "
          f"{1e3 * floor / tiles:.1f} ms per tile (linears {1e3 * linears / tiles:.1f}, attention's matmuls "
          f"{1e3 * attention / tiles:.1f})")
    with torch.no_grad():
        for name, fn in rows:
            fn()
            seconds = timed(fn, device, repeats)
            print(f"{name:30s}{1e3 * seconds / tiles:10.1f} ms{seconds / floor:8.2f}x floor")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--config", choices=sorted(CONFIGS) + sorted(PUBLISHED_LONGEST_EDGE), default=None, help="default: cpu-mid on cpu, 256m on cuda")
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"], default=None,
                        help="each runs HF and the engine; ratios and tokens against HF in the first (default: "
                             "bfloat16 on cuda, float32 on cpu)")
    parser.add_argument("--longest-edge", type=int, default=None,
                        help="the processor's longest edge (256m: 512 gives 1 tile per image, 2048 13), on both sides; "
                             "then every image is 640x480")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 1])
    parser.add_argument("--images", type=int, default=None, help="default: 2 batches of the largest batch size")
    parser.add_argument("--new-tokens", type=int, default=48, help="the fixed workload's tokens per image")
    parser.add_argument("--workloads", nargs="+", choices=["fixed", "mixed", "vision"], default=["fixed", "mixed", "vision"])
    parser.add_argument("--vision-tiles", type=int, default=8, help="tiles per vision tower call in the vision section")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip", nargs="*", default=[], choices=["hf", "eager"])
    args = parser.parse_args()

    device = torch.device(args.device)
    dtypes = [getattr(torch, d) for d in args.dtypes or (["bfloat16"] if device.type == "cuda" else ["float32"])]
    config_name = args.config or ("256m" if device.type == "cuda" else "cpu-mid")
    config = CONFIGS[config_name] if config_name in CONFIGS else published_config(config_name)
    n_images = args.images or 2 * max(args.batch_sizes)
    sizes = [(640, 480)] if args.longest_edge else SIZES
    images = [synthetic_image(*sizes[i % len(sizes)], seed=i) for i in range(n_images)]
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()})"
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        path = write_random_checkpoint(Path(tmp) / config_name, **config)  # fp32 weights; each side casts
        for batch_size in args.batch_sizes:
            runners, floors = [], {}
            for dtype in dtypes:
                tag = "" if len(dtypes) == 1 else f" {str(dtype).removeprefix('torch.')}"
                if "hf" not in args.skip:
                    runners.append(hf_runner(path, images, batch_size, device, dtype, args.longest_edge))
                    runners[-1].name += tag
                captioners = []
                for compile in ([True] if "eager" in args.skip else [False, True]):
                    static, continuous, captioner, samples = engine_runners(path, images, batch_size, device, dtype,
                                                                            compile, args.longest_edge)
                    static.name += tag
                    continuous.name += tag
                    runners += [static, continuous]
                    captioners.append(captioner)
                tiles = sum(s.num_tiles for s in samples) / len(samples)
                print(f"\n== {config_name} config, {dtype}, {where}; {n_images} images ({tiles:.1f} tiles each), "
                      f"batch {batch_size}")
                floors[dtype] = (decode_floor(captioner, batch_size, 384, device), prefill_floor(captioner, samples, device))
                if "vision" in args.workloads:
                    vision(path, captioners, dtype, device, args.vision_tiles, args.repeats)
            if "fixed" in args.workloads:
                fixed(runners, floors, args, batch_size, n_images, device)
            if "mixed" in args.workloads:
                mixed(runners, floors, args, n_images, device)


def fixed(runners, floors: dict, args, batch_size: int, n_images: int, device: torch.device) -> None:
    """Exactly --new-tokens per image: images/s, the decode step time, and its floor (per dtype)."""
    batches = -(-n_images // batch_size)
    decode = ", ".join(f"{str(d).removeprefix('torch.')} {1e3 * f[0]:.1f} ms" for d, f in floors.items())
    print(f"fixed: {args.new_tokens} new tokens per image (stop tokens ignored), median of {args.repeats}; "
          f"decode step floor: {decode}")
    print(f"{'':38s}{'images/s':>10s}{'vs HF':>8s}{'step ms':>9s}{'same tokens':>13s}")
    reference, hf_rate = None, None
    for runner in (r for r in runners if "static" not in r.name):
        limits = [args.new_tokens] * n_images
        tokens = runner.run(limits)  # warm-up (an eager run's first call allocates)
        runner.run([1] * n_images)
        total = timed(lambda: runner.run(limits), device, args.repeats)
        first_token = timed(lambda: runner.run([1] * n_images), device, args.repeats)
        step_ms = 1e3 * (total - first_token) / (batches * (args.new_tokens - 1))
        reference = reference or tokens
        rate = n_images / total
        hf_rate = hf_rate or rate
        same = sum(a == b for a, b in zip(tokens, reference))
        print(f"{runner.name:38s}{rate:10.2f}{rate / hf_rate:7.2f}x{step_ms:9.1f}{f'{same}/{n_images}':>13s}")


def mixed(runners, floors: dict, args, n_images: int, device: torch.device) -> None:
    """Caption lengths of real captions: images/s, and the time split into prefill and decode."""
    limits = mixed_lengths(n_images)
    prefill_floors = ", ".join(f"{str(d).removeprefix('torch.')} {f[1]:.2f} s" for d, f in floors.items())
    print(f"mixed: caption lengths {min(limits)}..{max(limits)} tokens, median {int(np.median(limits))}, "
          f"{sum(limits)} in all; median of {args.repeats}; prefill's matmul floor: {prefill_floors}")
    print(f"{'':38s}{'images/s':>10s}{'tokens/s':>10s}{'vs HF':>8s}{'prefill s':>11s}{'decode s':>10s}")
    hf_rate = None
    for runner in runners:
        runner.run(limits)  # warm-up
        total = timed(lambda: runner.run(limits), device, args.repeats)
        prefill = timed(lambda: runner.run([1] * n_images), device, args.repeats)
        rate = n_images / total
        hf_rate = hf_rate or rate
        print(f"{runner.name:38s}{rate:10.2f}{sum(limits) / total:10.1f}{rate / hf_rate:7.2f}x"
              f"{prefill:11.2f}{total - prefill:10.2f}")


if __name__ == "__main__":
    main()
