"""Video input checked against HF's own code: ``SmolVLMVideoProcessor.sample_frames``, the video processor's
size arithmetic, ``read_video_pyav`` (HF's PyAV loader: metadata and frames), and ``SmolVLMProcessor``'s
video prompt expansion. HF's video processor class cannot be instantiated without torchvision, so its
methods are called on bare instances (``object.__new__``) holding only the attributes they read."""

import functools
import io
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.models.smolvlm.processing_smolvlm import SmolVLMProcessor
from transformers.models.smolvlm.video_processing_smolvlm import (
    SmolVLMVideoProcessor,
    get_resize_output_image_size,
)
from transformers.video_utils import VideoMetadata as HFVideoMetadata
from transformers.video_utils import read_video_pyav

from fms_smolvlm import prompts, video
from fms_smolvlm.prompts import render_user_turn, video_prompt
from fms_smolvlm.processing import ImageSettings, SmolVLMPreprocessor
from fms_smolvlm.sizes import resized_frame_size
from fms_smolvlm.testing import CHAT_TEMPLATE, train_tokenizer
from fms_smolvlm.video import (
    VideoDecoder,
    VideoError,
    VideoMetadata,
    VideoSettings,
    ProcessedVideo,
    frame_timestamps,
    frame_to_tile,
    is_video,
    process_video,
    sample_frame_indices,
)
from pipeline.testing import encode, synthetic_clip, synthetic_image

HF_VIDEO_PROCESSOR = object.__new__(SmolVLMVideoProcessor)  # sample_frames reads nothing from self when given both
SMALL = VideoSettings(fps=1, max_frames=64, video_size=96, tile_size=32)


def hf_sample_frames(metadata: HFVideoMetadata, fps: float, max_frames: int) -> np.ndarray:
    return SmolVLMVideoProcessor.sample_frames(HF_VIDEO_PROCESSOR, metadata, num_frames=max_frames, fps=fps)


def hf_read_video(data: bytes, fps: float, max_frames: int):
    """HF's PyAV loader with SmolVLM's sampling: (frames, metadata), decoding every frame up to the last wanted."""
    sample = functools.partial(hf_sample_frames, fps=fps, max_frames=max_frames)
    return read_video_pyav(io.BytesIO(data), lambda metadata, **_: sample(metadata))


def every_frame(data: bytes) -> list:
    """All frames in decoder output order: how HF's loaders number frames."""
    with av.open(io.BytesIO(data)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def decode(data: bytes, fps: float, max_frames: int):
    with VideoDecoder(data) as decoder:
        indices = sample_frame_indices(decoder.metadata, fps, max_frames)
        frames = list(decoder.frames(indices))
        return decoder.metadata, indices, frames, decoder.frames_decoded


# ---------------------------------------------------------------------------------------------
# Frame sampling: SmolVLMVideoProcessor.sample_frames


@pytest.mark.parametrize(
    "total_frames, source_fps, fps, max_frames",
    [
        (60, 30.0, 1, 64),  # 2 s: a frame a second, no skipping
        (240, 24.0, 1, 64),  # 10 s
        (18000, 30.0, 1, 64),  # 10 min: max_frames binds, 1 s skipped at both ends
        (5400, 60.0, 1, 64),  # 60 fps source
        (120, 1.0, 1, 64),  # 1 fps source, long enough to skip: start/end move by one frame
        (500, 25.0, 1, 8),  # max_frames below the clip's seconds
        (3, 10.0, 1, 64),  # 0.3 s: rounds to zero frames, HF takes one
        (25, 5.0, 30, 64),  # target rate above the source's: duplicates removed
        (1798, 30000 / 1001, 1, 64),  # NTSC rate, 60 s
        (172652, 24000 / 1001, 1, 64),  # a 2-hour film
        (270, 30.0, 2, 16),  # fps 2, max_frames 16
        (1, 30.0, 1, 64),  # a single frame
    ],
)
def test_sample_frame_indices_match_hf(total_frames, source_fps, fps, max_frames):
    duration = total_frames / source_fps
    ours = sample_frame_indices(VideoMetadata(total_frames, source_fps, duration, 64, 48), fps, max_frames)
    theirs = hf_sample_frames(HFVideoMetadata(total_frames, fps=source_fps, duration=duration), fps, max_frames)
    assert ours.tolist() == theirs.tolist()
    hf_metadata = HFVideoMetadata(total_frames, fps=source_fps, frames_indices=theirs)
    assert frame_timestamps(ours, source_fps) == hf_metadata.timestamps


# ---------------------------------------------------------------------------------------------
# Decoding: the same metadata, indices and pixels as HF's PyAV loader, without decoding everything

VARIABLE_FRAME_TIMES = [0, 0.1, 0.15, 0.5, 0.52, 1.3, 2.0, 2.05, 2.1, 3.9, 4.0, 4.5, 6.2, 6.25, 8.0]


@pytest.mark.parametrize(
    "clip, fps, max_frames",
    [
        (dict(seconds=3, fps=10), 4, 64),  # H.264 with B-frames: decode order differs from presentation order
        (dict(seconds=12, fps=24, container="mov"), 1, 5),  # skips 1 s at both ends
        (dict(seconds=5, fps=Fraction(30000, 1001)), 2, 64),  # NTSC rate
        (dict(seconds=4, fps=10, container="avi", codec="mpeg4"), 3, 64),
        (dict(frame_times=VARIABLE_FRAME_TIMES), 2, 64),  # variable frame rate
    ],
    ids=["mp4", "mov-skip", "mp4-ntsc", "avi", "mp4-vfr"],
)
def test_decoded_frames_match_hf_pyav_loader(clip, fps, max_frames):
    data = synthetic_clip(**clip)
    metadata, indices, frames, _ = decode(data, fps, max_frames)
    hf_frames, hf_metadata = hf_read_video(data, fps, max_frames)

    assert (metadata.total_num_frames, metadata.fps, metadata.duration) == (
        hf_metadata.total_num_frames,
        hf_metadata.fps,
        hf_metadata.duration,
    )
    assert indices.tolist() == list(hf_metadata.frames_indices)
    assert frame_timestamps(indices, metadata.fps) == hf_metadata.timestamps
    assert len(frames) == len(hf_frames) > 1
    for ours, theirs in zip(frames, hf_frames):
        np.testing.assert_array_equal(ours, theirs)
    assert not np.array_equal(frames[0], frames[1])  # the clip's frames differ: a wrong frame would show


@pytest.mark.parametrize(
    "clip",
    [dict(container="webm", codec="libvpx-vp9"), dict(container="matroska"), dict(container="mpegts")],
    ids=["webm", "mkv", "mpegts"],
)
def test_frames_counted_where_the_header_has_no_count(clip):
    # these containers write no frame count: HF's PyAV loader would see 0 frames; the demux pass counts them
    data = synthetic_clip(seconds=4, fps=10, **clip)
    with av.open(io.BytesIO(data)) as container:
        assert container.streams.video[0].frames == 0
    metadata, indices, frames, _ = decode(data, fps=3, max_frames=64)
    reference = every_frame(data)

    assert metadata.total_num_frames == len(reference) == 40
    assert indices.tolist() == hf_sample_frames(HFVideoMetadata(40, fps=10.0, duration=4.0), 3, 64).tolist()
    for index, frame in zip(indices, frames, strict=True):
        np.testing.assert_array_equal(frame, reference[index])


def test_variable_frame_rate_frames_are_numbered_in_presentation_order():
    data = synthetic_clip(frame_times=VARIABLE_FRAME_TIMES, fps=5)
    reference = every_frame(data)
    with VideoDecoder(data) as decoder:
        indices = list(range(len(VARIABLE_FRAME_TIMES)))[::-3]
        frames = list(decoder.frames(sorted(indices)))
    for index, frame in zip(sorted(indices), frames, strict=True):
        np.testing.assert_array_equal(frame, reference[index])


def test_seeking_decodes_a_fraction_of_a_long_clip():
    keyframe_interval = 10
    data = synthetic_clip(seconds=60, fps=10, width=32, height=32, keyframe_interval=keyframe_interval)
    metadata, indices, frames, decoded = decode(data, fps=0.1, max_frames=64)
    reference = every_frame(data)

    assert metadata.total_num_frames == len(reference) == 600
    assert len(indices) == 6
    for index, frame in zip(indices, frames, strict=True):
        np.testing.assert_array_equal(frame, reference[index])
    # at most one group of pictures per wanted frame, plus the decoder's reordering delay
    assert decoded <= len(indices) * (keyframe_interval + 4) < len(reference) // 5


def test_streams_without_timestamps_are_decoded_in_order():
    data = synthetic_clip(seconds=2, fps=10, container="h264")  # a raw H.264 stream: no pts, cannot seek
    metadata, indices, frames, _ = decode(data, fps=4, max_frames=64)
    reference = every_frame(data)
    assert metadata.total_num_frames == len(reference) == 20
    assert len(indices) > 1
    for index, frame in zip(indices, frames, strict=True):
        np.testing.assert_array_equal(frame, reference[index])


# ---------------------------------------------------------------------------------------------
# Tiles


def test_resized_frame_size_matches_hf():
    class Frames:  # what get_resize_output_image_size reads: the last two dims of .size()
        def __init__(self, height, width):
            self.shape = (1, 3, height, width)

        def size(self):
            return self.shape

    sizes = [(720, 1280), (1280, 720), (1080, 1920), (480, 640), (333, 517), (517, 333), (384, 384)]
    sizes += [(1, 1), (1, 3000), (3000, 1), (241, 1999), (4321, 77), (2160, 3840), (97, 101)]
    for height, width in sizes:
        for longest_edge in (384, 512, 1456, 1536, 2048, 4096, 6000):
            expected = get_resize_output_image_size(Frames(height, width), resolution_max_side=longest_edge)
            assert resized_frame_size(height, width, longest_edge) == tuple(expected), (height, width, longest_edge)


def test_frame_to_tile_resizes_twice_with_torchs_lanczos():
    frame = np.array(synthetic_image(160, 90, seed=3))
    tile = frame_to_tile(frame, SMALL)

    pixels = torch.from_numpy(frame).permute(2, 0, 1)[None]
    step = F.interpolate(pixels, size=(54, 96), mode="lanczos", antialias=True)  # longest edge 96, height even
    expected = F.interpolate(step, size=(32, 32), mode="lanczos", antialias=True)[0].numpy()
    assert tile.dtype == np.uint8 and tile.shape == (3, 32, 32)
    np.testing.assert_array_equal(tile, expected)
    direct = F.interpolate(pixels, size=(32, 32), mode="lanczos", antialias=True)[0].numpy()
    assert not np.array_equal(tile, direct)  # the intermediate size matters
    # and within two levels of Pillow's LANCZOS, the image path's resize
    pil = Image.fromarray(frame).resize((96, 54), Image.LANCZOS).resize((32, 32), Image.LANCZOS)
    assert np.abs(tile.astype(int) - np.asarray(pil).transpose(2, 0, 1)).max() <= 2


def test_process_video_tiles_hf_frames():
    data = synthetic_clip(seconds=5, fps=8, width=80, height=60, seed=4)
    processed = process_video(data, SMALL)
    hf_frames, hf_metadata = hf_read_video(data, SMALL.fps, SMALL.max_frames)

    assert processed.tiles.dtype == np.uint8 and processed.tiles.shape == (5, 3, 32, 32)
    np.testing.assert_array_equal(processed.tiles, np.stack([frame_to_tile(frame, SMALL) for frame in hf_frames]))
    assert processed.frame_indices.tolist() == list(hf_metadata.frames_indices)
    assert processed.timestamps == hf_metadata.timestamps
    assert (processed.num_frames, processed.duration, processed.width, processed.height) == (5, 5.0, 80, 60)


# ---------------------------------------------------------------------------------------------
# Prompt: SmolVLMProcessor's expansion, tokenized


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer()


def hf_processor(image_seq_len: int):
    processor = object.__new__(SmolVLMProcessor)
    processor.image_seq_len = image_seq_len
    processor.image_token = "<image>"
    processor.fake_image_token = "<fake_token_around_image>"
    processor.global_image_token = "<global-img>"
    processor.video_token = "<video>"
    return processor


def hf_prompt_ids(tokenizer, prompt, frames_indices, fps, duration, image_seq_len):
    """HF's path: its video chat template, replace_video_token, its placeholder replacement, tokenized."""
    processor = hf_processor(image_seq_len)
    metadata = HFVideoMetadata(total_num_frames=0, fps=fps, duration=duration, frames_indices=frames_indices)
    inputs = {"pixel_values": np.zeros((1, len(frames_indices), 1)), "video_metadata": [metadata]}
    expansion = SmolVLMProcessor.replace_video_token(processor, inputs, video_idx=0)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": prompt}]}],
        chat_template=prompts.VIDEO_CHAT_TEMPLATE,
        tokenize=False,
        add_generation_prompt=True,
    )
    (expanded,), _ = SmolVLMProcessor.get_text_with_replacements(processor, [text], videos_replacements=[expansion])
    # apply_chat_template's rule: a rendered text that starts with the BOS token gets no special tokens added
    return tokenizer(expanded, add_special_tokens=not expanded.startswith(tokenizer.bos_token))["input_ids"]


def our_prompt_ids(tokenizer, prompt, frames_indices, fps, duration, image_seq_len):
    """The preprocessor's own path: its video prompt for a clip with these frames."""
    preprocessor = SmolVLMPreprocessor(tokenizer, CHAT_TEMPLATE, image_seq_len, ImageSettings(128, 32, True))
    clip = ProcessedVideo(np.zeros((len(frames_indices), 3, 1, 1), np.uint8), np.asarray(frames_indices),
                          frame_timestamps(frames_indices, fps), duration, 64, 48, fps)
    return preprocessor.video_prompt_ids(prompt, clip).tolist()


def clip_frames(total_frames, source_fps, fps=1, max_frames=64):
    duration = total_frames / source_fps
    metadata = VideoMetadata(total_frames, source_fps, duration, 64, 48)
    return sample_frame_indices(metadata, fps, max_frames), source_fps, duration


@pytest.mark.parametrize(
    "frames_indices, fps, duration, image_seq_len",
    [
        (np.array([0, 14, 29]), 10.0, 3.0, 4),  # "three frames", 0:00:03
        (*clip_frames(18000, 30.0), 64),  # 64 frames over 10 minutes: "sixty-four", MM:SS past a minute
        (*clip_frames(4500 * 24, 24.0, max_frames=21), 81),  # 75 minutes: 1:15:00, timestamps past 60 minutes
        (*clip_frames(7, 2.891566265060241), 9),  # a variable-frame-rate clip's average rate
    ],
    ids=["3-frames", "10-min", "75-min", "vfr"],
)
def test_prompt_ids_match_hf(tokenizer, frames_indices, fps, duration, image_seq_len):
    prompt = "Describe this video."
    ours = our_prompt_ids(tokenizer, prompt, frames_indices, fps, duration, image_seq_len)
    theirs = hf_prompt_ids(tokenizer, prompt, frames_indices, fps, duration, image_seq_len)
    assert ours == theirs
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert ours.count(image_id) == len(frames_indices) * image_seq_len


def test_prompt_of_a_processed_clip_matches_hf(tokenizer):
    processed = process_video(synthetic_clip(frame_times=VARIABLE_FRAME_TIMES, fps=2), SMALL)
    preprocessor = SmolVLMPreprocessor(tokenizer, CHAT_TEMPLATE, 4, ImageSettings(128, 32, True))
    ours = preprocessor.video_prompt_ids("What happens?", processed).tolist()
    theirs = hf_prompt_ids(tokenizer, "What happens?", processed.frame_indices, processed.fps, processed.duration, 4)
    assert ours == theirs


def test_video_prompt_text():
    expansion = video_prompt([0.0, 61.5, 3725.0], duration=3725.9, image_seq_len=2)
    frame = "<fake_token_around_image><global-img><image><image><fake_token_around_image>"
    assert expansion == (
        "You are provided the following series of three frames from a 1:02:05 [H:MM:SS] video.\n"
        f"\nFrame from 00:00:{frame}\nFrame from 01:01:{frame}\nFrame from 62:05:{frame}\n\n"
    )


def test_rendered_prompt_places_the_video_after_the_role(tokenizer):
    # whatever the checkpoint's template: HF substitutes its own SmolVLM2 template for a video
    text = render_user_turn(tokenizer, CHAT_TEMPLATE, "Caption it.", "video")
    assert text == "<|im_start|>User: <video>Caption it.<end_of_utterance>\nAssistant:"


def test_an_unsupported_resample_is_refused_when_the_settings_are_built():
    with pytest.raises(ValueError, match="resample"):
        VideoSettings(fps=1, max_frames=64, video_size=1536, tile_size=384, resample=Image.Resampling.BOX)


# ---------------------------------------------------------------------------------------------
# Telling videos from images, and clips that cannot be used


@pytest.mark.parametrize(
    "clip",
    [
        dict(container="mp4"),
        dict(container="mov"),
        dict(container="webm", codec="libvpx-vp9"),
        dict(container="matroska"),
        dict(container="avi", codec="mpeg4"),
        dict(container="mpegts"),
    ],
    ids=lambda clip: clip["container"],
)
def test_is_video_recognises_containers(clip):
    assert is_video(synthetic_clip(seconds=0.5, **clip))


def test_is_video_rejects_images():
    image = synthetic_image(32, 32, seed=0)
    for fmt in ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"):
        assert not is_video(encode(image, fmt)), fmt
    assert not is_video(b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00mif1miaf")  # an AVIF still image
    assert not is_video(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic")  # a HEIC photo
    assert not is_video(b"")


def audio_clip(container: str = "mp4", with_video_stream: bool = False) -> bytes:
    """Half a second of silence; ``with_video_stream`` adds a video stream that never gets a frame."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container) as output:
        if with_video_stream:
            stream = output.add_stream("libx264", rate=10)
            stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        audio = output.add_stream("aac", rate=16000)
        for i in range(8):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            for packet in audio.encode(frame):
                output.mux(packet)
        for packet in audio.encode():
            output.mux(packet)
    return buffer.getvalue()


def garbled_frames(clip: bytes) -> bytes:
    """The container intact, the coded frames overwritten (an mp4's mdat precedes its index)."""
    data = bytearray(clip)
    start = data.index(b"mdat") + 64
    data[start : start + 1500] = np.random.default_rng(0).integers(0, 256, 1500, dtype=np.uint8).tobytes()
    return bytes(data)


def test_unusable_clips_raise_one_line_reasons():
    clip = synthetic_clip(seconds=2, fps=10)
    cases = [
        (b"", "empty file"),
        (np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes(), "not a decodable video"),
        (clip[: len(clip) // 2], "not a decodable video"),  # truncated: the index at the end is gone
        (garbled_frames(clip), "corrupt video data"),
        (audio_clip(), r"no video stream \(audio only\)"),
        (audio_clip("matroska", with_video_stream=True), "video stream has no frames"),
    ]
    for data, reason in cases:
        with pytest.raises(VideoError, match=reason) as error:
            process_video(data, SMALL)
        assert "\n" not in str(error.value)


def test_over_long_clips_are_refused_from_the_header(monkeypatch):
    data = synthetic_clip(seconds=3, fps=10)
    settings = VideoSettings(fps=1, max_frames=64, video_size=96, tile_size=32, max_seconds=2)
    with pytest.raises(VideoError, match="video is 3 s long, over the limit of 2 s"):
        process_video(data, settings)
    # refused before the demux pass, let alone decoding
    monkeypatch.setattr(video, "_scan", lambda *args: pytest.fail("scanned an over-long clip"))
    with pytest.raises(VideoError, match="over the limit"):
        VideoDecoder(data, max_seconds=2)
