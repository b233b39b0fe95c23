"""The one-call API: load a SmolVLM checkpoint through FMS and caption batches of images."""

import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

import fms.models
from fms_smolvlm.checkpoint import check_checkpoint_dir, resolve_checkpoint, stop_token_ids
from fms_smolvlm.generation import Generation, GenerationEngine, Request, SamplingParams
from fms_smolvlm.processing import DEFAULT_MAX_IMAGE_PIXELS, ImageInput, ProcessedSample, SmolVLMPreprocessor
from fms_smolvlm.smolvlm import SmolVLM

DEFAULT_PROMPT = "Describe this image."


@dataclass
class CaptionResult:
    text: Optional[str]  # special tokens stripped; None when the image could not be used
    token_ids: list  # generated ids, stop token excluded
    finish_reason: Optional[str]  # "stop" | "length" | None (error)
    num_image_tokens: int
    num_generated_tokens: int
    error: Optional[str] = None  # one-line reason this image could not be decoded/processed


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    return getattr(torch, dtype)


def load_model(path: Path, device: torch.device, dtype: torch.dtype, preprocessor: SmolVLMPreprocessor) -> SmolVLM:
    model = fms.models.get_model(
        "hf_pretrained",
        model_path=str(path),
        device_type=device.type,
        data_type=dtype,
        image_mean=list(preprocessor.settings.image_mean),
        image_std=list(preprocessor.settings.image_std),
    )
    if model.config.image_seq_len != preprocessor.image_seq_len:
        raise ValueError(
            f"{path}: processor_config.json says image_seq_len={preprocessor.image_seq_len} but the model "
            f"gives {model.config.image_seq_len} tokens per tile"
        )
    return model.eval()


class Captioner:
    """Preprocessing, a SmolVLM replica and its generation engine, behind ``generate(images, prompt)``."""

    def __init__(self, model: SmolVLM, preprocessor: SmolVLMPreprocessor, engine: GenerationEngine, name: str):
        self.model = model
        self.preprocessor = preprocessor
        self.engine = engine
        self.name = name

    @classmethod
    def from_pretrained(
        cls,
        model_dir_or_id,
        device: str = "cpu",
        dtype="float32",
        compile: bool = False,
        image_longest_edge: Optional[int] = None,
        image_splitting: Optional[bool] = None,
        max_batch_size: int = 32,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        warmup: bool = False,
        revision: Optional[str] = None,
    ) -> "Captioner":
        """``image_longest_edge`` / ``image_splitting``: None keeps the checkpoint's processor config.
        ``warmup`` runs (and with ``compile``, compiles) one batch now, so the first real batch is not the compile.
        ``revision``: a hub model's commit, branch or tag (default: the latest)."""
        path = resolve_checkpoint(model_dir_or_id, revision=revision)
        check_checkpoint_dir(path)
        torch_device = resolve_device(device)
        preprocessor = SmolVLMPreprocessor.from_pretrained(
            path, image_longest_edge, image_splitting, max_image_pixels=max_image_pixels
        )
        model = load_model(path, torch_device, resolve_dtype(dtype, torch_device), preprocessor)
        tokenizer = preprocessor.tokenizer
        engine = GenerationEngine(
            model,
            stop_ids=stop_token_ids(path, tokenizer),
            pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
            max_batch_size=max_batch_size,
            compile=compile,
        )
        captioner = cls(model, preprocessor, engine, str(model_dir_or_id))
        if warmup:
            captioner.warmup()
        return captioner

    def warmup(self, max_new_tokens: int = 8) -> None:
        """Run a full batch of synthetic images through the engine (and the compiler)."""
        from PIL import Image

        tile = self.preprocessor.settings.tile_size
        image = Image.new("RGB", (tile * 2, tile), (127, 127, 127))
        self.generate([image] * self.engine.max_batch_size, max_new_tokens=max_new_tokens)

    def preprocess(self, images: Sequence[Optional[ImageInput]], prompt: str) -> list[ProcessedSample]:
        return [self.preprocessor.process(image, [prompt]) for image in images]

    def generate(
        self,
        images: Sequence[Optional[ImageInput]],
        prompt: str = DEFAULT_PROMPT,
        max_new_tokens: Union[int, Sequence[int]] = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: Optional[int] = None,
        ignore_eos: bool = False,
    ) -> list[CaptionResult]:
        """One result per image, in order. ``images``: PIL images or encoded bytes (None: text-only prompt).
        ``max_new_tokens``: one limit for all, or one per image. Sampling: image ``i`` draws with seed ``seed + i``
        (a fresh random ``seed`` when None), reproducible whatever the batching. ``ignore_eos``: generate exactly
        ``max_new_tokens`` (for benchmarks)."""
        samples = self.preprocess(images, prompt)
        base = secrets.randbits(62) if seed is None else seed
        limits = [max_new_tokens] * len(samples) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        if len(limits) != len(samples):
            raise ValueError(f"max_new_tokens has {len(limits)} limits for {len(samples)} images")
        params = [SamplingParams(limit, do_sample, temperature, top_p, top_k, ignore_eos) for limit in limits]
        return self.generate_processed(samples, [base + i for i in range(len(samples))], params)

    def generate_processed(
        self, samples: Sequence[ProcessedSample], seeds: Sequence[int], params: Sequence[SamplingParams]
    ) -> list[CaptionResult]:
        """Generate for already preprocessed samples (the pipeline preprocesses on CPU workers)."""
        requests = self.requests(samples, seeds, params)
        generations = iter(self.engine.generate([r for r in requests if r is not None]))
        return [self.result(sample, None if r is None else next(generations)[0]) for sample, r in zip(samples, requests)]

    @staticmethod
    def requests(
        samples: Sequence[ProcessedSample], seeds: Sequence[int], params: Sequence[SamplingParams]
    ) -> list[Optional[Request]]:
        """The engine's request for each sample; None for a sample whose image could not be used."""
        return [
            None if sample.error is not None else Request(sample.input_ids, sample.tiles, p, seed)
            for sample, seed, p in zip(samples, seeds, params)
        ]

    def result(self, sample: ProcessedSample, generation: Optional[Generation]) -> CaptionResult:
        """A sample's caption from its generation (None: the sample's error)."""
        if sample.error is not None:
            return CaptionResult(None, [], None, 0, 0, error=sample.error)
        return CaptionResult(
            text=self.preprocessor.tokenizer.decode(generation.token_ids, skip_special_tokens=True),
            token_ids=generation.token_ids,
            finish_reason=generation.finish_reason,
            num_image_tokens=int((sample.input_ids == self.preprocessor.image_token_id).sum()),
            num_generated_tokens=len(generation.token_ids),
        )
