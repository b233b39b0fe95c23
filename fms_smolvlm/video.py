"""SmolVLM2 video input: frame sampling, seek-based decoding, one tile per frame and the video prompt.

Reproduces, for one encoded clip, what HF's ``SmolVLMProcessor.apply_chat_template`` does with a
``{"type": "video"}`` message (transformers 5.x): ``SmolVLMVideoProcessor.sample_frames`` picks frame
indices from the clip's metadata, and each picked frame is resized so its longest edge is ``video_size`` and
then squashed to one ``tile_size`` square (videos are never split). The prompt text it stands for is
:func:`fms_smolvlm.prompts.video_prompt`.

What HF's loader would see, and what we compute instead:
  * Frames are numbered in presentation order, as HF's loaders number them (``read_video_pyav``
    enumerates every decoded frame; torchcodec's exact mode sorts the packets' timestamps). One demux
    pass (no decoding) lists every frame's timestamp; each wanted frame is then found by seeking to the
    keyframe before it and decoding forward to its timestamp, so a 2-hour film costs 64 short decodes.
  * Metadata as HF's PyAV loader computes it: ``fps`` is the stream's average rate and ``duration`` is
    ``frames / fps``. The frame count is the number of frames the demux pass finds; it equals the
    header's ``stream.frames`` on well-formed files and is right where the header has none (Matroska,
    WebM, MPEG-TS write 0, which makes HF's PyAV loader sample only frame 0; torchcodec, the backend
    HF's processor uses by default, counts by the same scan).
  * Timestamps in the prompt are HF's ``index / fps``, not the frames' own presentation times (they
    differ for variable-frame-rate clips; the model was trained on HF's numbers).
  * Pixels: frames are converted to RGB exactly as HF's PyAV loader does (``to_ndarray("rgb24")``, the
    frame's own colour space); torchcodec's conversion may differ by rounding.
Problems with one clip raise :class:`VideoError` with a one-line reason.
"""

import functools
import io
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import av
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fms_smolvlm.errors import one_line
from fms_smolvlm.sizes import resized_frame_size

DEFAULT_MAX_SECONDS = 3 * 3600

# ISO-BMFF major brands that are still images (HEIF/AVIF), not movies
_IMAGE_BRANDS = {b"avif", b"avis", b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"mif2", b"msf1"}
_MPEG_TS_PACKET = 188


class VideoError(ValueError):
    """This clip cannot be captioned; the message is a one-line reason."""


@dataclass(frozen=True)
class VideoSettings:
    """How a clip becomes frames and tiles: a SmolVLM2 checkpoint's video sampling (read from whichever of its
    files holds it: :func:`fms_smolvlm.checkpoint.video_sampling`), with the caller's overrides.

    * ``fps``, ``max_frames``: the sampling rate and the most frames a clip gives.
    * ``video_size``: the longest edge of the first resize; ``tile_size``: the square every frame is squashed to.
    * ``resample``: the config's PIL code (hub configs say 1, LANCZOS).
    * ``skip_seconds``: ``sample_frames``' ``skip_secs`` default (in no config).
    * ``max_seconds``: ours, not HF's: longer clips are refused before decoding.
    """

    fps: float
    max_frames: int
    video_size: int
    tile_size: int
    max_seconds: float = DEFAULT_MAX_SECONDS
    resample: int = Image.Resampling.LANCZOS
    skip_seconds: float = 1

    def __post_init__(self):
        _interpolation_mode(self.resample)  # refuse an unsupported resample now, not at the first clip


@dataclass(frozen=True)
class VideoMetadata:
    """The numbers HF's sampling and prompt use (``transformers.video_utils.VideoMetadata``)."""

    total_num_frames: int
    fps: float
    duration: float  # seconds, total_num_frames / fps
    width: int
    height: int


@dataclass
class ProcessedVideo:
    tiles: np.ndarray  # uint8 (frames, 3, M, M): one unsplit tile per sampled frame
    frame_indices: np.ndarray  # presentation-order indices of the sampled frames
    timestamps: list  # seconds, HF's index / fps, one per frame
    duration: float  # seconds, as the prompt's H:MM:SS uses it
    width: int
    height: int
    fps: float  # the clip's average frame rate

    @property
    def num_frames(self) -> int:
        return self.tiles.shape[0]


# ---------------------------------------------------------------------------------------------
# Telling videos from images


def is_video(data: bytes) -> bool:
    """Whether ``data`` starts like a video container (by content, never by name): ISO-BMFF (mp4, mov,
    m4v, 3gp; HEIF/AVIF still images excluded), Matroska/WebM, AVI, MPEG-TS."""
    head = bytes(data[:12])
    if head[4:8] == b"ftyp":
        return head[8:12] not in _IMAGE_BRANDS
    if head[4:8] in (b"moov", b"mdat", b"wide"):  # QuickTime files from before ftyp existed
        return True
    if head[:4] == b"\x1a\x45\xdf\xa3":  # EBML
        return True
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return True
    sync_bytes = range(0, 3 * _MPEG_TS_PACKET, _MPEG_TS_PACKET)  # MPEG-TS: 0x47 opens every 188-byte packet
    return len(data) > sync_bytes[-1] and all(data[i] == 0x47 for i in sync_bytes)


# ---------------------------------------------------------------------------------------------
# Sampling and sizes (HF's arithmetic, in its order of operations)


def sample_frame_indices(metadata: VideoMetadata, fps: float, max_frames: int, skip_seconds: float = 1) -> np.ndarray:
    """``SmolVLMVideoProcessor.sample_frames``: about ``fps`` frames a second, at most ``max_frames``, spread
    uniformly; clips long enough skip ``skip_seconds`` at both ends."""
    total = metadata.total_num_frames
    desired = max(min(int(round(fps * metadata.duration)), max_frames), 1)

    start, end = 0, total - 1
    if skip_seconds > 0 and (metadata.duration - 2 * skip_seconds) > (max_frames * fps):
        start = int(skip_seconds * metadata.fps)
        end = int(total - skip_seconds * metadata.fps)
    start, end = max(0, start), min(end, total - 1)
    if start >= end:
        start, end = 0, total - 1
    return np.unique(np.linspace(start, end, desired, dtype=int))


def frame_timestamps(indices: Sequence[int], fps: float) -> list:
    """HF's ``VideoMetadata.timestamps``: seconds as ``index / fps``."""
    return [int(index) / fps for index in indices]


def frame_to_tile(frame: np.ndarray, settings: VideoSettings) -> np.ndarray:
    """An RGB uint8 ``(H, W, 3)`` frame -> one uint8 ``(3, M, M)`` tile, resized as HF's video processor does.

    HF resizes the uint8 frames twice with torchvision (longest edge to ``video_size``, then squashed to
    ``tile_size``), ``antialias=True``, with the config's ``resample`` (LANCZOS in SmolVLM2 configs).
    torchvision >= 0.27 (paired with torch >= 2.12) does LANCZOS on CPU with torch's own uint8 kernel,
    ``F.interpolate(mode="lanczos")``, so we call that kernel: the same pixels without torchvision. It
    matches Pillow-SIMD bit for bit and differs from plain Pillow's LANCZOS (the image path's) by up to 2
    levels on a few percent of values, from rounding the intermediate pass. With a torch that has no
    lanczos, HF (whose torchvision is then older) falls back to antialiased BICUBIC, and so do we.
    """
    frame = np.require(frame, requirements="W")  # torch wants writable memory (copies only a read-only frame)
    pixels = torch.from_numpy(frame).permute(2, 0, 1)[None]  # a channels-last view: the fast layout
    mode = _interpolation_mode(settings.resample)
    height, width = resized_frame_size(frame.shape[0], frame.shape[1], settings.video_size)
    pixels = _resize(pixels, (height, width), mode)
    pixels = _resize(pixels, (settings.tile_size, settings.tile_size), mode)
    return np.ascontiguousarray(pixels[0].numpy())


def video_resize_kernel(settings: VideoSettings) -> str:
    """The resize ``frame_to_tile`` uses (part of a job's identity: a torch without lanczos resizes otherwise)."""
    return _interpolation_mode(settings.resample)


def _resize(pixels: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    if tuple(pixels.shape[-2:]) == size:  # torchvision returns the input unchanged
        return pixels
    return F.interpolate(pixels, size=size, mode=mode, antialias=True, align_corners=False)


def _interpolation_mode(resample: int) -> str:
    """The PIL resample code of a config -> torch's mode, as torchvision resizes uint8 tensors on CPU."""
    if resample == Image.Resampling.LANCZOS:
        return "lanczos" if _torch_has_lanczos() else "bicubic"
    if resample == Image.Resampling.BICUBIC:
        return "bicubic"
    raise ValueError(f"video resample {resample} is not supported (LANCZOS=1 or BICUBIC=3)")


@functools.cache
def _torch_has_lanczos() -> bool:
    try:
        F.interpolate(torch.zeros((1, 1, 2, 2), dtype=torch.uint8), size=(1, 1), mode="lanczos", antialias=True)
    except (NotImplementedError, ValueError, RuntimeError):
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Decoding


class VideoDecoder:
    """An open clip: header checks, one demux pass that lists every frame, and frames by index.

    Raises :class:`VideoError` for bytes that are not a decodable video, no video stream, no frames, or
    a clip longer than ``max_seconds`` (from the header, before any frame is read, and again from the
    frame count). Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, data: bytes, max_seconds: float = DEFAULT_MAX_SECONDS):
        self.frames_decoded = 0  # decoder output frames, wanted or not: what seeking saves
        self._data = bytes(data)
        self._container = _open(self._data)
        try:
            self._stream = _video_stream(self._container)
            _check_length(_header_seconds(self._container, self._stream), max_seconds)
            self._index = _scan(self._container, self._stream)
            self.metadata = _metadata(self._stream, self._index.count)
            _check_length(self.metadata.duration, max_seconds)
        except BaseException:
            self._container.close()
            raise

    def __enter__(self) -> "VideoDecoder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._container.close()

    def frames(self, indices: Sequence[int]) -> Iterator[np.ndarray]:
        """RGB uint8 ``(H, W, 3)`` frames at increasing presentation-order ``indices``, in that order."""
        try:
            if self._index.frame_pts is not None:
                yield from self._frames_by_seeking(indices)
            else:
                yield from self._frames_in_order(indices)
        except av.FFmpegError as error:
            raise VideoError(f"corrupt video data: {one_line(error)}") from None

    def _frames_by_seeking(self, indices: Sequence[int]) -> Iterator[np.ndarray]:
        decoded: Optional[Iterator] = None
        position = None  # pts of the last frame decoded
        for index in indices:
            target = int(self._index.frame_pts[index])
            frame = None
            if decoded is not None and self._keyframe_before(target) <= position:
                # no keyframe between here and the target: decoding on is never slower than seeking
                frame = self._advance_to(decoded, target)
            if frame is None:
                frame, decoded = self._seek_to(target)
            if frame is None:
                raise VideoError(f"frame {index} (pts {target}) could not be decoded")
            position = frame.pts
            yield frame.to_ndarray(format="rgb24")

    def _seek_to(self, target: int):
        """Seek to the keyframe before ``target`` and decode forward to it. Some containers (MPEG-TS) seek
        imprecisely and land past the target: then back off 1, 2, 4... keyframes, at last to the start."""
        keyframes = self._index.keyframe_pts
        keyframe = int(np.searchsorted(keyframes, target, side="right")) - 1
        step = 1
        while True:
            decoded = self._decode_from(int(keyframes[keyframe]) if keyframe >= 0 else None)
            frame = self._advance_to(decoded, target)
            if frame is not None or keyframe < 0:
                return frame, decoded
            keyframe -= step
            step *= 2

    def _frames_in_order(self, indices: Sequence[int]) -> Iterator[np.ndarray]:
        # packets without timestamps cannot be sought: number the decoded frames as HF's loader does
        wanted = iter(indices)
        target = next(wanted, None)
        if target is None:
            return
        for number, frame in enumerate(self._decode_from(None)):
            if number == target:
                yield frame.to_ndarray(format="rgb24")
                target = next(wanted, None)
                if target is None:
                    return
        raise VideoError(f"frame {target} could not be decoded (the clip ended after {self.frames_decoded})")

    def _keyframe_before(self, pts: int) -> int:
        keyframes = self._index.keyframe_pts
        position = np.searchsorted(keyframes, pts, side="right")
        return int(keyframes[position - 1]) if position else int(self._index.frame_pts[0])

    def _decode_from(self, pts: Optional[int]) -> Iterator:
        """Frames decoded from the keyframe at or before ``pts`` (None: from the start of the file)."""
        if pts is None:  # reopen: raw streams cannot seek, and the demux pass left us at the end
            self._container.close()
            self._container = _open(self._data)
            self._stream = self._container.streams.video[0]
        else:
            self._container.seek(pts, stream=self._stream, backward=True, any_frame=False)
        return self._decoded(self._container.decode(self._stream))

    def _decoded(self, frames: Iterator) -> Iterator:
        for frame in frames:
            self.frames_decoded += 1
            yield frame

    @staticmethod
    def _advance_to(decoded: Iterator, target: int):
        """The frame with pts ``target``, decoding forward; None when the decoder is already past it."""
        for frame in decoded:
            if frame.pts is None or frame.pts < target:
                continue
            return frame if frame.pts == target else None
        return None


def _open(data: bytes):
    if not data:
        raise VideoError("empty file")
    try:
        return av.open(io.BytesIO(data), mode="r")
    except av.FFmpegError as error:
        raise VideoError(f"not a decodable video: {one_line(error)}") from None


def _video_stream(container):
    if not container.streams.video:
        if container.streams.audio:
            raise VideoError("no video stream (audio only)")
        raise VideoError("no video stream")
    return container.streams.video[0]  # the stream HF's loaders read


def _header_seconds(container, stream) -> Optional[float]:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


def _check_length(seconds: Optional[float], max_seconds: float) -> None:
    if seconds is not None and seconds > max_seconds:
        raise VideoError(f"video is {seconds:.0f} s long, over the limit of {max_seconds:.0f} s")


@dataclass(frozen=True)
class _FrameIndex:
    count: int  # frames in the stream
    frame_pts: Optional[np.ndarray]  # every frame's pts in presentation order; None: packets carry none
    keyframe_pts: np.ndarray  # sorted


def _scan(container, stream) -> _FrameIndex:
    """One demux pass (no decoding) over the video stream. Discarded packets (cut by an edit list)
    produce no frame, as in HF's loaders."""
    frame_pts, keyframe_pts, count = [], [], 0
    try:
        for packet in container.demux(stream):
            if packet.size == 0 or packet.is_discard:  # the demuxer's end-of-stream marker; edit-list cuts
                continue
            count += 1
            if packet.pts is not None:
                frame_pts.append(packet.pts)
                if packet.is_keyframe:
                    keyframe_pts.append(packet.pts)
    except av.FFmpegError as error:
        raise VideoError(f"corrupt video data: {one_line(error)}") from None
    if count == 0:
        raise VideoError("video stream has no frames")
    timestamped = len(frame_pts) == count
    return _FrameIndex(
        count=count,
        frame_pts=np.sort(np.asarray(frame_pts, dtype=np.int64)) if timestamped else None,
        keyframe_pts=np.sort(np.asarray(keyframe_pts, dtype=np.int64)),
    )


def _metadata(stream, total_num_frames: int) -> VideoMetadata:
    if not stream.average_rate:
        raise VideoError("video stream has no frame rate")
    # HF divides by the rate as a fraction, then converts: the same float, to the last bit
    duration = float(total_num_frames / stream.average_rate)
    return VideoMetadata(total_num_frames, float(stream.average_rate), duration, stream.width, stream.height)


# ---------------------------------------------------------------------------------------------
# All together


def process_video(data: bytes, settings: VideoSettings) -> ProcessedVideo:
    """Encoded clip -> sampled frames as uint8 tiles, with HF's timestamps and duration for the prompt.
    Raises :class:`VideoError` for a clip that cannot be used."""
    with VideoDecoder(data, settings.max_seconds) as video:
        metadata = video.metadata
        indices = sample_frame_indices(metadata, settings.fps, settings.max_frames, settings.skip_seconds)
        # each frame becomes its tile at once: 64 full-size frames of a 4K clip would be 1.6 GB
        tiles = np.stack([frame_to_tile(frame, settings) for frame in video.frames(indices)])
    return ProcessedVideo(
        tiles=tiles,
        frame_indices=indices,
        timestamps=frame_timestamps(indices, metadata.fps),
        duration=metadata.duration,
        width=metadata.width,
        height=metadata.height,
        fps=metadata.fps,
    )
