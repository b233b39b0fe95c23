"""A SmolVLM checkpoint directory: finding it, checking it, and reading its processor settings in any layout.

The layouts people have, all read here:

* **hub** (SmolVLM v1 repos): ``preprocessor_config.json`` (the image processor), ``processor_config.json``
  (``image_seq_len``), ``chat_template.json``;
* **SmolVLM2 hub**: the same, plus the video sampling in ``preprocessor_config.json``'s ``video_sampling`` block;
* **transformers 5.x** ``save_pretrained`` (every fine-tuned checkpoint saved today): ``processor_config.json``
  holds ``image_processor`` (and ``video_processor``) blocks beside ``image_seq_len``; the chat template is
  ``chat_template.jinja``; there is no ``preprocessor_config.json``. (4.5x wrote ``video_preprocessor_config.json``.)

Each setting is read from wherever the layout keeps it. A setting kept in two places that disagree is refused
with an error naming both places: which one HF would use depends on the loading path, so neither is safe.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from fms_smolvlm.hf_config import HF_ARCHITECTURES

PREPROCESSOR_CONFIG = "preprocessor_config.json"
PROCESSOR_CONFIG = "processor_config.json"
VIDEO_PREPROCESSOR_CONFIG = "video_preprocessor_config.json"
# the image processor settings that decide the tiles (others, like do_pad, cannot change them)
IMAGE_KEYS = (
    "size",
    "max_image_size",
    "do_image_splitting",
    "resample",
    "do_resize",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "image_mean",
    "image_std",
)
NORMALISATION_KEYS = ("do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std")
_CONFIG_FILES = ["*.json", "*.jinja", "tokenizer*"]


class ProcessorConfigError(ValueError):
    """The checkpoint's processor files are missing a setting, or two of them disagree."""


@dataclass(frozen=True)
class VideoSampling:
    """How SmolVLM2's video processor turns a clip into tiles: ``fps`` and ``max_frames`` pick the frames, each is
    resized to ``longest_edge`` and then squashed to one ``tile_size`` square tile."""

    fps: Optional[float]
    max_frames: Optional[int]
    longest_edge: int
    tile_size: int
    resample: int = 1  # PIL's LANCZOS, the hub configs' value


@dataclass(frozen=True)
class ProcessorConfig:
    image: dict  # the image processor's settings (IMAGE_KEYS that the checkpoint states)
    image_seq_len: Optional[int]  # None: not stated; it follows from the model config
    chat_template: Optional[str]  # None: not in the processor files (the tokenizer's may apply)
    video: Optional[VideoSampling]  # None: a checkpoint without a video processor


# ---------------------------------------------------------------------------------------------
# Finding and checking the directory


def resolve_checkpoint(model_dir_or_id, weights: bool = True, revision: Optional[str] = None) -> Path:
    """A local checkpoint directory, or a hub model id (at ``revision``) fetched into (or found in) the HF cache
    (``weights=False``: only its config, processor and tokenizer files)."""
    path = Path(model_dir_or_id).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(model_dir_or_id).startswith((".", "/", "~")):
        raise FileNotFoundError(f"{model_dir_or_id}: not a checkpoint directory")
    from huggingface_hub import snapshot_download

    try:
        patterns = _CONFIG_FILES + (["*.safetensors"] if weights else [])
        return Path(snapshot_download(str(model_dir_or_id), revision=revision, allow_patterns=patterns))
    except Exception as error:  # offline, unknown id, no access: one line naming the model
        raise FileNotFoundError(f"{model_dir_or_id}: cannot fetch from the Hugging Face hub ({error})") from None


def check_checkpoint_dir(path: Path, weights: bool = True) -> dict:
    """The checkpoint's config, after checking it is a SmolVLM checkpoint (with safetensors weights)."""
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{path}: no config.json, not a Hugging Face checkpoint directory")
    config = json.loads(config_file.read_text())
    architectures = config.get("architectures") or []
    if not architectures or architectures[0] not in HF_ARCHITECTURES:
        raise ValueError(
            f"{path}: architecture {architectures[:1] or 'unknown'} is not SmolVLM "
            f"(expected one of {', '.join(HF_ARCHITECTURES)})"
        )
    if weights and not any(path.glob("*.safetensors")):
        raise FileNotFoundError(f"{path}: no *.safetensors weights (only safetensors checkpoints are supported)")
    return config


def stop_token_ids(path: Path, tokenizer) -> list[int]:
    """``<end_of_utterance>`` plus any eos ids of ``generation_config.json``."""
    ids = {tokenizer.convert_tokens_to_ids("<end_of_utterance>")}
    generation_config = path / "generation_config.json"
    if generation_config.exists():
        eos = json.loads(generation_config.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    return sorted(i for i in ids if i is not None)


# ---------------------------------------------------------------------------------------------
# Processor settings, from any layout


def read_processor_config(model_dir) -> ProcessorConfig:
    model_dir = Path(model_dir)
    preprocessor = _read_json(model_dir / PREPROCESSOR_CONFIG)
    processor = _read_json(model_dir / PROCESSOR_CONFIG)
    image_sources = {
        PREPROCESSOR_CONFIG: preprocessor,
        f"{PROCESSOR_CONFIG} (image_processor)": processor.get("image_processor"),
    }
    image = _agreed_settings(model_dir, image_sources, IMAGE_KEYS)
    if not image:
        raise ProcessorConfigError(
            f"{model_dir}: no image processor settings (neither {PREPROCESSOR_CONFIG} nor an image_processor block "
            f"in {PROCESSOR_CONFIG}): not a SmolVLM checkpoint directory"
        )
    video_sources = {
        f"{PREPROCESSOR_CONFIG} (video_sampling)": preprocessor if "video_sampling" in preprocessor else None,
        f"{PROCESSOR_CONFIG} (video_processor)": processor.get("video_processor"),
        VIDEO_PREPROCESSOR_CONFIG: _read_json(model_dir / VIDEO_PREPROCESSOR_CONFIG) or None,
    }
    videos = {where: video_sampling(settings) for where, settings in video_sources.items() if settings is not None}
    # the model normalises every tile, image or frame, one way: the video processor must agree with the image one
    _agreed_settings(model_dir, {**image_sources, **video_sources}, NORMALISATION_KEYS)
    return ProcessorConfig(
        image=image,
        image_seq_len=processor.get("image_seq_len"),
        chat_template=_agreed_chat_template(model_dir, processor),
        video=_one_value(model_dir, videos, "video sampling"),
    )


def video_sampling(settings: dict) -> VideoSampling:
    """A video processor's init settings as HF's ``SmolVLMVideoProcessor`` reads them: its ``video_sampling`` block
    (``fps``, ``max_frames``, ``video_size``) overrides ``fps`` / ``num_frames`` / ``size``, and, as HF does for
    backward compatibility, a ``size`` stated beside ``video_sampling`` replaces its ``video_size``."""
    sampling = settings.get("video_sampling") or {}
    size = settings.get("size") or sampling.get("video_size")
    if size is None or "longest_edge" not in size:
        raise ProcessorConfigError(f"the video processor settings have no size.longest_edge: {settings}")
    return VideoSampling(
        fps=sampling.get("fps", settings.get("fps")),
        max_frames=sampling.get("max_frames", settings.get("num_frames")),
        longest_edge=size["longest_edge"],
        tile_size=settings.get("max_image_size", {}).get("longest_edge", 364),  # HF's class default
        resample=settings.get("resample", 1),
    )


def _agreed_settings(model_dir: Path, sources: dict, keys: tuple) -> dict:
    """The union of ``keys`` over the sources that exist; a key that two sources state differently is an error."""
    merged: dict = {}
    stated_in: dict = {}
    for where, settings in sources.items():
        for key in keys:
            if not settings or key not in settings:
                continue
            if key not in merged:
                merged[key], stated_in[key] = settings[key], where
            elif merged[key] != settings[key]:
                raise ProcessorConfigError(
                    f"{model_dir}: {key} is {merged[key]!r} in {stated_in[key]} but {settings[key]!r} in {where}"
                )
    return merged


def _one_value(model_dir: Path, values: dict[str, Any], what: str) -> Any:
    """The value every source states (None when none does); two that differ are an error naming both."""
    stated = list(values.items())
    for where, value in stated[1:]:
        if value != stated[0][1]:
            raise ProcessorConfigError(f"{model_dir}: the {what} is {stated[0][1]} in {stated[0][0]} but {value} in {where}")
    return stated[0][1] if stated else None


def _agreed_chat_template(model_dir: Path, processor: dict) -> Optional[str]:
    templates = {}
    if (model_dir / "chat_template.jinja").exists():
        templates["chat_template.jinja"] = (model_dir / "chat_template.jinja").read_text()
    if (model_dir / "chat_template.json").exists():
        templates["chat_template.json"] = json.loads((model_dir / "chat_template.json").read_text())["chat_template"]
    if "chat_template" in processor:
        templates[PROCESSOR_CONFIG] = processor["chat_template"]
    if len(set(templates.values())) > 1:
        raise ProcessorConfigError(f"{model_dir}: the chat templates in {' and '.join(templates)} differ")
    return next(iter(templates.values()), None)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}
