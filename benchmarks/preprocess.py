"""The CPU stage: HF's image processor (PIL backend) vs fms_smolvlm.processing resizing on the CPU, and resizing on
the replica, one core, same images.

Each starts from encoded bytes (what the pipeline reads from a shard) and ends with what it ships to the model stage:
HF's float32 pixel_values + int64 pixel_attention_mask; our uint8 tiles; or, resizing on the replica, the decoded image
and its tile plan whenever that is fewer bytes than its tiles (the replica then resizes and tiles it, byte for byte
the same: timed per device by ``make gpu-check``).

    python benchmarks/preprocess.py                       # the photo mix (640x480 to 4000x3000) and the web mix
    python benchmarks/preprocess.py --mixes web --images 200
    python benchmarks/preprocess.py --video                # a 30 s 720p clip at SmolVLM2's sampling

Mixes: ``photo``: JPEG q90 and PNG photos from 640x480 to 4000x3000; ``web``: JPEG, PNG and WebP with edges of 200 to
1000 px, as image-text crawls store them. Prints images/s per core, MB shipped per image, and the ratios.
``--video``: seconds for one clip, seeking to the sampled frames vs decoding every frame (what HF's video loaders
do), both then tiled.
"""

import argparse
import io
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core, as one Ray preprocessing task gets

from PIL import Image  # noqa: E402

from fms_smolvlm.processing import ImageSettings, decode_image, image_tiles  # noqa: E402
from pipeline.testing import synthetic_image  # noqa: E402

PHOTO_SIZES = [(640, 480), (1024, 768), (1280, 960), (1920, 1080), (2048, 1536), (3000, 2000), (4000, 3000), (1080, 1920)]


def photo_like(width: int, height: int, seed: int) -> Image.Image:
    """Smooth fields plus sensor-like noise: JPEG/PNG sizes and decode costs close to real photos."""
    base = np.asarray(synthetic_image(width, height, seed)).astype(np.int16)
    noise = np.random.default_rng(seed).normal(0, 6, base.shape).astype(np.int16)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def photo_mix(count: int) -> list[bytes]:
    images = []
    for i in range(count):
        image = photo_like(*PHOTO_SIZES[i % len(PHOTO_SIZES)], i)
        images.append(encoded(image, "PNG", compress_level=6) if i % 4 == 3 else encoded(image, "JPEG", quality=90))
    return images


def web_mix(count: int) -> list[bytes]:
    """Edges of 200 to 1000 px at common aspect ratios; JPEG q85 (most), PNG and WebP (a quarter each)."""
    rng = np.random.default_rng(0)
    images = []
    for i in range(count):
        long_edge = int(rng.integers(200, 1001))
        aspect = float(rng.choice([1.0, 4 / 3, 3 / 2, 16 / 9, 2 / 3, 3 / 4]))
        size = (long_edge, round(long_edge / aspect)) if aspect >= 1 else (round(long_edge * aspect), long_edge)
        image = photo_like(*size, 1000 + i)
        fmt = ["JPEG", "JPEG", "PNG", "WEBP"][i % 4]
        images.append(encoded(image, fmt, **({"quality": 85} if fmt != "PNG" else {})))
    return images


MIXES = {"photo": photo_mix, "web": web_mix}


def run_ours(images: list[bytes], settings: ImageSettings, resize_on: str) -> tuple[float, float]:
    started = time.perf_counter()
    shipped = 0
    for data in images:
        tiles, _ = image_tiles(decode_image(data), settings, resize_on)
        shipped += tiles.nbytes
    return time.perf_counter() - started, shipped / len(images)


def run_hf(images: list[bytes], longest_edge: int, tile: int) -> tuple[float, float]:
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    processor = Idefics3ImageProcessorPil(
        size={"longest_edge": longest_edge}, max_image_size={"longest_edge": tile},
        image_mean=[0.5] * 3, image_std=[0.5] * 3,
    )
    started = time.perf_counter()
    shipped = 0
    for data in images:
        image = Image.open(io.BytesIO(data))
        out = processor(images=[[image]], return_tensors="np")
        shipped += out["pixel_values"].nbytes + out["pixel_attention_mask"].nbytes
    return time.perf_counter() - started, shipped / len(images)


def video(args) -> None:
    """A 30 s 1280x720 30 fps H.264 clip (keyframe every 2 s) at SmolVLM2's default sampling: 1 frame per second,
    at most 64, frames resized to the processor's longest edge and squashed to one tile each."""
    from fms_smolvlm.video import VideoDecoder, VideoSettings, frame_to_tile, process_video, sample_frame_indices
    from pipeline.testing import synthetic_clip

    clip = synthetic_clip(seconds=30, fps=30, width=1280, height=720, keyframe_interval=60)
    settings = VideoSettings(fps=1, max_frames=64, video_size=args.longest_edge, tile_size=args.tile)

    def every_frame() -> int:
        with VideoDecoder(clip) as decoder:
            wanted = set(sample_frame_indices(decoder.metadata, settings.fps, settings.max_frames).tolist())
            frames = [frame for index, frame in enumerate(decoder.frames(range(decoder.metadata.total_num_frames)))
                      if index in wanted]
        return len([frame_to_tile(frame, settings) for frame in frames])

    def timed(fn) -> float:
        fn()  # warm
        started = time.perf_counter()
        for _ in range(args.repeats):
            fn()
        return (time.perf_counter() - started) / args.repeats

    seek = timed(lambda: process_video(clip, settings))
    full = timed(every_frame)
    with VideoDecoder(clip) as decoder:
        total = decoder.metadata.total_num_frames
    frames = process_video(clip, settings).num_frames
    print(f"30 s 1280x720 30 fps H.264 clip ({len(clip) / 1e6:.1f} MB, {total} frames), {frames} frames sampled, "
          f"video size {args.longest_edge}, tile {args.tile}, one core")
    print(f"{'seek to the sampled frames':30s}{seek:8.2f} s")
    print(f"{'decode every frame':30s}{full:8.2f} s   ({full / seek:.1f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--video", action="store_true", help="time a 30 s 720p clip instead of images")
    parser.add_argument("--mixes", nargs="+", choices=sorted(MIXES), default=["photo", "web"])
    parser.add_argument("--images", type=int, default=48, help="per mix")
    parser.add_argument("--longest-edge", type=int, default=2048, help="SmolVLM-256M/500M: 2048")
    parser.add_argument("--tile", type=int, default=512, help="SmolVLM-256M/500M: 512")
    parser.add_argument("--repeats", type=int, default=2, help="best of N passes")
    args = parser.parse_args()
    if args.video:
        return video(args)

    settings = ImageSettings(longest_edge=args.longest_edge, tile_size=args.tile, splitting=True)
    runs = {
        "HF Idefics3 (PIL)": lambda images: run_hf(images, args.longest_edge, args.tile),
        "ours, resize on the CPU": lambda images: run_ours(images, settings, "cpu"),
        "ours, resize on the replica": lambda images: run_ours(images, settings, "replica"),
    }
    for mix in args.mixes:
        images = MIXES[mix](args.images)
        for run in runs.values():
            run(images[:2])  # warm imports and caches
        results = {name: min((run(images) for _ in range(args.repeats)), key=lambda r: r[0]) for name, run in runs.items()}
        mean_mb = sum(map(len, images)) / len(images) / 1e6
        print(f"\n{mix} mix: {len(images)} images ({mean_mb:.2f} MB encoded on average), longest_edge={args.longest_edge}, "
              f"tile={args.tile}, one core, best of {args.repeats}")
        print(f"{'':30s}{'images/s/core':>14s}{'vs HF':>8s}{'vs CPU path':>13s}{'MB/image shipped':>18s}")
        hf, cpu = results["HF Idefics3 (PIL)"], results["ours, resize on the CPU"]
        for name, (seconds, shipped) in results.items():
            print(f"{name:30s}{len(images) / seconds:14.2f}{hf[0] / seconds:7.2f}x{cpu[0] / seconds:12.2f}x"
                  f"{shipped / 1e6:18.2f}")


if __name__ == "__main__":
    main()
