"""The job's configuration: built once from the command line, checked, and handed to the stages as typed settings.

Prompts: one unnamed prompt (``--prompt TEXT``, or the default) gives the output columns ``caption``,
``finish_reason`` and ``num_generated_tokens``; named prompts (``--prompt NAME=TEXT`` repeated, or ``--prompts FILE``)
give, per NAME, the columns ``NAME``, ``NAME_finish_reason`` and ``NAME_num_generated_tokens``.
"""

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Optional

from fms_smolvlm.captioner import DEFAULT_PROMPT
from fms_smolvlm.errors import one_line

DEFAULT_MAX_NEW_TOKENS = 64
NAME_PATTERN = re.compile(r"[a-z0-9_]+")
NAMED_VALUE = re.compile(r"([a-z0-9_]+)=(.*)", re.DOTALL)
# columns every row has, whatever the prompts (a prompt may not be named like one)
SHARED_COLUMNS = ("key", "shard_id", "error", "width", "height", "num_image_tokens", "num_frames")


class ConfigError(ValueError):
    """A flag or a prompts file that cannot work; the message is one line naming it."""


@dataclass(frozen=True)
class Prompt:
    name: Optional[str]  # None: the one unnamed prompt
    text: str
    max_new_tokens: int

    @property
    def columns(self) -> tuple[str, str, str]:
        """Its output columns: the generated text, the finish reason, the number of generated tokens."""
        if self.name is None:
            return "caption", "finish_reason", "num_generated_tokens"
        return self.name, f"{self.name}_finish_reason", f"{self.name}_num_generated_tokens"


def parse_prompts(prompt_args: Optional[list], prompts_file: Optional[str], max_new_tokens_args: Optional[list]) -> tuple:
    """``--prompt`` (repeatable: ``TEXT``, or ``NAME=TEXT``), ``--prompts FILE`` (a JSON or YAML mapping of name to
    text) and ``--max-new-tokens`` (repeatable: ``N`` for every prompt, or ``NAME=N``) -> the job's prompts."""
    if prompt_args and prompts_file:
        raise ConfigError("give prompts with --prompt or with --prompts FILE, not both")
    texts = _prompts_from_file(prompts_file) if prompts_file else _prompts_from_flags(prompt_args or [DEFAULT_PROMPT])
    limits = _limits(max_new_tokens_args or [], names=[name for name in texts if name is not None])
    _check_names([name for name in texts if name is not None])
    return tuple(Prompt(name, text, limits.get(name, limits[None])) for name, text in texts.items())


def _prompts_from_flags(values: list) -> dict:
    texts = {}
    for value in values:
        named = NAMED_VALUE.fullmatch(value)
        name, text = (named.group(1), named.group(2)) if named else (None, value)
        if name in texts:
            raise ConfigError(
                f"--prompt {name}=... given twice" if name else "--prompt: only one unnamed prompt; name them (NAME=TEXT)"
            )
        texts[name] = text
    if None in texts and len(texts) > 1:
        raise ConfigError("--prompt: name every prompt (NAME=TEXT) when there are several")
    return texts


def _prompts_from_file(path: str) -> dict:
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise ConfigError(f"--prompts {path}: cannot read it ({error.strerror or error})") from None
    try:
        mapping = json.loads(text) if path.endswith(".json") else _yaml(text)
    except ValueError as error:
        raise ConfigError(f"--prompts {path}: not valid {'JSON' if path.endswith('.json') else 'YAML'} ({error})") from None
    if not isinstance(mapping, dict) or not mapping or not all(isinstance(v, str) for v in mapping.values()):
        raise ConfigError(f"--prompts {path}: must be a mapping of prompt name to prompt text")
    return {str(name): text for name, text in mapping.items()}


def _yaml(text: str):
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ValueError(one_line(error)) from None


def _limits(values: list, names: list) -> dict:
    """``{None: limit for every prompt, name: its own}``."""
    limits = {None: DEFAULT_MAX_NEW_TOKENS}
    for value in values:
        named = NAMED_VALUE.fullmatch(value)
        name, number = (named.group(1), named.group(2)) if named else (None, value)
        if name is not None and name not in names:
            raise ConfigError(f"--max-new-tokens {value}: no prompt is named {name!r} (prompts: {', '.join(names) or 'one unnamed'})")
        if not number.isdigit() or int(number) < 1:
            raise ConfigError(f"--max-new-tokens {value}: must be a positive integer (or NAME=N)")
        limits[name] = int(number)
    return limits


def _check_names(names: list) -> None:
    for name in names:
        if not NAME_PATTERN.fullmatch(name):
            raise ConfigError(f"prompt name {name!r}: use lowercase letters, digits and _")
        if name in SHARED_COLUMNS:
            raise ConfigError(f"prompt name {name!r} is a column every row has already; choose another")
        for column in Prompt(name, "", 1).columns[1:]:
            if column in names:
                raise ConfigError(f"prompt names {name!r} and {column!r} clash: {name!r} has a column {column!r}")


@dataclass(frozen=True)
class JobConfig:
    """Everything the command line decides, checked."""

    input: str
    output: str
    model: str
    prompts: tuple
    batch_size: Optional[int] = None  # None: 32 on GPUs, 8 on CPUs
    replicas: Optional[int] = None  # None: one per GPU, or 1 on CPUs
    device: str = "auto"
    dtype: str = "auto"
    compile: Optional[bool] = None  # None: on for GPUs
    resize_on: str = "auto"  # where images are resized and tiled: auto (the replicas' device, if CUDA), cpu, replica
    image_longest_edge: Optional[int] = None
    image_splitting: Optional[bool] = None
    max_image_pixels: int = 100_000_000
    video_fps: Optional[float] = None
    video_max_frames: Optional[int] = None
    max_video_seconds: float = 3 * 3600.0
    image_column: Optional[str] = None
    key_column: Optional[str] = None
    limit_shards: Optional[int] = None
    storage_options: dict = field(default_factory=dict)
    overwrite: bool = False
    dry_run: bool = False
    wait_for_lease: float = 0.0
    lease_ttl: float = 180.0
    stall_timeout: float = 1800.0
    store_retry_seconds: float = 300.0  # how long one call to the store is retried (not part of the job's identity)

    @classmethod
    def from_args(cls, args) -> "JobConfig":
        values = {name: getattr(args, name) for name in cls.__dataclass_fields__ if name != "prompts"}
        prompts = parse_prompts(args.prompt, args.prompts, args.max_new_tokens)
        return cls(prompts=prompts, **values)

    @property
    def named_prompts(self) -> bool:
        return self.prompts[0].name is not None


@dataclass(frozen=True)
class PreprocessSettings:
    """What the CPU stage needs: the checkpoint's processor files and what to do with them."""

    model: str
    revision: Optional[str]
    prompts: tuple  # the prompts' texts, in order
    image_longest_edge: Optional[int]
    image_splitting: Optional[bool]
    max_image_pixels: int
    video_fps: Optional[float]
    video_max_frames: Optional[int]
    max_video_seconds: float
    resize_on: str  # "cpu" or "replica": whether an image may be shipped decoded, for the replica to tile

    def preprocessor(self):
        return _preprocessor(self)


@lru_cache(maxsize=4)
def _preprocessor(settings: PreprocessSettings):
    # one per worker process: the tokenizer and configs load once, not per batch
    from fms_smolvlm.checkpoint import resolve_checkpoint
    from fms_smolvlm.processing import SmolVLMPreprocessor

    model_dir = resolve_checkpoint(settings.model, weights=False, revision=settings.revision)
    return SmolVLMPreprocessor.from_pretrained(
        model_dir,
        settings.image_longest_edge,
        settings.image_splitting,
        settings.max_image_pixels,
        video_fps=settings.video_fps,
        video_max_frames=settings.video_max_frames,
        max_video_seconds=settings.max_video_seconds,
        resize_on=settings.resize_on,
    )


@dataclass(frozen=True)
class ReplicaSettings:
    """What a model replica needs: the checkpoint, where and how to run it, the prompts' limits and columns."""

    model: str
    revision: Optional[str]
    prompts: tuple  # of Prompt: their limits and output columns
    video: bool  # the output has a num_frames column
    slots: int  # requests the replica's engine decodes together
    device: str
    dtype: str
    compile: bool
    cpu_threads: Optional[int]  # a CPU replica's share of its node's cores
    # where compiled replicas share their compile artifact (OUTPUT/_compiled), and how to reach it
    output: str
    storage_options: dict
    store_retry_seconds: float
