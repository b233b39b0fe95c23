"""Small random SmolVLM checkpoints in HF format, written offline.

Weights cannot be downloaded on the build machines, so the real loading code (FMS and HF alike) is
exercised on checkpoints written here: ``config.json``, ``model.safetensors``, ``generation_config.json``,
a real byte-level BPE tokenizer trained on the spot with every SmolVLM special token, the image
processor and processor configs, and SmolVLM's chat template.
"""

import json
from pathlib import Path
from typing import Optional

import torch

# the template the published SmolVLM checkpoints ship in chat_template.json
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# SmolVLM2's (HF's DEFAULT_CHAT_TEMPLATE in processing_smolvlm.py): a video item renders as <video>
VIDEO_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'] is string %}{{': ' + message['content']}}{% else %}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% elif line['type'] == 'video' %}{{ '<video>' }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
# SmolVLM2-256M/500M-Video-Instruct's video sampling
VIDEO_SAMPLING = {"fps": 1, "max_frames": 64}

BASE_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
IMAGE_SPECIAL_TOKENS = (
    ["<global-img>"]
    + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    + ["<fake_token_around_image>", "<image>", "<end_of_utterance>"]
)

_WORDS = (
    "a an the this that photo picture image of with on in at by near under over small large red green blue "
    "yellow white black dog cat bird car tree house street road river sky cloud person people man woman child "
    "sitting standing running walking next to front behind table chair window door field grass water beach "
    "mountain city night day sun light dark two three several many is are shows showing describe caption "
    "what there it its and or but very bright colorful old new wooden stone"
).split()

ARCHITECTURES = {
    "Idefics3ForConditionalGeneration": ("idefics3", "Idefics3Processor", "Idefics3ImageProcessor"),
    "SmolVLMForConditionalGeneration": ("smolvlm", "SmolVLMProcessor", "SmolVLMImageProcessor"),
}

DEFAULT_VISION = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=4
)
DEFAULT_TEXT = dict(
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_theta=10000.0,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
)


# the published shapes (HuggingFaceTB/SmolVLM-256M/500M-Instruct, SmolVLM-Instruct) and their processors' longest edge
PUBLISHED_LONGEST_EDGE = {"256m": 2048, "500m": 2048, "2.2b": 1536}


def published_config(variant: str) -> dict:
    """:func:`write_random_checkpoint`'s arguments for a published shape (``"256m"``, ``"500m"``, ``"2.2b"``): the
    registered FMS variant's config handed back to HF, with random weights the size of the real ones."""
    from fms.models import get_model

    from fms_smolvlm.hf_api import fms_to_hf_config

    hf = fms_to_hf_config(get_model("smolvlm", variant, device_type="meta").config)
    return dict(vision_config=hf.vision_config.to_dict(), text_config=hf.text_config.to_dict(),
                scale_factor=hf.scale_factor, longest_edge=PUBLISHED_LONGEST_EDGE[variant])


def train_tokenizer(vocab_size: int = 400):
    """A SmolLM2-style byte-level BPE tokenizer (no BOS added; the chat template supplies ``<|im_start|>``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [
        " ".join(_WORDS[(i * 7 + j * 3) % len(_WORDS)] for j in range(4 + i % 9)) + "." for i in range(600)
    ] + ["User: Describe this image.\nAssistant: A photo of a dog.", "Caption the picture briefly."]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=BASE_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=IMAGE_SPECIAL_TOKENS,
    )
    return fast


def write_random_checkpoint(
    path,
    *,
    architecture: str = "Idefics3ForConditionalGeneration",
    seed: int = 0,
    vision_config: Optional[dict] = None,
    text_config: Optional[dict] = None,
    scale_factor: int = 2,
    tie_word_embeddings: bool = False,
    initializer_range: float = 0.05,
    longest_edge: Optional[int] = None,
    do_image_splitting: bool = True,
    dtype: torch.dtype = torch.float32,
    layout: str = "hub",
) -> Path:
    """Write a random SmolVLM checkpoint in HF format to ``path`` and return it.

    ``vision_config`` / ``text_config`` override HF config fields of the small defaults above. The
    image processor tiles at the vision tower's ``image_size`` and resizes the longest edge to
    ``longest_edge`` (default 4 tiles' worth, like the published processors).

    ``layout``: ``"hub"`` writes the processor files as the HuggingFaceTB repos ship them (SmolVLM2 ones with their
    ``video_sampling``), ``"transformers"`` as transformers 5.x ``save_pretrained`` writes them after a fine-tune.
    ``SmolVLMForConditionalGeneration`` checkpoints are SmolVLM2's: they carry video settings and template.
    """
    import transformers
    from transformers import GenerationConfig

    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {sorted(ARCHITECTURES)}, got {architecture!r}")
    if layout not in LAYOUT_WRITERS:
        raise ValueError(f"layout must be one of {sorted(LAYOUT_WRITERS)}, got {layout!r}")
    model_type, processor_class, image_processor_class = ARCHITECTURES[architecture]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)

    tokenizer = train_tokenizer()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in BASE_SPECIAL_TOKENS + IMAGE_SPECIAL_TOKENS}
    vision = {**DEFAULT_VISION, **(vision_config or {}), "initializer_range": initializer_range}
    text = {
        **DEFAULT_TEXT,
        **(text_config or {}),
        "model_type": "llama",
        # at least the tokenizer; the published shapes (benchmarks) pad it to their real vocabulary
        "vocab_size": max(len(tokenizer), (text_config or {}).get("vocab_size", 0)),
        "pad_token_id": ids["<|im_end|>"],
        "bos_token_id": ids["<|im_start|>"],
        "eos_token_id": ids["<end_of_utterance>"],
        "tie_word_embeddings": tie_word_embeddings,
        "initializer_range": initializer_range,
    }
    config_class = transformers.AutoConfig.for_model(model_type).__class__
    config = config_class(
        vision_config=vision,
        text_config=text,
        scale_factor=scale_factor,
        image_token_id=ids["<image>"],
        tie_word_embeddings=tie_word_embeddings,
        architectures=[architecture],
    )
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(config).to(dtype)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|im_start|>"], eos_token_id=ids["<end_of_utterance>"], pad_token_id=ids["<|im_end|>"]
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)

    tile = vision["image_size"]
    image_processor = {
        "do_convert_rgb": True,
        "do_image_splitting": do_image_splitting,
        "do_normalize": True,
        "do_pad": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_processor_type": image_processor_class,
        "image_std": [0.5, 0.5, 0.5],
        "max_image_size": {"longest_edge": tile},
        "resample": 1,
        "rescale_factor": 1 / 255,
        "size": {"longest_edge": longest_edge or 4 * tile},
    }
    video = architecture == "SmolVLMForConditionalGeneration"
    image_seq_len = (tile // vision["patch_size"]) ** 2 // scale_factor**2
    LAYOUT_WRITERS[layout](path, image_processor, image_seq_len, processor_class, video)
    return path


def _write_hub_layout(path: Path, image_processor: dict, image_seq_len: int, processor_class: str, video: bool):
    """As the HuggingFaceTB repos ship them; SmolVLM2's keep the video sampling in preprocessor_config.json."""
    _write_json(path / "preprocessor_config.json", {**_hub_image_processor(image_processor, video), "processor_class": processor_class})
    _write_json(path / "processor_config.json", {"image_seq_len": image_seq_len, "processor_class": processor_class})
    _write_json(path / "chat_template.json", {"chat_template": chat_template(video)})


def _write_transformers_layout(path: Path, image_processor: dict, image_seq_len: int, processor_class: str, video: bool):
    """What transformers 5.x ``Processor.save_pretrained`` writes after loading the hub layout (the tests compare
    the two): one processor_config.json with the image (and video) processor inside, the chat template as
    chat_template.jinja, no preprocessor_config.json."""
    image_processor = _hub_image_processor(image_processor, video)
    processor = {"image_processor": image_processor, "image_seq_len": image_seq_len, "processor_class": processor_class}
    if video:  # HF's video processor keeps every init setting, and its video_size is replaced by size
        processor["video_processor"] = {
            **{k: v for k, v in image_processor.items() if k != "image_processor_type"},
            "do_sample_frames": False,
            "fps": VIDEO_SAMPLING["fps"],
            "num_frames": VIDEO_SAMPLING["max_frames"],
            "return_metadata": False,
            "video_processor_type": "SmolVLMVideoProcessor",
            "video_sampling": dict(VIDEO_SAMPLING, video_size=image_processor["size"]),
        }
    _write_json(path / "processor_config.json", processor)
    (path / "chat_template.jinja").write_text(chat_template(video))


def _hub_image_processor(image_processor: dict, video: bool) -> dict:
    if not video:
        return image_processor
    # the hub files state one tile as video_size, which HF replaces by size (see checkpoint.video_sampling)
    return {**image_processor, "video_sampling": dict(VIDEO_SAMPLING, video_size=image_processor["max_image_size"])}


def chat_template(video: bool) -> str:
    """SmolVLM2's template also renders a video item (as ``<video>``, which its processor expands)."""
    return VIDEO_CHAT_TEMPLATE if video else CHAT_TEMPLATE


LAYOUT_WRITERS = {"hub": _write_hub_layout, "transformers": _write_transformers_layout}


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
