"""The GPU check in one command: parity on the device, the compiled engine with CUDA graphs, and throughput.

    make gpu-check                                        # on a CUDA machine, from a fresh clone
    python benchmarks/gpu_check.py [--out FILE]           # the same, with the venv's python
    python benchmarks/gpu_check.py --device cpu --quick   # a smoke run of every section on the CPU, tiny settings

Sections (each line of the final table: check, measured value, bound, pass / FAIL / info):

* parity: on the suite's small random checkpoints (tests/conftest.py CHECKPOINT_CONFIGS, both architectures), on the
  device: FMS fp32 logits vs HF fp32 logits, Captioner's greedy tokens vs HF generate (fp32), and FMS bf16
  teacher-forced on HF fp32's greedy continuations (top-1 agreement and relative logit error). The CPU tests'
  measurements and bounds (tests/models/test_parity.py, test_dtypes.py, tests/test_generation.py), with TF32 off:
  fp32 here means IEEE fp32.
* engine: the compiled bf16 engine (on CUDA its decode step is `reduce-overhead`: CUDA graphs) over 100+ requests of
  varied prompts (text-only, 5 to 17 tiles) and caption lengths, after its warm-up: no graph compiled and no CUDA
  graph captured in the run, CUDA graphs launched (profiled), and the requests whose tokens equal the eager bf16
  engine's.
* resize: the replica's Pillow-exact resize on the device: tiles equal to the CPU path's on the test corpus and at
  SmolVLM-256M's settings, and ms per image for a 640x480 and a 4000x3000 image.
* start-up: benchmarks/startup.py on the device (256M, bf16): a first replica compiling, a second loading its artifact,
  a fresh machine loading the packed artifact; no graph compiled by the last two.
* throughput: benchmarks/generate.py in a subprocess (256m shapes, batch 32 and 128, fixed and mixed workloads); its
  tables are shown as it runs, the compiled continuous engine's rates go into the final table.

Exit status 1 when a check fails, 2 when `--device cuda` (the default) finds no CUDA device.
"""

import argparse
import os
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Optional

import numpy as np
import torch
from torch._dynamo.utils import counters

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from fms.models import get_model  # noqa: E402
from transformers import AutoModelForImageTextToText  # noqa: E402

from fms_smolvlm import Captioner  # noqa: E402
from fms_smolvlm.generation import Request, SamplingParams  # noqa: E402
from fms_smolvlm.hf_api import real_tiles  # noqa: E402
from fms_smolvlm.processing import SmolVLMPreprocessor, decode_image  # noqa: E402
from fms_smolvlm.smolvlm import attention_mask_3d  # noqa: E402
from fms_smolvlm.testing import write_random_checkpoint  # noqa: E402
from tests.conftest import CHECKPOINT_CONFIGS, random_image  # noqa: E402  (the suite's checkpoints and images)
from tests.hf_reference import generate_position_ids, hf_inputs, hf_processor  # noqa: E402  (CPU-side only)

PROMPT = "Describe this image."
ENGINE_PROMPTS = [PROMPT, "What?", "Write a detailed description of everything that is visible in this picture."]
# different tile counts with the suite's processors (5 to 17 tiles when split), as in the CPU tests
PARITY_SIZES = [(90, 60), (40, 110), (30, 30), (200, 50), (64, 64), (33, 99)]
PARITY_NEW_TOKENS = 16  # greedy tokens per prompt; teacher-forced positions per image (6 x 16 = 96)

# the CPU tests' bounds
LOGITS_TOLERANCE = 1e-4  # of the logits' scale (test_parity)
BF16_TOP1 = 0.95  # teacher-forced top-1 agreement with HF fp32 (test_dtypes)
BF16_RELATIVE_ERROR = 4e-2  # bf16 keeps 8 significant bits; a few steps through the layers (test_dtypes)
COMPILED_EQUALS_EAGER = 0.8  # a near tie flips under inductor's fused bf16 arithmetic (test_compiled_bf16_...)


@dataclass(frozen=True)
class Settings:
    engine_images: int  # images per engine prompt; each prompt also gets a quarter as many text-only requests
    engine_batch: int
    engine_min_requests: int
    engine_max_new_tokens: int  # per-request limits are drawn from 1..this
    benchmark_args: tuple  # for benchmarks/generate.py, besides --device
    startup_args: tuple  # for benchmarks/startup.py, besides --device
    resize_sizes: tuple  # images timed through the device resize at SmolVLM-256M's settings
    resize_repeats: int


FULL = Settings(40, 32, 100, 40, ("--config", "256m", "--batch-sizes", "32", "128", "--images", "256"),
                ("--config", "256m", "--dtype", "bfloat16", "--batch-size", "32"), ((640, 480), (4000, 3000)), 20)
QUICK = Settings(4, 4, 10, 6, ("--config", "cpu-mid", "--batch-sizes", "2", "--images", "4", "--repeats", "1",
                           "--new-tokens", "6", "--workloads", "fixed"),
                 ("--config", "cpu-mid", "--batch-size", "2", "--new-tokens", "4"), ((640, 480),), 1)


@dataclass
class Row:
    check: str
    value: str
    bound: str
    ok: Optional[bool]  # None: information, no bound


# ---------------------------------------------------------------------------------------------
# Parity on the device


@contextmanager
def ieee_fp32():
    """No TF32 in matmuls or convolutions (cuDNN allows it for convolutions by default): fp32 parity is IEEE fp32.
    Through the allow_tf32 flags: torch's newer fp32_precision settings make every later read of them fail."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def to_device(inputs, device: torch.device) -> dict:
    return {name: value.to(device) for name, value in inputs.items()}


def hf_fp32(path: Path, device: torch.device):
    return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).to(device).eval()


def fms_logits(model, inputs):
    """FMS's forward on HF's processor inputs: real tiles only, HF generate's position ids, a left-padding mask."""
    attention = inputs["attention_mask"]
    tiles = None
    if "pixel_values" in inputs:
        tiles, _ = real_tiles(inputs["pixel_values"], inputs["pixel_attention_mask"], model.config.vision_config.patch_size)
    mask = attention_mask_3d(attention, attention.shape[1])
    return model(inputs["input_ids"], pixel_values=tiles, position_ids=generate_position_ids(attention), mask=mask)


def parity_inputs(path: Path) -> dict:
    """test_parity's three inputs: two split images of different tile counts left-padded, an unsplit image, text."""
    processor = hf_processor(path)
    return {
        "split images": hf_inputs(processor, ["Describe this image in a few words.", "What?"],
                                  [random_image(90, 60, seed=1), random_image(40, 110, seed=2)]),
        "unsplit image": hf_inputs(hf_processor(path, do_image_splitting=False), ["Caption this."],
                                   [random_image(70, 50, seed=3)]),
        "text only": hf_inputs(processor, ["Write one sentence about a dog.", "Hi"]),
    }


def check_fp32_logits(name: str, path: Path, hf, device: torch.device) -> Row:
    fms = get_model("hf_pretrained", model_path=str(path), device_type=device.type).eval()
    errors = {}
    for label, inputs in parity_inputs(path).items():
        inputs = to_device(inputs, device)
        attention = inputs["attention_mask"].bool()
        with torch.no_grad():
            expected = hf(**inputs, position_ids=generate_position_ids(attention)).logits[attention]
            actual = fms_logits(fms, inputs)[attention]
        errors[label] = float((actual - expected).abs().max() / expected.abs().max())
    worst = max(errors, key=errors.get)
    return Row(f"parity fp32 logits, max |FMS-HF| / scale [{name}]", f"{errors[worst]:.1e} ({worst})",
               f"<= {LOGITS_TOLERANCE:.0e}", errors[worst] <= LOGITS_TOLERANCE)


def hf_greedy(hf, processor, images, max_new_tokens: int, stop_ids, device: torch.device) -> list[list[int]]:
    """HF generate's greedy tokens per prompt (one batch, left-padded), cut at the first stop id; ``images`` None:
    text only."""
    inputs = to_device(hf_inputs(processor, [PROMPT] * (1 if images is None else len(images)), images), device)
    with torch.no_grad():
        output = hf.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    rows = output[:, inputs["input_ids"].shape[1] :].tolist()
    return [row[: next((i for i, t in enumerate(row) if t in stop_ids), len(row))] for row in rows]


def check_fp32_greedy(name: str, path: Path, hf, device: torch.device) -> Row:
    """Captioner (the eager engine) vs HF generate, greedy, on the split images and a text-only prompt."""
    images = [random_image(*size, seed=i + 1) for i, size in enumerate(PARITY_SIZES)]
    captioner = Captioner.from_pretrained(path, device=device.type, dtype="float32", max_batch_size=8)
    ours = [r.token_ids for r in captioner.generate(images + [None], PROMPT, max_new_tokens=PARITY_NEW_TOKENS)]
    stop_ids, processor = set(captioner.engine.stop_ids), hf_processor(path)
    theirs = hf_greedy(hf, processor, images, PARITY_NEW_TOKENS, stop_ids, device)
    theirs += hf_greedy(hf, processor, None, PARITY_NEW_TOKENS, stop_ids, device)
    same = sum(a == b for a, b in zip(ours, theirs))
    tokens = sum(len(t) for t in theirs)  # shows the captions are not all empty
    return Row(f"parity fp32 greedy tokens, Captioner = HF generate [{name}]",
               f"{same}/{len(theirs)} prompts ({tokens} tokens)", "all identical", same == len(theirs))


def hf_continuations(path: Path, hf, device: torch.device):
    """Per image: our uint8 tiles, HF fp32's greedy continuation (stop tokens ignored) after the prompt, and HF
    fp32's logits at the positions that chose those tokens (test_dtypes' reference)."""
    processor, preprocessor = hf_processor(path), SmolVLMPreprocessor.from_pretrained(path)
    rows = []
    for i, size in enumerate(PARITY_SIZES):
        image = random_image(*size, seed=i)
        inputs = to_device(hf_inputs(processor, [PROMPT], [image]), device)
        prompt_len = inputs["input_ids"].shape[1]
        with torch.no_grad():
            sequence = hf.generate(**inputs, max_new_tokens=PARITY_NEW_TOKENS, min_new_tokens=PARITY_NEW_TOKENS,
                                   do_sample=False)
            logits = hf(input_ids=sequence, pixel_values=inputs["pixel_values"],
                        pixel_attention_mask=inputs["pixel_attention_mask"]).logits[0, prompt_len - 1 : -1]
        tiles = torch.from_numpy(preprocessor.process(image, [PROMPT]).tiles).to(device)
        rows.append((tiles, sequence, logits, prompt_len))
    return rows


def check_bf16(name: str, path: Path, hf, device: torch.device) -> list[Row]:
    model = get_model("hf_pretrained", model_path=str(path), data_type=torch.bfloat16, device_type=device.type).eval()
    agree, positions, worst = 0, 0, 0.0
    for tiles, sequence, expected, prompt_len in hf_continuations(path, hf, device):
        with torch.no_grad():
            actual = model(sequence, pixel_values=tiles)[0, prompt_len - 1 : -1].float()
        agree += int((actual.argmax(-1) == expected.argmax(-1)).sum())
        positions += expected.shape[0]
        worst = max(worst, float((actual - expected).abs().max() / expected.abs().max()))
    return [
        Row(f"parity bf16 top-1 = HF fp32, teacher-forced [{name}]", f"{agree / positions:.3f} ({agree}/{positions})",
            f">= {BF16_TOP1}", agree / positions >= BF16_TOP1),
        Row(f"parity bf16 relative logit error [{name}]", f"{worst:.1e}", f"<= {BF16_RELATIVE_ERROR:.0e}",
            worst <= BF16_RELATIVE_ERROR),
    ]


def parity_checks(workdir: Path, device: torch.device) -> list[Row]:
    rows = []
    with ieee_fp32():
        for name, config in CHECKPOINT_CONFIGS.items():
            path = write_random_checkpoint(workdir / name, **config)
            hf = hf_fp32(path, device)
            checkpoint_rows = [check_fp32_logits(name, path, hf, device), check_fp32_greedy(name, path, hf, device),
                               *check_bf16(name, path, hf, device)]
            print(table(checkpoint_rows), flush=True)
            rows += checkpoint_rows
    return rows


# ---------------------------------------------------------------------------------------------
# The compiled engine


def engine_requests(captioner: Captioner, settings: Settings) -> list[Request]:
    """Every prompt on images of random sizes (5 to 17 tiles) and on text alone, each with its own limit."""
    rng = np.random.default_rng(0)
    images = [random_image(int(rng.integers(20, 240)), int(rng.integers(20, 240)), seed=500 + i)
              for i in range(settings.engine_images)]
    media = images + [None] * max(1, settings.engine_images // 4)
    samples = [sample for prompt in ENGINE_PROMPTS for sample in captioner.preprocess(media, prompt)]
    return [Request((s.input_ids,), s.tiles, (SamplingParams(int(rng.integers(1, settings.engine_max_new_tokens + 1))),))
            for s in samples]


def token_ids(results) -> list[list[int]]:
    return [generations[0].token_ids for generations in results]


@dataclass
class CompiledRun:
    tokens: list
    warmup: dict  # the engine's warm-up report
    compiled_in_run: int  # graphs compiled after the warm-up (the engine's count)
    dynamo_in_run: int  # the same by Dynamo's counter
    captures_in_run: int  # CUDA graphs instantiated after the warm-up (profiled)
    launches: int  # CUDA graph launches in the run (profiled)
    shapes: list
    expect_graphs: bool  # the engine's decode step runs as CUDA graphs (reduce-overhead) on CUDA only


def compiled_run(path: Path, load: dict, requests: list[Request], cache: Path) -> CompiledRun:
    torch._dynamo.reset()
    engine = Captioner.from_pretrained(path, compile=True, compile_cache=cache, **load).engine
    report = engine.warmup()
    compiled_before, graphs_before = engine.stats()["compiled_graphs"], counters["stats"]["unique_graphs"]
    # the profiler sees CUDA graphs captured (instantiated) and launched; on the CPU there are none
    with torch.profiler.profile(activities=list(torch.profiler.supported_activities())) as profile:
        results = engine.generate(requests)
    events = profile.key_averages()
    return CompiledRun(
        tokens=token_ids(results), warmup=report,
        compiled_in_run=engine.stats()["compiled_graphs"] - compiled_before,
        dynamo_in_run=counters["stats"]["unique_graphs"] - graphs_before,
        captures_in_run=sum(e.count for e in events if "GraphInstantiate" in e.key),
        launches=sum(e.count for e in events if "GraphLaunch" in e.key),
        shapes=engine.stats()["decode_shapes"], expect_graphs=engine.device.type == "cuda",
    )


def engine_checks(workdir: Path, device: torch.device, settings: Settings) -> list[Row]:
    path = write_random_checkpoint(workdir / "engine", **CHECKPOINT_CONFIGS["gqa-s2-untied"])
    load = dict(device=device.type, dtype="bfloat16", max_batch_size=settings.engine_batch)
    eager = Captioner.from_pretrained(path, **load)
    requests = engine_requests(eager, settings)
    expected = token_ids(eager.engine.generate(requests))
    del eager
    run = compiled_run(path, load, requests, workdir / "compiled")

    tiles = [0 if r.tiles is None else len(r.tiles) for r in requests]
    limits = [r.params[0].max_new_tokens for r in requests]
    same = sum(a == e for a, e in zip(run.tokens, expected))
    warmup = run.warmup
    return [
        Row("engine workload (bf16, compiled)", f"{len(requests)} requests: {tiles.count(0)} text-only, "
            f"{min(t for t in tiles if t)}..{max(tiles)} tiles, limits {min(limits)}..{max(limits)}, "
            f"{sum(map(len, expected))} tokens", f">= {settings.engine_min_requests} requests",
            len(requests) >= settings.engine_min_requests),
        Row("engine warm-up", f"{warmup['graphs_compiled']} graphs compiled, {warmup['calls']} shapes run, "
            f"{warmup['seconds']:.0f} s", "", None),
        Row("engine graphs compiled after warm-up (engine, dynamo)", f"{run.compiled_in_run}, {run.dynamo_in_run}",
            "= 0, = 0", run.compiled_in_run == 0 and run.dynamo_in_run == 0),
        Row("engine CUDA graphs captured after warm-up", str(run.captures_in_run), "= 0", run.captures_in_run == 0),
        Row("engine CUDA graph launches in the run", str(run.launches),
            ">= 1" if run.expect_graphs else "= 0 (no CUDA graphs on cpu)",
            run.launches >= 1 if run.expect_graphs else run.launches == 0),
        Row("engine decode shapes used (rows x attended length)", f"{len(run.shapes)}: "
            f"{' '.join(f'{r}x{n}' for r, n in run.shapes)}", "", None),
        Row("engine compiled tokens = eager bf16 tokens", f"{same / len(requests):.3f} ({same}/{len(requests)})",
            f">= {COMPILED_EQUALS_EAGER}", same / len(requests) >= COMPILED_EQUALS_EAGER),
    ]


# ---------------------------------------------------------------------------------------------
# Resizing and tiling on the device


def resize_checks(device: torch.device, settings: Settings) -> list[Row]:
    """The replica's resize (Pillow's LANCZOS in integer torch ops) on the device: tiles equal to the CPU path's on the
    test corpus and at SmolVLM-256M's settings, and its time per image for a web-sized and a large photo."""
    from fms_smolvlm.processing import SourceImage, image_tiles, plan_tiles, tile_image, tiles_from_sources
    from tests.test_replica_tiling import SETTINGS, corpus

    mismatched, checked = [], 0
    for name, image_settings in SETTINGS.items():
        images = {label: decode_image(data) for label, data in corpus().items()} if name != "256m" else {
            f"{w}x{h}": random_image(w, h, seed=w) for w, h in ((640, 480), (300, 900), (1000, 700))}
        sources = [SourceImage(np.asarray(image), plan_tiles(*image.size, image_settings)) for image in images.values()]
        for label, image, tiles in zip(images, images.values(), tiles_from_sources(sources, device)):
            checked += 1
            if not np.array_equal(tiles.cpu().numpy(), tile_image(image, image_settings).tiles):
                mismatched.append(f"{name}:{label}")
    rows = [Row("resize on the device: tiles = CPU path's", f"{checked - len(mismatched)}/{checked} images"
                + (f" (differ: {', '.join(mismatched[:5])})" if mismatched else ""), "all identical", not mismatched)]
    for size in settings.resize_sizes:
        image = random_image(*size, seed=1)
        source, _ = image_tiles(image, SETTINGS["256m"], "replica")
        source = source if isinstance(source, SourceImage) else SourceImage(np.asarray(image), plan_tiles(*size, SETTINGS["256m"]))
        on_device = SourceImage(torch.from_numpy(np.asarray(image).copy()).to(device), source.plan)
        tiles_from_sources([on_device], device)  # coefficients cached, kernels loaded

        def run():
            tiles_from_sources([on_device], device)
            if device.type == "cuda":
                torch.cuda.synchronize()

        started = time.perf_counter()
        for _ in range(settings.resize_repeats):
            run()
        per_image = (time.perf_counter() - started) / settings.resize_repeats
        rows.append(Row(f"resize on the device, {size[0]}x{size[1]} -> {source.plan.num_tiles} tiles of 512 (256M)",
                        f"{1e3 * per_image:.2f} ms per image", "", None))
    return rows


# ---------------------------------------------------------------------------------------------
# Start-up


def startup_checks(device: torch.device, settings: Settings) -> list[Row]:
    """benchmarks/startup.py: a first replica compiling, a second loading its artifact, a fresh machine loading it
    from the packed artifact (CUDA graphs captured by each warm-up)."""
    command = [sys.executable, str(ROOT / "benchmarks" / "startup.py"), "--device", device.type, *settings.startup_args]
    print("$", " ".join(command[1:]), flush=True)
    output = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    print(output.stdout, output.stderr[-2000:] if output.returncode else "", flush=True)
    rows = [Row("start-up benchmarks/startup.py exit status", str(output.returncode), "= 0", output.returncode == 0)]
    for line in output.stdout.splitlines():
        for name in ("first replica", "second replica", "fresh machine"):
            if line.startswith(name):
                ready, _, _, compiled, loaded = line[34:].split()[:5]
                ok = None if name == "first replica" else int(compiled) == 0 and int(loaded) > 0
                rows.append(Row(f"start-up {name}: ready s, graphs compiled / loaded", f"{ready} s, {compiled} / {loaded}",
                                "" if ok is None else "0 compiled", ok))
    return rows


# ---------------------------------------------------------------------------------------------
# Throughput


def run_benchmark(device: torch.device, settings: Settings) -> tuple[list[Row], str]:
    """benchmarks/generate.py in a subprocess (a fresh process: no memory or compiled graphs of the checks above);
    its output is shown as it comes and returned."""
    command = [sys.executable, str(ROOT / "benchmarks" / "generate.py"), "--device", device.type, *settings.benchmark_args]
    print("$", " ".join(command[1:]), flush=True)
    started = time.perf_counter()
    lines = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=ROOT) as process:
        for line in process.stdout:
            print(line, end="", flush=True)
            lines.append(line)
    output = "".join(lines)
    rows = [Row("throughput benchmarks/generate.py exit status", f"{process.returncode} ({time.perf_counter() - started:.0f} s)",
                "= 0", process.returncode == 0)]
    return rows + benchmark_rows(output), output


def benchmark_rows(output: str) -> list[Row]:
    """The compiled continuous engine's line of each table (batch size, workload), as information."""
    rows, batch, workload = [], "?", "?"
    for line in output.splitlines():
        if heading := re.search(r"batch (\d+)$", line):
            batch = heading.group(1)
        elif line.startswith(("fixed:", "mixed:")):
            workload = line.split(":")[0]
        elif line.startswith("engine compiled, continuous"):
            fields = line[len("engine compiled, continuous") :].split()
            if workload == "fixed":  # images/s, vs HF, step ms, same tokens
                value = f"{fields[0]} images/s, {fields[1]} HF, step {fields[2]} ms, same tokens {fields[3]}"
            else:  # images/s, tokens/s, vs HF
                value = f"{fields[0]} images/s, {fields[1]} tokens/s, {fields[2]} HF"
            rows.append(Row(f"throughput batch {batch} {workload}, engine compiled continuous", value, "", None))
    return rows


# ---------------------------------------------------------------------------------------------
# The table


def table(rows: list[Row]) -> str:
    """The rows in aligned columns: check, measured value, bound, pass / FAIL / info."""
    lines = [("check", "measured", "bound", "result")]
    lines += [(r.check, r.value, r.bound, "info" if r.ok is None else "pass" if r.ok else "FAIL") for r in rows]
    widths = [max(len(line[column]) for line in lines) for column in range(3)]
    return "\n".join("  ".join(f"{cell:<{width}}" for cell, width in zip(line, widths + [0])).rstrip() for line in lines)


def verdict(rows: list[Row]) -> str:
    failed = sum(row.ok is False for row in rows)
    return f"{failed} of {sum(row.ok is not None for row in rows)} checks failed" if failed else "all checks passed"


def environment(device: torch.device) -> str:
    import transformers

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    return f"gpu_check on {where}: torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny settings: few requests, cpu-mid, one small batch")
    parser.add_argument("--out", type=Path, help="also write the table (and the benchmark's tables) to this file")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        build = "a CPU build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        print(f"gpu_check: no CUDA device available to torch {torch.__version__} ({build}); "
              "`--device cpu --quick` runs a smoke check on the CPU", file=sys.stderr)
        return 2

    device, settings = torch.device(args.device), QUICK if args.quick else FULL
    header = environment(device) + (" [quick]" if args.quick else "")
    print(header, flush=True)
    torch.manual_seed(0)
    with TemporaryDirectory() as tmp:
        rows = parity_checks(Path(tmp), device)
        engine = engine_checks(Path(tmp), device, settings) + resize_checks(device, settings)
        print(table(engine), flush=True)
        rows += engine
    rows += startup_checks(device, settings)
    torch.cuda.empty_cache()  # the benchmark's process gets this one's cached GPU memory (a no-op without CUDA)
    benchmark, benchmark_output = run_benchmark(device, settings)
    rows += benchmark
    summary = "\n".join([header, table(rows), verdict(rows)])
    print("\n" + summary)
    if args.out:
        args.out.write_text(summary + "\n\nbenchmarks/generate.py:\n" + benchmark_output)
    return 1 if any(row.ok is False for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
