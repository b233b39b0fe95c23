"""fms_smolvlm.processing against HF's processor (PIL backend), and what bad images become."""

import io

import numpy as np
import pytest
import torch
from fms.models import get_model
from PIL import Image

from fms_smolvlm.processing import ImageError, SmolVLMPreprocessor, decode_image
from fms_smolvlm.prompts import image_prompt
from tests.conftest import random_image
from fms_smolvlm.hf_api import real_tiles
from tests.hf_reference import chat_prompt, hf_processor

# (width, height): tiny, square, wide, tall, extreme, odd sizes; some larger than longest_edge, some smaller
SIZES = [
    (8, 8), (31, 17), (64, 64), (90, 60), (60, 90), (128, 128), (129, 127), (200, 50), (50, 200), (333, 111),
    (17, 301), (100, 99), (257, 255), (45, 44), (1000, 10), (10, 1000), (640, 480), (480, 640), (73, 73), (96, 160),
    (301, 299), (12, 700),
]
PROMPTS = ["Describe this image.", "What is in the picture? Answer in one word.", "Caption:"]


def encoded(image: Image.Image, fmt: str = "PNG", **save_kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_kwargs)
    return buffer.getvalue()


def hf_single(processor, image, prompt):
    inputs = processor(text=[chat_prompt(processor, prompt)], images=[[image]], return_tensors="pt")
    tiles, _ = real_tiles(inputs["pixel_values"], inputs["pixel_attention_mask"], patch_size=1)
    return inputs["input_ids"][0].numpy(), tiles


@pytest.mark.parametrize("splitting", [True, False], ids=["split", "unsplit"])
@pytest.mark.parametrize("name", ["gqa-s2-untied", "mha-s3-tied"])
def test_ids_and_pixels_equal_hf_processor(checkpoint_factory, name, splitting):
    path = checkpoint_factory(name)
    ours = SmolVLMPreprocessor.from_pretrained(path, image_splitting=splitting)
    theirs = hf_processor(path, do_image_splitting=splitting)
    model = get_model("hf_pretrained", model_path=str(path))
    grids = set()
    for i, (width, height) in enumerate(SIZES):
        image = random_image(width, height, seed=i)
        prompt = PROMPTS[i % len(PROMPTS)]
        sample = ours.process(encoded(image), [prompt])
        expected_ids, expected_pixels = hf_single(theirs, image, prompt)
        assert sample.error is None
        assert sample.input_ids.tolist() == expected_ids.tolist(), (width, height)
        assert sample.tiles.dtype == np.uint8
        actual_pixels = model.normalize_pixels(torch.from_numpy(sample.tiles))
        assert actual_pixels.shape == expected_pixels.shape, (width, height)
        assert (actual_pixels - expected_pixels).abs().max() <= 1e-6, (width, height)
        assert (sample.width, sample.height) == (width, height)
        grids.add(sample.num_tiles)
    assert len(grids) > (3 if splitting else 0)  # the sizes exercise many tilings


def test_image_budget_options(checkpoint):
    """image_longest_edge = one tile and no splitting: one tile, image_seq_len image tokens."""
    small = SmolVLMPreprocessor.from_pretrained(checkpoint, image_longest_edge=32, image_splitting=False)
    full = SmolVLMPreprocessor.from_pretrained(checkpoint)
    image = encoded(random_image(300, 200))
    assert small.process(image, ["Hi"]).num_tiles == 1
    assert full.process(image, ["Hi"]).num_tiles == 4 * 3 + 1
    image_id = small.image_token_id
    assert (small.process(image, ["Hi"]).input_ids == image_id).sum() == small.image_seq_len
    assert small.fingerprint()["image_longest_edge"] == 32 and small.fingerprint()["image_splitting"] is False
    assert full.fingerprint()["image_longest_edge"] == 128 and full.fingerprint()["image_splitting"] is True


def test_image_prompt_layout():
    assert image_prompt(0, 0, 2) == "<fake_token_around_image><global-img><image><image><fake_token_around_image>"
    two_by_one = image_prompt(2, 1, 1)
    assert two_by_one == (
        "<fake_token_around_image><row_1_col_1><image>\n"
        "<fake_token_around_image><row_2_col_1><image>\n"
        "\n<fake_token_around_image><global-img><image><fake_token_around_image>"
    )


def test_text_only_prompt(checkpoint):
    ours = SmolVLMPreprocessor.from_pretrained(checkpoint)
    theirs = hf_processor(checkpoint)
    sample = ours.process(None, ["Hello there"])
    expected = theirs(text=[chat_prompt(theirs, "Hello there", with_image=False)])["input_ids"][0]
    assert sample.input_ids.tolist() == expected and sample.tiles is None


# ---------------------------------------------------------------------------------------------
# Image modes: each decodes to the RGB picture a viewer would show


def test_alpha_is_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 255, 0))  # fully transparent blue
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    decoded = np.asarray(decode_image(encoded(rgba)))
    assert decoded[1, 1].tolist() == [255, 255, 255] and decoded[0, 0].tolist() == [255, 0, 0]
    la = Image.new("LA", (4, 4), (0, 0))
    assert np.asarray(decode_image(encoded(la)))[0, 0].tolist() == [255, 255, 255]


def test_palette_with_transparency_grayscale_cmyk():
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    assert np.asarray(decode_image(encoded(palette)))[0, 0].tolist() == [10, 20, 30]
    palette.info["transparency"] = 1
    assert np.asarray(decode_image(encoded(palette)))[0, 0].tolist() == [255, 255, 255]
    gray = Image.new("L", (4, 4), 77)
    assert np.asarray(decode_image(encoded(gray)))[0, 0].tolist() == [77, 77, 77]
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))
    assert np.asarray(decode_image(encoded(cmyk, "JPEG", quality=100)))[0, 0].tolist()[0] > 240
    bilevel = Image.new("1", (4, 4), 1)
    assert np.asarray(decode_image(encoded(bilevel)))[0, 0].tolist() == [255, 255, 255]


def test_16_bit_grayscale_is_scaled_not_clipped():
    values = np.array([[0, 256, 32768, 65535]], dtype=np.uint16)
    decoded = np.asarray(decode_image(encoded(Image.fromarray(values))))
    assert decoded[0, :, 0].tolist() == [0, 1, 128, 255]


def test_exif_orientation_is_applied():
    upright = random_image(40, 20)  # wide
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: the viewer turns it 90 degrees clockwise
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # tall on disk
    decoded = decode_image(encoded(stored, "JPEG", exif=exif, quality=95))
    assert decoded.size == (40, 20)


def test_animated_image_uses_first_frame():
    frames = [Image.new("RGB", (8, 8), color) for color in ((255, 0, 0), (0, 0, 255))]
    data = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert np.asarray(decode_image(data))[0, 0].tolist() == [255, 0, 0]


# ---------------------------------------------------------------------------------------------
# Bad inputs: a one-line reason per image, never an exception out of the batch


def truncated_jpeg() -> bytes:
    data = encoded(random_image(200, 200), "JPEG", quality=90)
    return data[: len(data) // 2]


def bomb_png() -> bytes:
    return encoded(Image.new("L", (12_000, 10_000)))  # 120 MP of zeros compresses to a tiny file


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty file"),
        (b"%PDF-1.4 not an image at all", "not an image (unrecognised file format)"),
        (truncated_jpeg(), "corrupt or truncated image data"),
        (encoded(random_image(64, 64))[:60], "corrupt"),
        (bomb_png(), "image is 12000x10000 = 120000000 pixels, over the limit of 100000000"),
    ],
    ids=["empty", "not-an-image", "truncated-jpeg", "truncated-png-header", "decompression-bomb"],
)
def test_bad_images_become_error_rows(checkpoint, data, reason):
    preprocessor = SmolVLMPreprocessor.from_pretrained(checkpoint)
    sample = preprocessor.process(data, ["Describe this image."])
    assert sample.error is not None and reason in sample.error
    assert "\n" not in sample.error
    assert sample.prompt_ids == () and sample.tiles is None
    with pytest.raises(ImageError):
        preprocessor.process_image(data)


def test_pixel_limit_is_configurable(checkpoint):
    strict = SmolVLMPreprocessor.from_pretrained(checkpoint, max_image_pixels=1000)
    assert "over the limit of 1000" in strict.process(encoded(random_image(40, 30)), ["Hi"]).error
    assert strict.process(encoded(random_image(30, 30)), ["Hi"]).error is None
