"""FMS SmolVLM vs HF SmolVLM/Idefics3 on the same random checkpoints: logits and vision features (fp32, CPU)."""

import pytest
import torch
import torch.nn.functional as F
from fms.models import get_model
from transformers import AutoModelForImageTextToText

from fms_smolvlm.hf_api import real_tiles
from fms_smolvlm import smolvlm
from fms_smolvlm.smolvlm import (SigLIPFeedForward, TanhGELU, attention_mask_3d, patch_mask_from_pixel_mask,
                                 pixel_shuffle)
from tests.conftest import CHECKPOINT_CONFIGS, random_image
from tests.hf_reference import generate_position_ids, hf_inputs, hf_model, hf_processor

TOLERANCE = 1e-4  # of the logits' scale


def fms_logits(model, inputs):
    """Our forward on the HF processor's inputs: real tiles only, HF generate's position ids, a left-padding mask."""
    attention = inputs["attention_mask"]
    tiles = None
    if "pixel_values" in inputs:
        patch_size = model.config.vision_config.patch_size
        tiles, _ = real_tiles(inputs["pixel_values"], inputs["pixel_attention_mask"], patch_size)
    mask = attention_mask_3d(attention, attention.shape[1])
    return model(inputs["input_ids"], pixel_values=tiles, position_ids=generate_position_ids(attention), mask=mask)


def assert_logits_match(path, inputs):
    hf = hf_model(path)
    ours = get_model("hf_pretrained", model_path=str(path)).eval()
    attention = inputs["attention_mask"].bool()
    with torch.no_grad():
        expected = hf(**inputs, position_ids=generate_position_ids(attention)).logits[attention]
        actual = fms_logits(ours, inputs)[attention]
    scale = expected.abs().max()
    error = (actual - expected).abs().max() / scale
    assert error <= TOLERANCE, f"max |FMS - HF| = {error:.2e} of the logits' scale {scale:.3f}"


@pytest.mark.parametrize("name", sorted(CHECKPOINT_CONFIGS))
def test_logits_batch_of_split_images_left_padded(checkpoint_factory, name):
    path = checkpoint_factory(name)
    processor = hf_processor(path)
    images = [random_image(90, 60, seed=1), random_image(40, 110, seed=2)]
    inputs = hf_inputs(processor, ["Describe this image in a few words.", "What?"], images)
    tiles_per_image = (inputs["pixel_values"].flatten(2) != 0).any(-1).sum(1)
    assert (tiles_per_image > 2).all() and tiles_per_image[0] != tiles_per_image[1]
    assert not inputs["attention_mask"].all(), "the two prompts should differ in length (left padding)"
    assert_logits_match(path, inputs)


@pytest.mark.parametrize("name", sorted(CHECKPOINT_CONFIGS))
def test_logits_unsplit_image(checkpoint_factory, name):
    path = checkpoint_factory(name)
    processor = hf_processor(path, do_image_splitting=False)
    inputs = hf_inputs(processor, ["Caption this."], [random_image(70, 50, seed=3)])
    assert inputs["pixel_values"].shape[1] == 1
    assert_logits_match(path, inputs)


@pytest.mark.parametrize("name", sorted(CHECKPOINT_CONFIGS))
def test_logits_text_only(checkpoint_factory, name):
    path = checkpoint_factory(name)
    inputs = hf_inputs(hf_processor(path), ["Write one sentence about a dog.", "Hi"])
    assert_logits_match(path, inputs)


def test_vision_tower_on_partially_padded_tile(checkpoint):
    """A tile whose valid region is 20x28 of 32x32 pixels: bucketed position ids and the key mask."""
    hf = hf_model(checkpoint)
    ours = get_model("hf_pretrained", model_path=str(checkpoint)).eval()
    size = ours.config.vision_config.image_size
    pixels = torch.zeros(2, 3, size, size)
    pixels[0] = torch.rand(3, size, size) * 2 - 1
    pixels[1, :, :20, :28] = torch.rand(3, 20, 28) * 2 - 1
    pixel_mask = torch.zeros(2, size, size, dtype=torch.long)
    pixel_mask[0] = 1
    pixel_mask[1, :20, :28] = 1
    patch_mask = patch_mask_from_pixel_mask(pixel_mask, ours.config.vision_config.patch_size)
    assert not patch_mask[1].all() and patch_mask[1].any()
    with torch.no_grad():
        expected = hf.model.get_image_features(pixels[:, None], pixel_mask[:, None]).pooler_output
        actual = ours.image_features(pixels, patch_mask)
    expected = torch.cat(list(expected))
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_vision_tower_is_hfs_bit_for_bit_under_sdpa(checkpoint, monkeypatch, dtype):
    """Same weights, same tiles (whole and padded): the same bits as HF's SDPA vision tower, in fp32 and in bf16 (our
    norms are HF's ``F.layer_norm``). A bf16 tower's inference on the CPU takes kernels of its own instead, which
    round differently (test_dtypes); it is made to take SDPA and the plain MLP here, as it does on a GPU."""
    monkeypatch.setattr(smolvlm, "_cpu_half_inference", lambda *tensors, p_dropout=0.0: False)
    ours = get_model("hf_pretrained", model_path=str(checkpoint), data_type=dtype).eval()
    hf = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=dtype, attn_implementation="sdpa").eval()
    size, patch = ours.config.vision_config.image_size, ours.config.vision_config.patch_size
    tiles = torch.randint(0, 256, (3, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    pixel_mask = torch.ones(3, size, size, dtype=torch.long)
    pixel_mask[1, 20:], pixel_mask[2, :, 12:] = 0, 0
    pixels = ours.normalize_pixels(tiles)
    patch_mask = patch_mask_from_pixel_mask(pixel_mask, patch)
    with torch.no_grad():
        every_patch = torch.ones(1, 3, size, size, dtype=torch.bool)
        whole = hf.model.get_image_features(pixels[None], pixel_attention_mask=every_patch).pooler_output
        assert torch.equal(ours.image_features(tiles), torch.cat(list(whole)))
        pixels = pixels * pixel_mask[:, None]
        padded = hf.model.vision_model(pixel_values=pixels, patch_attention_mask=patch_mask).last_hidden_state
        assert torch.equal(ours.vision_tower(pixels, patch_mask), padded)


def test_tanh_gelu_is_torchs_eager_and_within_float_rounding_compiled():
    """Compiled for the CPU it is computed as x * sigmoid(2u) (Inductor's tanh is slow there): the same function."""
    x = torch.linspace(-12, 12, 100_001)
    expected = F.gelu(x, approximate="tanh")
    assert torch.equal(TanhGELU()(x), expected)
    compiled = torch.compile(TanhGELU(), fullgraph=True)(x)
    assert (compiled - expected).abs().max() <= 1e-6


def test_compiled_vision_tower_matches_hf(checkpoint):
    hf = hf_model(checkpoint)
    ours = get_model("hf_pretrained", model_path=str(checkpoint)).eval()
    assert all(isinstance(layer.mlp, SigLIPFeedForward) and isinstance(layer.mlp.a, TanhGELU)
               for layer in ours.vision_tower.encoder.layers)
    size = ours.config.vision_config.image_size
    pixels = torch.rand(5, 3, size, size) * 2 - 1
    with torch.no_grad():
        expected = torch.cat(list(hf.model.get_image_features(pixels[:, None]).pooler_output))
        actual = torch.compile(ours.image_features, dynamic=True)(pixels)
    assert (actual - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_pixel_shuffle_matches_hf_channel_order(checkpoint):
    hf = hf_model(checkpoint)
    x = torch.randn(3, 36, 5)
    for scale in (2, 3):
        assert torch.equal(pixel_shuffle(x, scale), hf.model.connector.pixel_shuffle(x, scale))
