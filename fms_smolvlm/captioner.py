"""The one-call API: load a SmolVLM checkpoint through FMS and caption batches of images."""

import secrets
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

import fms.models
from fms_smolvlm.checkpoint import check_checkpoint_dir, resolve_checkpoint, stop_token_ids
from fms_smolvlm.compiled import default_compile_cache
from fms_smolvlm.generation import Generation, GenerationEngine, Request, SamplingParams, TooLongForModel
from fms_smolvlm.processing import DEFAULT_MAX_IMAGE_PIXELS, ImageInput, ProcessedSample, SmolVLMPreprocessor
from fms_smolvlm.smolvlm import SmolVLM

DEFAULT_PROMPT = "Describe this image in one sentence."


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


def cpu_computes_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AMX, or AVX512-BF16): there a bf16 model runs several times faster
    than fp32; elsewhere torch emulates bf16 and it runs many times slower (measured on an AVX2-only CPU: bf16
    matmuls 4.7 GFLOP/s against fp32's 113)."""
    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """``"auto"``: bf16 on CUDA and on CPUs that compute it natively, fp32 on other CPUs."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" or cpu_computes_bf16() else torch.float32
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
        dtype="auto",
        compile: bool = False,
        image_longest_edge: Optional[int] = None,
        image_splitting: Optional[bool] = None,
        max_batch_size: int = 32,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        warmup: bool = False,
        revision: Optional[str] = None,
        compile_cache: Union[str, Path, None] = "auto",
        resize_on: str = "auto",
    ) -> "Captioner":
        """``dtype``: ``"auto"`` is bf16 on CUDA and on CPUs that compute bf16 natively (AMX or AVX512-BF16), fp32
        elsewhere; pass ``"float32"`` for HF's exact logits and tokens. ``image_longest_edge`` / ``image_splitting``:
        None keeps the checkpoint's processor config. ``warmup`` readies every compiled graph now (:meth:`GenerationEngine.warmup`), so that no request waits for a
        compile. ``compile_cache``: the folder compiled graphs are loaded from and saved to (``"auto"``:
        ``$FMS_SMOLVLM_COMPILE_CACHE``, else ``~/.cache/fms_smolvlm/compiled``; None: compile in this process only).
        ``resize_on``: where images are resized and tiled (:meth:`SmolVLMPreprocessor.from_pretrained`); ``"auto"``:
        on a CUDA device, else on the CPU. ``revision``: a hub model's commit, branch or tag (default: the latest)."""
        path = resolve_checkpoint(model_dir_or_id, revision=revision)
        check_checkpoint_dir(path)
        torch_device = resolve_device(device)
        if resize_on == "auto":
            resize_on = "replica" if torch_device.type == "cuda" else "cpu"
        preprocessor = SmolVLMPreprocessor.from_pretrained(
            path, image_longest_edge, image_splitting, max_image_pixels=max_image_pixels, resize_on=resize_on
        )
        model = load_model(path, torch_device, resolve_dtype(dtype, torch_device), preprocessor)
        tokenizer = preprocessor.tokenizer
        engine = GenerationEngine(
            model,
            stop_ids=stop_token_ids(path, tokenizer),
            pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
            max_batch_size=max_batch_size,
            compile=compile,
            compile_cache=default_compile_cache() if compile_cache == "auto" else compile_cache and Path(compile_cache),
        )
        captioner = cls(model, preprocessor, engine, str(model_dir_or_id))
        if warmup:
            captioner.engine.warmup()
        return captioner

    def preprocess(self, images: Sequence[Optional[ImageInput]], prompt: str) -> list[ProcessedSample]:
        return self.preprocess_prompts(images, [prompt])

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
        prompts: Optional[Sequence[str]] = None,
    ):
        """One result per image, in order. ``images``: PIL images, encoded image or video bytes (None: text only).

        ``prompts``: several instructions per image instead of ``prompt``; then each image gets a list of results,
        one per prompt in order. The image is decoded, tiled and seen by the vision tower once, and the prompts'
        common start (the template and the image) is written into the cache once; the tokens are those of
        asking each prompt alone.

        ``max_new_tokens``: one limit for all, or a sequence: one limit per image (per prompt with ``prompts``).
        Sampling: image ``i`` draws with seed ``seed + i`` (a fresh random ``seed`` when None), reproducible
        whatever the batching. ``ignore_eos``: generate exactly ``max_new_tokens`` (for benchmarks)."""
        texts = [prompt] if prompts is None else list(prompts)
        self._check_limits(max_new_tokens)
        samples = self.preprocess_prompts(images, texts)
        base = secrets.randbits(62) if seed is None else seed
        limits = _limits(max_new_tokens, len(samples) if prompts is None else len(texts), "images" if prompts is None else "prompts")

        def params(limit: int) -> SamplingParams:
            return SamplingParams(limit, do_sample, temperature, top_p, top_k, ignore_eos)

        if prompts is None:
            per_sample = [[params(limit)] for limit in limits]
        else:
            per_sample = [[params(limit) for limit in limits]] * len(samples)
        results = self.generate_processed(samples, [base + i for i in range(len(samples))], per_sample)
        return results if prompts is not None else [r[0] for r in results]

    def _check_limits(self, max_new_tokens: Union[int, Sequence[int]]) -> None:
        """A limit the model cannot reach even after an empty prompt is the caller's mistake, not an image's."""
        longest = max([max_new_tokens] if isinstance(max_new_tokens, int) else max_new_tokens, default=0)
        if longest >= self.engine.max_positions:
            raise ValueError(f"max_new_tokens={longest} exceeds the model's {self.engine.max_positions} positions")

    def preprocess_prompts(self, images: Sequence[Optional[ImageInput]], prompts: Sequence[str]) -> list[ProcessedSample]:
        return [self.preprocessor.process(image, prompts) for image in images]

    def generate_processed(
        self, samples: Sequence[ProcessedSample], seeds: Sequence[int], params: Sequence[Sequence[SamplingParams]]
    ) -> list[list[CaptionResult]]:
        """Generate for already preprocessed samples (the pipeline preprocesses on CPU workers): per sample, one
        result per prompt (``params[i]``: sample ``i``'s, one per prompt)."""
        samples, requests = self.requests(samples, seeds, params)
        generations = iter(self.engine.generate([r for r in requests if r is not None]))
        return [self.results(sample, None if r is None else next(generations), len(p)) for sample, r, p in zip(samples, requests, params)]

    def requests(
        self, samples: Sequence[ProcessedSample], seeds: Sequence[int], params: Sequence[Sequence[SamplingParams]]
    ) -> tuple[list[ProcessedSample], list[Optional[Request]]]:
        """The engine's request for each sample (None where there is none), and the samples, with ``error`` set on
        those the engine cannot run: an image that could not be used, or one whose tiles make the prompt longer than
        the model's positions (that image's problem, not its batch's)."""
        checked, requests = [], []
        for sample, seed, sample_params in zip(samples, seeds, params):
            request = None
            if sample.error is None:
                request = Request(sample.prompt_ids, sample.tiles, tuple(sample_params), seed)
                try:
                    self.engine.check(request)
                except TooLongForModel as error:
                    sample, request = replace(sample, error=str(error)), None
            checked.append(sample)
            requests.append(request)
        return checked, requests

    def results(self, sample: ProcessedSample, generations: Optional[Sequence[Generation]], prompts: int) -> list[CaptionResult]:
        """A sample's captions, one per prompt, from its generations (None: the sample's error, on every prompt)."""
        if sample.error is not None:
            return [CaptionResult(None, [], None, 0, 0, error=sample.error) for _ in range(prompts)]
        image_tokens = int((sample.prompt_ids[0] == self.preprocessor.image_token_id).sum())
        return [
            CaptionResult(
                text=self.preprocessor.tokenizer.decode(generation.token_ids, skip_special_tokens=True),
                token_ids=generation.token_ids,
                finish_reason=generation.finish_reason,
                num_image_tokens=image_tokens,
                num_generated_tokens=len(generation.token_ids),
            )
            for generation in generations
        ]


def _limits(max_new_tokens: Union[int, Sequence[int]], count: int, what: str) -> list[int]:
    limits = [max_new_tokens] * count if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(limits) != count:
        raise ValueError(f"max_new_tokens has {len(limits)} limits for {count} {what}")
    return limits
