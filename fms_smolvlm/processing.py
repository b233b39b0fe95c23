"""SmolVLM's image processor and prompt expansion, exact and fast, from a checkpoint's own files.

Reproduces HF's ``Idefics3ImageProcessorPil`` / ``SmolVLMImageProcessorPil`` (transformers 5.x) and the
``<image>`` expansion of ``Idefics3Processor`` / ``SmolVLMProcessor``, but ships **uint8 tiles**: the
model normalises them on its device, so the CPU does no float work and moves 4x fewer bytes.

Per image (HF's rules, upscaling included):
  1. convert to RGB, compositing transparency onto white;
  2. resize (LANCZOS) so the longest edge is ``longest_edge`` (capped at 4096);
  3. split: resize up to multiples of the tile size ``M``; if larger than one tile, cut ``rows x cols``
     tiles row-major and append the whole image squashed to ``M x M`` as the global tile;
     no split: squash to ``M x M``.

Where we deliberately differ from HF (each is a case where HF's output is not what the picture shows):
  * EXIF orientation is applied first. HF ignores it, so a portrait phone photo reaches the model
    lying on its side; the reported width/height are those of the upright image.
  * 16-bit grayscale (``I;16``, ``I``) is scaled to 8 bits; PIL's conversion (used by HF) clips every
    value above 255 to white.
Animated images use their first frame. Problems with one image (not an image, truncated, too many
pixels) raise :class:`ImageError` with a one-line reason; :meth:`SmolVLMPreprocessor.process` turns
that into an error result instead of failing the batch.
"""

import io
import json
import math
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from fms_smolvlm import resample
from fms_smolvlm.checkpoint import ProcessorConfigError, VideoSampling, read_processor_config
from fms_smolvlm.errors import one_line
from fms_smolvlm.sizes import longest_edge_size, tile_grid_size
from fms_smolvlm.prompts import IMAGE_TOKEN, VIDEO_TOKEN, image_prompt, render_user_turn, video_prompt
from fms_smolvlm.video import (
    DEFAULT_MAX_SECONDS,
    ProcessedVideo,
    VideoError,
    VideoSettings,
    is_video,
    process_video,
    video_resize_kernel,
)

ImageInput = Union[bytes, bytearray, memoryview, Image.Image]

# HF's Idefics3/SmolVLM image processor class defaults, for a processor config that omits them
HF_DEFAULT_SIZE = {"longest_edge": 4 * 364}
HF_DEFAULT_TILE = {"longest_edge": 364}
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000
EXIF_ORIENTATION = 0x0112



class ImageError(ValueError):
    """This image cannot be captioned; the message is a one-line reason."""


@dataclass(frozen=True)
class ImageSettings:
    """How images become tiles. ``longest_edge`` and ``splitting`` set the image-token budget."""

    longest_edge: int
    tile_size: int
    splitting: bool
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    resample: int = Image.Resampling.LANCZOS
    # the normalisation the model applies on its device to these uint8 tiles
    image_mean: tuple = (0.5, 0.5, 0.5)
    image_std: tuple = (0.5, 0.5, 0.5)


@dataclass
class ProcessedImage:
    tiles: np.ndarray  # uint8 (tiles, 3, M, M): row-major crops, then the global tile
    rows: int  # 0 when unsplit
    cols: int
    width: int  # of the (upright) decoded image
    height: int


@dataclass
class ProcessedSample:
    """Model-ready input for one image (or video) and its prompts, or the reason it has none."""

    prompt_ids: tuple  # int64 (seq,) per prompt, with the image (or video) expanded to its tiles' tokens
    # uint8 (tiles, 3, M, M), once for all prompts; or the image and its tile plan, for the replica to tile
    tiles: Union[np.ndarray, "SourceImage", None]
    width: Optional[int] = None
    height: Optional[int] = None
    error: Optional[str] = None
    num_frames: Optional[int] = None  # a video's sampled frames (one tile each); None for an image

    @property
    def input_ids(self) -> np.ndarray:
        """The (first) prompt's ids."""
        return self.prompt_ids[0]

    @property
    def num_tiles(self) -> int:
        return 0 if self.tiles is None else len(self.tiles)


# ---------------------------------------------------------------------------------------------
# Decoding


def decode_image(data: ImageInput, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Encoded bytes or a PIL image -> an upright RGB PIL image. Raises :class:`ImageError`."""
    if isinstance(data, Image.Image):
        image = data
    else:
        image = _open(bytes(data), max_pixels)
    _check_pixels(image.size, max_pixels)
    try:
        image.seek(0)  # animated: first frame
        if image.getexif().get(EXIF_ORIENTATION, 1) != 1:
            image = ImageOps.exif_transpose(image)
        return to_rgb(image)
    except (OSError, SyntaxError, ValueError) as error:  # PIL reports truncated/corrupt data this way
        raise ImageError(f"corrupt image data: {one_line(error)}") from None


def _open(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise ImageError("empty file")
    try:
        with warnings.catch_warnings():
            # our own max_pixels replaces PIL's decompression-bomb warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError("not an image (unrecognised file format)") from None
    except Image.DecompressionBombError as error:
        raise ImageError(f"too many pixels ({one_line(error)})") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageError(f"corrupt image data: {one_line(error)}") from None
    _check_pixels(image.size, max_pixels)
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageError(f"corrupt or truncated image data: {one_line(error)}") from None
    return image


def _check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width * height > max_pixels:
        raise ImageError(f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}")
    if width < 1 or height < 1:
        raise ImageError(f"image has no pixels ({width}x{height})")


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with transparency composited onto white (HF's rule), 16-bit grayscale scaled to 8 bits."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = Image.fromarray((np.asarray(image).astype(np.uint32) >> 8).clip(0, 255).astype(np.uint8), "L")
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


# ---------------------------------------------------------------------------------------------
# Tiling


@dataclass(frozen=True)
class TilePlan:
    """How an upright image of size ``source`` becomes tiles, in HF's order of resizes: to ``resized`` (the longest
    edge), then to ``grid`` (whole tiles; the tile itself when unsplit or small), cut row-major into ``rows x cols``
    tiles, then the grid squashed to one more, the global tile. Sizes are ``(width, height)``, as PIL takes them.
    The CPU stage computes it; whoever resizes (the CPU with PIL, or a replica on its device) follows it."""

    source: tuple[int, int]
    resized: tuple[int, int]
    grid: tuple[int, int]
    tile: int

    @property
    def split(self) -> bool:
        return self.grid != (self.tile, self.tile)

    @property
    def rows(self) -> int:
        return self.grid[1] // self.tile if self.split else 0  # 0 x 0: the grid is the one tile

    @property
    def cols(self) -> int:
        return self.grid[0] // self.tile if self.split else 0

    @property
    def num_tiles(self) -> int:
        return self.rows * self.cols + 1


def plan_tiles(width: int, height: int, settings: ImageSettings) -> TilePlan:
    """The resizes HF's image processor applies to an upright ``width x height`` image."""
    tile = settings.tile_size
    resized_h, resized_w = longest_edge_size(height, width, settings.longest_edge)
    grid_h, grid_w = tile_grid_size(resized_h, resized_w, tile) if settings.splitting else (tile, tile)
    return TilePlan((width, height), (resized_w, resized_h), (grid_w, grid_h), tile)


def tile_image(image: Image.Image, settings: ImageSettings) -> ProcessedImage:
    """An upright RGB image -> uint8 tiles exactly as HF's PIL image processor cuts them."""
    plan = plan_tiles(*image.size, settings)
    grid = image.resize(plan.resized, resample=settings.resample).resize(plan.grid, resample=settings.resample)
    if not plan.split:
        return ProcessedImage(_chw(grid)[None], 0, 0, *plan.source)
    global_tile = _chw(grid.resize((plan.tile, plan.tile), resample=settings.resample))
    tiles = np.concatenate([_crops(np.asarray(grid), plan), global_tile[None]])
    return ProcessedImage(tiles, plan.rows, plan.cols, *plan.source)


def _crops(grid: np.ndarray, plan: TilePlan) -> np.ndarray:
    """(H, W, 3) grid -> (rows * cols, 3, M, M) tiles, row-major."""
    m = plan.tile
    return grid.reshape(plan.rows, m, plan.cols, m, 3).transpose(0, 2, 4, 1, 3).reshape(plan.rows * plan.cols, 3, m, m)


def _chw(image: Image.Image) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1))


@dataclass(frozen=True)
class SourceImage:
    """A decoded upright RGB image and its :class:`TilePlan`: what the CPU stage ships instead of tiles when it is
    fewer bytes (a replica resizes and tiles it on its device, :func:`tiles_from_sources`, with the same bytes)."""

    pixels: Union[np.ndarray, "torch.Tensor"]  # uint8 (H, W, 3)
    plan: TilePlan

    def __len__(self) -> int:
        """The tiles it becomes (what the engine counts against its vision budget)."""
        return self.plan.num_tiles

    @property
    def nbytes(self) -> int:
        return self.pixels.nbytes


def tiles_nbytes(plan: TilePlan) -> int:
    return plan.num_tiles * 3 * plan.tile * plan.tile


def image_tiles(image: Image.Image, settings: ImageSettings, resize_on: str) -> tuple[Union[np.ndarray, SourceImage], TilePlan]:
    """An upright RGB image's uint8 tiles, or (``resize_on="replica"``) the image itself and its plan when that is
    fewer bytes than its tiles (an image smaller than its tiles: most web images, which the processor upscales)."""
    plan = plan_tiles(*image.size, settings)
    if resize_on == "replica" and image.width * image.height * 3 < tiles_nbytes(plan):
        return SourceImage(np.asarray(image), plan), plan
    return tile_image(image, settings).tiles, plan


def tiles_from_sources(sources: Sequence[SourceImage], device: torch.device) -> list[torch.Tensor]:
    """Each source image's uint8 tiles ``(tiles, 3, M, M)`` on ``device``, byte for byte :func:`tile_image`'s:
    Pillow's LANCZOS replayed in integer torch ops (:mod:`fms_smolvlm.resample`). Images of one source size and
    plan are resized as one batch."""
    tiles: list = [None] * len(sources)
    groups: dict = {}
    for index, source in enumerate(sources):
        groups.setdefault(source.plan, []).append(index)
    for plan, indices in groups.items():
        pixels = _stacked([sources[i].pixels for i in indices]).to(device)
        for index, image_tiles in zip(indices, _tile_batch(pixels, plan)):
            tiles[index] = image_tiles
    return tiles


def _stacked(pixels: list) -> torch.Tensor:
    if all(isinstance(p, np.ndarray) for p in pixels):
        return torch.from_numpy(np.stack(pixels))  # a fresh array: the job's pixels are read-only Arrow buffers
    return torch.stack([torch.as_tensor(p) for p in pixels])


def _tile_batch(pixels: torch.Tensor, plan: TilePlan) -> torch.Tensor:
    """(B, H, W, 3) uint8 images of one plan -> (B, tiles, 3, M, M)."""
    grid = resample.resize(resample.resize(pixels, plan.resized), plan.grid)
    if not plan.split:
        return grid.permute(0, 3, 1, 2)[:, None].contiguous()
    m, batch = plan.tile, grid.shape[0]
    crops = grid.view(batch, plan.rows, m, plan.cols, m, 3).permute(0, 1, 3, 5, 2, 4)
    global_tile = resample.resize(grid, (m, m)).permute(0, 3, 1, 2)[:, None]
    return torch.cat([crops.reshape(batch, plan.rows * plan.cols, 3, m, m), global_tile], dim=1)


class SmolVLMPreprocessor:
    """Image or video + prompts -> model input, configured from a checkpoint directory's processor files."""

    def __init__(
        self,
        tokenizer,
        chat_template: str,
        image_seq_len: int,
        settings: ImageSettings,
        video: Optional[VideoSettings] = None,
        resize_on: str = "cpu",
    ):
        """``video``: how clips become tiles; None for a checkpoint without a video processor (videos are errors).
        ``resize_on``: see :meth:`from_pretrained`."""
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.image_seq_len = image_seq_len
        self.settings = settings
        self.video = video
        self.resize_on = _check_resize_on(resize_on, settings)
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if tokenizer("a")["input_ids"] != tokenizer("a", add_special_tokens=False)["input_ids"]:
            # prompts are tokenized in pieces (the image part once): that needs a tokenizer that adds nothing
            raise ProcessorConfigError("the tokenizer adds special tokens around a text; SmolVLM's add none")
        self._tokens = lru_cache(maxsize=1024)(self._tokenize)

    @classmethod
    def from_pretrained(
        cls,
        model_dir,
        image_longest_edge: Optional[int] = None,
        image_splitting: Optional[bool] = None,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        video_fps: Optional[float] = None,
        video_max_frames: Optional[int] = None,
        max_video_seconds: float = DEFAULT_MAX_SECONDS,
        resize_on: str = "auto",
    ) -> "SmolVLMPreprocessor":
        """``image_longest_edge`` / ``image_splitting`` / ``video_fps`` / ``video_max_frames``: None keeps the
        checkpoint's processor config (in any of the layouts :mod:`fms_smolvlm.checkpoint` reads).

        ``resize_on``: ``"cpu"`` resizes and tiles every image here (uint8 tiles out); ``"replica"`` ships an image
        as decoded pixels plus its :class:`TilePlan` (a :class:`SourceImage`) whenever that is fewer bytes than its
        tiles, for the model's device to resize and tile (same bytes either way); large photos and video frames
        are still tiled here. ``"auto"``: ``"cpu"``, as the preprocessor alone knows no replica (``Captioner`` and
        the job choose by their device)."""
        from transformers import AutoTokenizer

        model_dir = Path(model_dir)
        config = read_processor_config(model_dir)
        image = config.image
        _check_normalisation(image, model_dir)
        settings = ImageSettings(
            longest_edge=image_longest_edge or image.get("size", HF_DEFAULT_SIZE)["longest_edge"],
            tile_size=image.get("max_image_size", HF_DEFAULT_TILE)["longest_edge"],
            splitting=image.get("do_image_splitting", True) if image_splitting is None else image_splitting,
            max_pixels=max_image_pixels,
            resample=image.get("resample", Image.Resampling.LANCZOS),
            image_mean=tuple(image.get("image_mean", (0.5,) * 3)),
            image_std=tuple(image.get("image_std", (0.5,) * 3)),
        )
        if settings.longest_edge < 1:
            raise ValueError(f"image_longest_edge must be positive, got {settings.longest_edge}")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        chat_template = config.chat_template or tokenizer.chat_template
        if not chat_template:
            raise ProcessorConfigError(f"{model_dir} has no chat template (chat_template.jinja or chat_template.json)")
        image_seq_len = config.image_seq_len or _image_seq_len_from_config(model_dir)
        video = None
        if config.video is not None:
            video = _video_settings(config.video, video_fps, video_max_frames, max_video_seconds, model_dir)
        return cls(tokenizer, chat_template, image_seq_len, settings, video, resize_on)

    def fingerprint(self) -> dict:
        """The settings that change what the model sees (for a job's identity)."""
        fingerprint = {
            "image_longest_edge": self.settings.longest_edge,
            "image_tile_size": self.settings.tile_size,
            "image_splitting": self.settings.splitting,
            "image_seq_len": self.image_seq_len,
            "max_image_pixels": self.settings.max_pixels,
            "exif_orientation": True,
        }
        if self.video is not None:
            fingerprint.update(
                video_fps=self.video.fps,
                video_max_frames=self.video.max_frames,
                video_size=self.video.video_size,
                video_tile_size=self.video.tile_size,
                video_resize=video_resize_kernel(self.video),
                max_video_seconds=self.video.max_seconds,
            )
        return fingerprint

    def render_prompt(self, prompt: str, media: Optional[str] = "image") -> str:
        """The chat template's user turn (``media``, then the text; None: text only) and the generation prompt."""
        return render_user_turn(self.tokenizer, self.chat_template, prompt, media)

    def prompt_ids(self, prompt: str, rows: Optional[int] = None, cols: Optional[int] = None) -> np.ndarray:
        """Token ids of the rendered prompt with the image expanded for a ``rows x cols`` split (``0 x 0``:
        unsplit); ``rows=None``: a text-only prompt. The part up to the end of the image is tokenized once per
        grid, the rest once per prompt: it follows a special token, so the pieces tokenize as the whole does."""
        if rows is None:
            return self._tokens(self.render_prompt(prompt, media=None))
        text = self.render_prompt(prompt)
        split = text.index(IMAGE_TOKEN)
        head = text[:split] + image_prompt(rows, cols, self.image_seq_len)
        return np.concatenate([self._tokens(head), self._tokens(text[split + len(IMAGE_TOKEN) :])])

    def video_prompt_ids(self, prompt: str, video: ProcessedVideo) -> np.ndarray:
        text = self.render_prompt(prompt, media="video")
        expansion = video_prompt(video.timestamps, video.duration, self.image_seq_len)
        return self._tokenize(text.replace(VIDEO_TOKEN, expansion))

    def _tokenize(self, text: str) -> np.ndarray:
        ids = np.asarray(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
        ids.flags.writeable = False  # shared by the cache
        return ids

    def process_image(self, image: ImageInput) -> ProcessedImage:
        """Raises :class:`ImageError` for an image that cannot be used."""
        return tile_image(decode_image(image, self.settings.max_pixels), self.settings)

    def process(self, media: Optional[ImageInput], prompts: Sequence[str]) -> ProcessedSample:
        """One sample (an image, an encoded video, or None for text only) for each of ``prompts``: the tiles once,
        the token ids per prompt. A bad image or video gives ``error`` set and no ids, never an exception."""
        try:
            if media is None:
                return ProcessedSample(tuple(self.prompt_ids(prompt) for prompt in prompts), None)
            if isinstance(media, (bytes, bytearray, memoryview)) and is_video(media):
                return self._process_video(bytes(media), prompts)
            tiles, plan = image_tiles(decode_image(media, self.settings.max_pixels), self.settings, self.resize_on)
        except (ImageError, VideoError) as error:
            return ProcessedSample((), None, error=str(error))
        except Exception as error:  # PIL and FFmpeg fail in more ways than they document: still this sample's only
            return ProcessedSample((), None, error=f"cannot process {_media_kind(media)}: {one_line(error)}")
        ids = tuple(self.prompt_ids(prompt, plan.rows, plan.cols) for prompt in prompts)
        return ProcessedSample(ids, tiles, *plan.source)

    def _process_video(self, data: bytes, prompts: Sequence[str]) -> ProcessedSample:
        if self.video is None:
            raise VideoError("a video, but the checkpoint has no video processor (a SmolVLM2 checkpoint has one)")
        video = process_video(data, self.video)
        ids = tuple(self.video_prompt_ids(prompt, video) for prompt in prompts)
        return ProcessedSample(ids, video.tiles, video.width, video.height, num_frames=video.num_frames)


def _video_settings(sampling: VideoSampling, fps, max_frames, max_seconds: float, model_dir: Path) -> VideoSettings:
    """The checkpoint's video sampling with the caller's overrides."""
    fps = fps if fps is not None else sampling.fps
    max_frames = max_frames if max_frames is not None else sampling.max_frames
    if fps is None or max_frames is None:
        raise ProcessorConfigError(f"{model_dir}: the video processor states no fps / max_frames to sample clips with")
    return VideoSettings(fps, max_frames, sampling.longest_edge, sampling.tile_size, max_seconds, sampling.resample)


RESIZE_ON = ("auto", "cpu", "replica")


def _check_resize_on(resize_on: str, settings: ImageSettings) -> str:
    """``"auto"`` -> ``"cpu"``; ``"replica"`` needs the LANCZOS filter, the one :mod:`fms_smolvlm.resample` replays."""
    if resize_on not in RESIZE_ON:
        raise ValueError(f"resize_on must be one of {', '.join(RESIZE_ON)}, got {resize_on!r}")
    if resize_on == "replica" and settings.resample != Image.Resampling.LANCZOS:
        raise ProcessorConfigError(
            f"resize_on='replica' replays Pillow's LANCZOS resize; this processor resizes with filter {settings.resample}"
        )
    return "cpu" if resize_on == "auto" else resize_on


def _media_kind(media) -> str:
    return "video" if isinstance(media, (bytes, bytearray, memoryview)) and is_video(media) else "image"


def _check_normalisation(image_config: dict, model_dir: Path) -> None:
    # the model normalises uint8 as (x / 255 - mean) / std; other processor settings would change inputs
    rescale = image_config.get("rescale_factor", 1 / 255)
    if not image_config.get("do_rescale", True) or not image_config.get("do_normalize", True) or not math.isclose(
        rescale, 1 / 255
    ):
        raise ProcessorConfigError(
            f"{model_dir}: only image processors with do_rescale=true, rescale_factor=1/255, do_normalize=true "
            "are supported"
        )


def _image_seq_len_from_config(model_dir: Path) -> int:
    config = json.loads((model_dir / "config.json").read_text())
    vision = config["vision_config"]
    return (vision["image_size"] // vision["patch_size"]) ** 2 // config.get("scale_factor", 2) ** 2
