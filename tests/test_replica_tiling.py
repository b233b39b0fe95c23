"""Resizing and tiling on the replica (issue 19): the CPU stage ships a decoded image and its tile plan when that is
fewer bytes than its tiles, and the replica cuts the same uint8 tiles, byte for byte, that the CPU path cuts."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from fms_smolvlm import Captioner
from fms_smolvlm.processing import (
    ImageSettings,
    SmolVLMPreprocessor,
    SourceImage,
    decode_image,
    plan_tiles,
    tile_image,
    tiles_from_sources,
)
from tests.conftest import random_image
from tests.test_processing import SIZES, encoded

CPU = torch.device("cpu")
# the test checkpoints' processor (4 tiles' worth of longest edge), unsplit, and SmolVLM-256M's own settings
SETTINGS = {
    "split": ImageSettings(longest_edge=128, tile_size=32, splitting=True),
    "unsplit": ImageSettings(longest_edge=128, tile_size=32, splitting=False),
    "256m": ImageSettings(longest_edge=2048, tile_size=512, splitting=True),
}


def corpus() -> dict[str, bytes]:
    """Every kind of image the CPU path is tested on: sizes from 8x8 to 1000x10, modes, EXIF, animation."""
    images = {f"{w}x{h}": encoded(random_image(w, h, seed=i)) for i, (w, h) in enumerate(SIZES)}
    images["jpeg"] = encoded(random_image(301, 199, seed=5), "JPEG", quality=90)
    images["rgba"] = encoded(random_image(90, 61, seed=6, mode="RGBA"))
    images["grayscale"] = encoded(random_image(77, 45, seed=7, mode="L"))
    palette = random_image(64, 40, seed=8).convert("P")
    palette.info["transparency"] = 3
    images["palette-transparent"] = encoded(palette)
    images["cmyk"] = encoded(random_image(50, 70, seed=9).convert("CMYK"), "JPEG", quality=95)
    images["16-bit"] = encoded(Image.fromarray(np.random.default_rng(1).integers(0, 65535, (33, 47), dtype=np.uint16)))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated
    images["exif-rotated"] = encoded(random_image(60, 100, seed=10), "JPEG", exif=exif, quality=95)
    frames = [random_image(40, 30, seed=s) for s in (11, 12)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    images["animated"] = buffer.getvalue()
    return images


@pytest.mark.parametrize("settings", ["split", "unsplit"])
def test_replica_tiles_equal_cpu_tiles_on_the_whole_corpus(settings):
    settings = SETTINGS[settings]
    images = {name: decode_image(data) for name, data in corpus().items()}
    sources = [SourceImage(np.asarray(image), plan_tiles(*image.size, settings)) for image in images.values()]
    for name, image, tiles in zip(images, images.values(), tiles_from_sources(sources, CPU)):
        expected = tile_image(image, settings).tiles
        assert tiles.dtype == torch.uint8 and tiles.shape == expected.shape, name
        assert np.array_equal(tiles.numpy(), expected), name


def test_replica_tiles_at_smolvlm_256m_settings():
    """The published processor's resizes: a web-sized image upscaled to 2048 px then cut into 13 tiles, and a tall
    one into 9; images of one size are tiled as one batch."""
    settings = SETTINGS["256m"]
    images = [random_image(640, 480, seed=1), random_image(640, 480, seed=2), random_image(300, 900, seed=3)]
    sources = [SourceImage(np.asarray(image), plan_tiles(*image.size, settings)) for image in images]
    tiles = tiles_from_sources(sources, CPU)
    assert [t.shape[0] for t in tiles] == [13, 13, 9]
    for image, image_tiles in zip(images, tiles):
        assert np.array_equal(image_tiles.numpy(), tile_image(image, settings).tiles)


def test_the_cpu_stage_ships_whichever_is_fewer_bytes(checkpoint):
    """Replica resizing: a small image travels as its pixels (a fraction of its 4 x 3 + 1 tiles' bytes), one larger
    than its tiles travels as tiles; the token ids are the CPU path's either way, and so are the tiles the replica
    cuts."""
    cpu = SmolVLMPreprocessor.from_pretrained(checkpoint, resize_on="cpu")
    replica = SmolVLMPreprocessor.from_pretrained(checkpoint, resize_on="replica")
    small, large = encoded(random_image(60, 45, seed=1)), encoded(random_image(400, 300, seed=2))
    for data, ships_pixels in ((small, True), (large, False)):
        ours, reference = replica.process(data, ["Hi"]), cpu.process(data, ["Hi"])
        assert isinstance(ours.tiles, SourceImage) is ships_pixels
        assert ours.input_ids.tolist() == reference.input_ids.tolist()
        assert ours.num_tiles == reference.num_tiles == len(reference.tiles)
        shipped = ours.tiles.nbytes
        assert shipped <= reference.tiles.nbytes
        if ships_pixels:
            assert shipped == 60 * 45 * 3
            assert np.array_equal(tiles_from_sources([ours.tiles], CPU)[0].numpy(), reference.tiles)
    assert SmolVLMPreprocessor.from_pretrained(checkpoint).resize_on == "cpu"  # auto: the preprocessor alone


def test_resize_on_is_checked(checkpoint):
    with pytest.raises(ValueError, match="resize_on must be one of auto, cpu, replica"):
        SmolVLMPreprocessor.from_pretrained(checkpoint, resize_on="gpu")


def test_captions_are_the_same_wherever_images_are_resized(checkpoint):
    """The engine takes tiles and source images in one batch: captions with replica resizing equal the CPU path's."""
    images = [random_image(w, h, seed=i) for i, (w, h) in enumerate([(60, 45), (400, 300), (20, 90), (128, 128)])]
    on_cpu = Captioner.from_pretrained(checkpoint, max_batch_size=4, resize_on="cpu", dtype="float32")
    on_replica = Captioner.from_pretrained(checkpoint, max_batch_size=4, resize_on="replica", dtype="float32")
    samples = on_replica.preprocess(images, "Describe this image.")
    assert {type(s.tiles) for s in samples} == {SourceImage, np.ndarray}  # both forms in one batch
    expected = on_cpu.generate(images, max_new_tokens=12)
    actual = on_replica.generate(images, max_new_tokens=12)
    assert [r.token_ids for r in actual] == [r.token_ids for r in expected]
    assert [r.num_image_tokens for r in actual] == [r.num_image_tokens for r in expected]
