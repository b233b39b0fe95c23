"""Synthetic image shards in every input format, for the demo, the tests and the benchmarks."""

import io
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

SIZES = [(640, 480), (480, 640), (300, 300), (1024, 256), (200, 500), (800, 600), (96, 96), (1200, 900)]


def synthetic_image(width: int, height: int, seed: int) -> Image.Image:
    """Smooth colour fields with a few shapes: compresses like a photo, not like noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    pixels = np.asarray(image).copy()
    for _ in range(3):
        x, y = rng.integers(0, width), rng.integers(0, height)
        radius = int(rng.integers(5, max(6, min(width, height) // 4)))
        pixels[max(0, y - radius) : y + radius, max(0, x - radius) : x + radius] = rng.integers(0, 256, 3)
    return Image.fromarray(pixels)


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def sample_images(count: int, seed: int) -> list[tuple[str, bytes]]:
    """``(extension, bytes)``: JPEG and PNG, of varied sizes and aspect ratios."""
    images = []
    for i in range(count):
        width, height = SIZES[(seed + i) % len(SIZES)]
        fmt, extension = ("JPEG", "jpg") if i % 2 == 0 else ("PNG", "png")
        images.append((extension, encode(synthetic_image(width, height, seed * 1000 + i), fmt)))
    return images


def write_webdataset_shard(path: Path, samples: list[tuple[str, bytes]], key_prefix: str = "sample") -> list[str]:
    """A WebDataset tar with ``<key>.<ext>`` images and a ``<key>.json`` sibling; returns the keys."""
    keys = []
    with tarfile.open(path, "w") as archive:
        for i, (extension, data) in enumerate(samples):
            key = f"{key_prefix}{i:05d}"
            for name, payload in ((f"{key}.{extension}", data), (f"{key}.json", b'{"source": "synthetic"}')):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))
            keys.append(key)
    return keys


def write_parquet_shard(path: Path, samples: list[tuple[str, bytes]]) -> list[str]:
    keys = [f"img-{i:05d}" for i in range(len(samples))]
    table = pa.table({"id": keys, "jpg": pa.array([data for _, data in samples], pa.binary())})
    pq.write_table(table, path)
    return keys


def write_folder_shard(path: Path, samples: list[tuple[str, bytes]]) -> list[str]:
    path.mkdir(parents=True, exist_ok=True)
    keys = []
    for i, (extension, data) in enumerate(samples):
        key = f"photo_{i:05d}.{extension}"
        (path / key).write_bytes(data)
        keys.append(key)
    return keys


WRITERS = {"webdataset": ("{}.tar", write_webdataset_shard), "parquet": ("{}.parquet", write_parquet_shard),
           "folder": ("{}", write_folder_shard)}


def write_sample_shards(directory, shards: int = 3, images_per_shard: int = 4, fmt: str = "webdataset", seed: int = 0):
    """``shards`` shards of ``images_per_shard`` synthetic images; returns {shard file or folder name: keys}."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pattern, writer = WRITERS[fmt]
    written = {}
    for shard in range(shards):
        name = pattern.format(f"part-{shard:05d}")
        written[name] = writer(directory / name, sample_images(images_per_shard, seed + shard))
    return written


def synthetic_clip(
    seconds: float = 2.0,
    fps: float = 10,
    width: int = 64,
    height: int = 48,
    codec: str = "libx264",
    container: str = "mp4",
    seed: int = 0,
    frame_times: list[float] | None = None,
    keyframe_interval: int | None = None,
) -> bytes:
    """An encoded clip of a coloured box moving over a shifting colour field, so every frame differs.

    ``codec`` is a PyAV encoder (``libx264``, ``libvpx-vp9``, ``mpeg4``...), ``container`` an FFmpeg muxer
    (``mp4``, ``mov``, ``webm``, ``matroska``, ``avi``, ``mpegts``). ``frame_times`` (increasing seconds) makes
    a variable-frame-rate clip with those presentation times instead of ``seconds * fps`` regular ones; ``fps``
    is then only the rate the header advertises. ``keyframe_interval`` defaults to two seconds of frames.
    Width and height must be even (4:2:0 chroma).
    """
    import av
    from fractions import Fraction

    fast_encoder_options = {
        "libx264": {"preset": "veryfast"},  # keeps B-frames: decode order differs from presentation order
        "libvpx-vp9": {"deadline": "realtime", "cpu-used": "8"},
    }
    rate = Fraction(fps).limit_denominator(1001)
    if frame_times is None:
        time_base = 1 / rate
        pts = list(range(round(seconds * rate)))
    else:
        time_base = Fraction(1, 1000)
        pts = [round(t * 1000) for t in frame_times]
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=3)
    box_colour = rng.integers(0, 256, size=3).astype(np.uint8)
    box = max(4, min(width, height) // 3)
    ramp = np.linspace(0, 60, width)[None, :, None]

    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container) as output:
        stream = output.add_stream(codec, rate=rate, options=fast_encoder_options.get(codec, {}))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.time_base = time_base
        stream.codec_context.gop_size = keyframe_interval or max(1, round(2 * rate))
        for i, frame_pts in enumerate(pts):
            pixels = np.empty((height, width, 3), np.uint8)
            pixels[:] = ((base + 7 * i) % 196 + ramp).astype(np.uint8)
            x = (3 * i) % max(1, width - box)
            y = (2 * i) % max(1, height - box)
            pixels[y : y + box, x : x + box] = box_colour
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts, frame.time_base = frame_pts, time_base
            for packet in stream.encode(frame):
                output.mux(packet)
        for packet in stream.encode():
            output.mux(packet)
    return buffer.getvalue()
