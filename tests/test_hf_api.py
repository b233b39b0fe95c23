"""SmolVLM on FMS handed back to Hugging Face: HF's model API (forward, generate, pipeline) and HF checkpoints."""

import logging
from contextlib import contextmanager

import pytest
import torch
from fms.models import get_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForImageTextToText, GenerationConfig, pipeline

from fms_smolvlm import CheckpointError, SmolVLMConfig, export_hf_checkpoint, to_hf_api
from fms_smolvlm.hf_api import fms_to_hf_config, fms_to_hf_state_dict
from fms_smolvlm.hf_config import build_smolvlm_params
from fms_smolvlm.smolvlm import _2_2b_config, _256m_config, _500m_config
from tests.conftest import random_image
from tests.hf_reference import hf_inputs, hf_model, hf_processor

LAYOUTS = ["gqa-s2-untied", "mha-s3-tied"]  # Idefics3 untied GQA, SmolVLM tied MHA
TOLERANCE = 1e-4  # of the logits' scale
PROMPT = "Describe this image."
IMAGE_SIZES = [(90, 60), (40, 110), (30, 30), (200, 50)]  # 13, 9, 17 and 5 tiles


def fms_model(path):
    return get_model("hf_pretrained", model_path=str(path)).eval()


def adapter(path):
    """Our model behind HF's API, with the checkpoint's stop tokens and architecture."""
    architecture = AutoConfig.from_pretrained(path).architectures[0]
    return to_hf_api(fms_model(path), architecture, GenerationConfig.from_pretrained(path))


def mixed_image_inputs(path):
    images = [random_image(w, h, seed=i) for i, (w, h) in enumerate(IMAGE_SIZES, start=1)]
    inputs = hf_inputs(hf_processor(path), [PROMPT] * len(images), images)
    tiles_per_image = inputs["pixel_values"].flatten(2).ne(0).any(-1).sum(1)
    assert len(set(tiles_per_image.tolist())) > 1 and not inputs["attention_mask"].all(), "want left padding"
    return inputs


def with_partially_padded_tile(inputs):
    """HF's processor resizes images to whole tiles: pad the first tile by hand, as a smaller image would be."""
    pixels, mask = inputs["pixel_values"].clone(), inputs["pixel_attention_mask"].clone()
    size = pixels.shape[-1]
    for tensor in (pixels, mask):
        tensor[0, 0, ..., size * 5 // 8 :, :] = 0
        tensor[0, 0, ..., :, size * 7 // 8 :] = 0
    return {**inputs, "pixel_values": pixels, "pixel_attention_mask": mask}


def assert_logits_close(actual, expected):
    assert actual.shape == expected.shape
    scale = expected.abs().max()
    error = (actual - expected).abs().max() / scale
    assert error <= TOLERANCE, f"max |FMS - HF| = {error:.2e} of the logits' scale {scale:.3f}"


@contextmanager
def transformers_warnings():
    """Warnings and errors that ``transformers`` logs (its logger does not propagate to pytest's caplog)."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


# ---------------------------------------------------------------------------------------------
# The HF model API


@pytest.mark.parametrize("name", LAYOUTS)
def test_forward_logits_equal_hf(checkpoint_factory, name):
    path = checkpoint_factory(name)
    inputs = with_partially_padded_tile(mixed_image_inputs(path))
    with torch.no_grad():
        expected = hf_model(path)(**inputs).logits
        actual = adapter(path)(**inputs).logits
    valid = inputs["attention_mask"].bool()
    assert_logits_close(actual[valid], expected[valid])


def test_forward_continues_from_its_cache_like_hf(checkpoint):
    """A hand-written decode step: the previous output's cache, the next token, HF's default positions."""
    inputs = mixed_image_inputs(checkpoint)
    ones = torch.ones_like(inputs["attention_mask"][:, :1])

    def second_step(model):
        first = model(**inputs, use_cache=True)
        attention_mask = torch.cat([inputs["attention_mask"], ones], 1)
        return model(first.logits[:, -1:].argmax(-1), attention_mask=attention_mask, cache=first.cache).logits

    with torch.no_grad():
        expected, actual = second_step(hf_model(checkpoint)), second_step(adapter(checkpoint))
    assert_logits_close(actual, expected)


@pytest.mark.parametrize("name", LAYOUTS)
def test_greedy_generate_equals_hf(checkpoint_factory, name):
    """HF's generate loop drives our forward: prefill with images, then one token at a time on FMS's KV cache."""
    path = checkpoint_factory(name)
    inputs = mixed_image_inputs(path)
    with torch.no_grad():
        expected = hf_model(path).generate(**inputs, max_new_tokens=16, do_sample=False)
        actual = adapter(path).generate(**inputs, max_new_tokens=16, do_sample=False)
    assert actual.tolist() == expected.tolist()
    eos = GenerationConfig.from_pretrained(path).eos_token_id
    new_tokens = actual[:, inputs["input_ids"].shape[1] :]
    assert (new_tokens != eos).all(1).sum() >= 3, "random weights stopped too early for a meaningful comparison"


def test_image_text_to_text_pipeline_gives_hf_text(checkpoint):
    processor = hf_processor(checkpoint)
    images = [random_image(w, h, seed=i) for i, (w, h) in enumerate(IMAGE_SIZES, start=1)]
    content = [{"type": "image"}, {"type": "text", "text": PROMPT}]
    chats = [[{"role": "user", "content": [{**content[0], "image": image}, content[1]]}] for image in images]

    def replies(model):
        outputs = pipeline("image-text-to-text", model=model, processor=processor)(text=chats, max_new_tokens=12)
        return [output[0]["generated_text"][-1]["content"] for output in outputs]

    expected = replies(hf_model(checkpoint))
    assert replies(adapter(checkpoint)) == expected
    assert sum(len(text) > 0 for text in expected) >= 3


# ---------------------------------------------------------------------------------------------
# FMS -> HF checkpoint


@pytest.mark.parametrize("config", [_256m_config, _500m_config, _2_2b_config], ids=["256m", "500m", "2.2b"])
def test_hf_config_inverts_the_config_builder(config):
    assert SmolVLMConfig(**build_smolvlm_params(fms_to_hf_config(config))) == config


@pytest.mark.parametrize("name", LAYOUTS)
def test_export_round_trip_is_bit_exact(checkpoint_factory, tmp_path, name):
    """HF checkpoint -> FMS -> export -> HF: the same tensors, bit for bit, and the same logits."""
    path = checkpoint_factory(name)
    source = hf_model(path)
    architecture = source.config.architectures[0]
    out = export_hf_checkpoint(fms_model(path), tmp_path, architecture, GenerationConfig.from_pretrained(path))

    original, exported = load_file(path / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(exported) == sorted(original)
    differ = [k for k, t in original.items() if exported[k].dtype != t.dtype or not torch.equal(exported[k], t)]
    assert not differ
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}

    with transformers_warnings() as warnings:
        reloaded, info = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    assert not warnings, [record.getMessage() for record in warnings]
    assert type(reloaded) is type(source) and reloaded.config.tie_word_embeddings == source.config.tie_word_embeddings
    assert reloaded.generation_config.eos_token_id == source.generation_config.eos_token_id

    inputs = mixed_image_inputs(path)
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, source(**inputs).logits)


def test_warning_capture_sees_a_missing_tensor(checkpoint, tmp_path):
    """The round trip's 'no warnings' would catch an incomplete export: transformers does warn about one."""
    out = export_hf_checkpoint(fms_model(checkpoint), tmp_path)
    tensors = load_file(out / "model.safetensors")
    del tensors["model.text_model.norm.weight"]
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    with transformers_warnings() as warnings:
        hf_model(out)
    assert any("model.text_model.norm.weight" in record.getMessage() for record in warnings)


def test_export_refuses_tensors_hf_does_not_have(checkpoint):
    model = fms_model(checkpoint)
    state_dict = dict(model.state_dict())
    with pytest.raises(CheckpointError, match="unexpected tensors extra.weight"):
        fms_to_hf_state_dict({**state_dict, "extra.weight": torch.zeros(1)}, model.config)
    del state_dict["language_model.head.weight"]  # untied: the head is part of the checkpoint
    with pytest.raises(CheckpointError, match="missing tensors lm_head.weight"):
        fms_to_hf_state_dict(state_dict, model.config)
