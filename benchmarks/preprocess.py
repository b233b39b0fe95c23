"""CPU preprocessing: fms_smolvlm.processing vs HF's image processor (PIL backend), one core, same images.

Both start from encoded bytes (what the pipeline reads from a shard) and end with what each ships to the model
stage: our uint8 tiles (+ token ids) vs HF's float32 pixel_values + int64 pixel_attention_mask.

    python benchmarks/preprocess.py                       # 48 JPEG/PNG images from 640x480 to 4000x3000
    python benchmarks/preprocess.py --images 96 --longest-edge 2048 --tile 512
    python benchmarks/preprocess.py --video                # a 30 s 720p clip at SmolVLM2's sampling

Prints images/s per core, bytes per image, and the ratios. ``--video``: seconds for one clip, seeking to the
sampled frames vs decoding every frame (what HF's video loaders do), both then tiled.
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

from fms_smolvlm.processing import ImageSettings, decode_image, tile_image  # noqa: E402
from pipeline.testing import synthetic_image  # noqa: E402

PHOTO_SIZES = [(640, 480), (1024, 768), (1280, 960), (1920, 1080), (2048, 1536), (3000, 2000), (4000, 3000), (1080, 1920)]


def photo_like(width: int, height: int, seed: int) -> Image.Image:
    """Smooth fields plus sensor-like noise: JPEG/PNG sizes and decode costs close to real photos."""
    base = np.asarray(synthetic_image(width, height, seed)).astype(np.int16)
    noise = np.random.default_rng(seed).normal(0, 6, base.shape).astype(np.int16)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def encoded_images(count: int) -> list[bytes]:
    images = []
    for i in range(count):
        width, height = PHOTO_SIZES[i % len(PHOTO_SIZES)]
        buffer = io.BytesIO()
        if i % 4 == 3:
            photo_like(width, height, i).save(buffer, "PNG", compress_level=6)
        else:
            photo_like(width, height, i).save(buffer, "JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


def run_ours(images: list[bytes], settings: ImageSettings) -> tuple[float, float]:
    started = time.perf_counter()
    shipped = 0
    for data in images:
        processed = tile_image(decode_image(data), settings)
        shipped += processed.tiles.nbytes
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
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--longest-edge", type=int, default=2048, help="SmolVLM-256M/500M: 2048")
    parser.add_argument("--tile", type=int, default=512, help="SmolVLM-256M/500M: 512")
    parser.add_argument("--repeats", type=int, default=2, help="best of N passes")
    args = parser.parse_args()
    if args.video:
        return video(args)

    images = encoded_images(args.images)
    settings = ImageSettings(longest_edge=args.longest_edge, tile_size=args.tile, splitting=True)
    run_ours(images[:2], settings), run_hf(images[:2], args.longest_edge, args.tile)  # warm imports and caches
    ours = min((run_ours(images, settings) for _ in range(args.repeats)), key=lambda r: r[0])
    hf = min((run_hf(images, args.longest_edge, args.tile) for _ in range(args.repeats)), key=lambda r: r[0])

    mean_mb = sum(map(len, images)) / len(images) / 1e6
    print(f"{len(images)} images (JPEG q90 and PNG, 640x480 to 4000x3000, {mean_mb:.2f} MB encoded on average), "
          f"longest_edge={args.longest_edge}, tile={args.tile}, one core")
    print(f"{'':24s}{'images/s/core':>14s}{'MB/image shipped':>18s}")
    for name, (seconds, shipped) in (("HF Idefics3 (PIL)", hf), ("fms_smolvlm.processing", ours)):
        print(f"{name:24s}{len(images) / seconds:14.2f}{shipped / 1e6:18.2f}")
    print(f"speed-up {hf[0] / ours[0]:.2f}x, {hf[1] / ours[1]:.1f}x fewer bytes per image")


if __name__ == "__main__":
    main()
