"""Replica start-up: how long until a compiled replica is ready (``Captioner.from_pretrained(..., compile=True,
warmup=True)``: load, then every graph compiled or loaded and run once), in three situations, each in a fresh process
with an empty Inductor cache of its own:

* first replica: nothing cached, it compiles every graph and saves the artifact;
* second replica: the artifact the first one left in this machine's compile cache;
* fresh machine: an empty compile cache, filled from the artifact packed as the job publishes it in its output
  (``OUTPUT/_compiled/<digest>.tar``), as a scheduled rerun on new nodes does.

An eager replica (no compile) is timed beside them, and each replica then captions one batch, so the figures show
what the warm-up buys.

    python benchmarks/startup.py --config 256m                       # the published 256M shape, fp32, batch 8
    python benchmarks/startup.py --config 256m --dtype bfloat16
    python benchmarks/startup.py --config cpu-mid
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def child(args) -> None:
    """One replica: construct, warm up, caption a batch; print the timings as JSON."""
    started = time.perf_counter()
    import torch

    from fms_smolvlm import Captioner
    from pipeline.testing import synthetic_image

    imported = time.perf_counter()
    captioner = Captioner.from_pretrained(args.checkpoint, device=args.device, dtype=args.dtype, compile=args.compile,
                                          max_batch_size=args.batch_size, image_longest_edge=args.longest_edge,
                                          image_splitting=args.longest_edge is None)
    loaded = time.perf_counter()
    report = captioner.engine.warmup()
    ready = time.perf_counter()
    images = [synthetic_image(640, 480, seed=i) for i in range(args.batch_size)]
    captioner.generate(images, max_new_tokens=args.new_tokens, ignore_eos=True)
    first_batch = time.perf_counter() - ready
    stats = captioner.engine.stats()
    print(json.dumps({
        "import_s": imported - started, "load_s": loaded - imported, "warmup_s": ready - loaded,
        "ready_s": ready - imported, "first_batch_s": first_batch,
        "compiled": stats["compiled_graphs"], "loaded": stats["loaded_graphs"],
        "threads": torch.get_num_threads(), "artifact": report.get("artifact"),
    }))


def replica(args, checkpoint: Path, cache: Path, compile: bool) -> dict:
    inductor = tempfile.mkdtemp(prefix="inductor-")  # a process of a fresh machine: nothing in Inductor's own cache
    env = dict(os.environ, FMS_SMOLVLM_COMPILE_CACHE=str(cache), TORCHINDUCTOR_CACHE_DIR=inductor)
    command = [sys.executable, __file__, "--child", "--checkpoint", str(checkpoint), "--device", args.device, "--dtype", args.dtype,
               "--batch-size", str(args.batch_size), "--new-tokens", str(args.new_tokens)]
    command += ["--compile"] if compile else []
    command += ["--longest-edge", str(args.longest_edge)] if args.longest_edge else []
    output = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--config", default="256m")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--longest-edge", type=int, default=None,
                        help="resize images to this edge, unsplit (default: the tile size, one tile per image)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    import torch

    from benchmarks.generate import CONFIGS
    from fms_smolvlm.testing import published_config
    from fms_smolvlm.testing import write_random_checkpoint
    from pipeline.artifacts import pack, unpack

    config = CONFIGS[args.config] if args.config in CONFIGS else published_config(args.config)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = write_random_checkpoint(tmp / args.config, dtype=getattr(torch, args.dtype), **config)
        args.longest_edge = args.longest_edge or json.loads((checkpoint / "config.json").read_text())["vision_config"]["image_size"]
        rows = [("eager replica", replica(args, checkpoint, tmp / "unused", compile=False))]
        first = replica(args, checkpoint, tmp / "machine-a", compile=True)
        rows += [("first replica, nothing cached", first)]
        rows += [("second replica, same machine", replica(args, checkpoint, tmp / "machine-a", compile=True))]
        artifact = Path(first["artifact"])
        packed = pack(artifact)  # what the job publishes in OUTPUT/_compiled/
        unpack(packed, tmp / "machine-b" / artifact.name)
        rows += [("fresh machine, from the output", replica(args, checkpoint, tmp / "machine-b", compile=True))]

    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{os.cpu_count()} CPUs"
    print(f"\n== {args.config} config, {args.dtype}, batch {args.batch_size}, one {args.longest_edge}-px tile per image, "
          f"{where}; artifact {len(packed) / 1e6:.1f} MB packed")
    print(f"{'':34s}{'ready s':>9s}{'load s':>8s}{'warm-up s':>11s}{'compiled':>10s}{'loaded':>8s}{'1st batch s':>13s}")
    for name, r in rows:
        print(f"{name:34s}{r['ready_s']:9.1f}{r['load_s']:8.1f}{r['warmup_s']:11.1f}{r['compiled'] or 0:10d}"
              f"{r['loaded'] or 0:8d}{r['first_batch_s']:13.2f}")


if __name__ == "__main__":
    main()
