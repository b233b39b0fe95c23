"""fms_smolvlm.resample against Pillow itself: the same bytes as ``Image.resize(size, LANCZOS)``, or a failure."""

import random

import numpy as np
import pytest
import torch
from PIL import Image

from fms_smolvlm.resample import resize
from tests.conftest import random_image


def pillow_lanczos(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.LANCZOS))


def vertical_pass_first(source: tuple[int, int], target: tuple[int, int]) -> bool:
    """Pillow 13's pass order, to check that the drawn pairs exercise both orders."""
    height_shrink, width_shrink = source[1] - target[1], source[0] - target[0]
    return 0 < height_shrink and height_shrink > 2 * width_shrink


def draw_size_pairs(seed: int = 0) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(source, target) (width, height) pairs; sources mostly <= 300 px a side so the suite stays fast."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(120):  # upscales, up to x8
        w, h = rng.randint(1, 48), rng.randint(1, 48)
        pairs.append(((w, h), (rng.randint(w, 8 * w), rng.randint(h, 8 * h))))
    for _ in range(160):  # downscales, down to /16
        w, h = rng.randint(2, 300), rng.randint(2, 300)
        pairs.append(((w, h), (rng.randint(max(w // 16, 1), w), rng.randint(max(h // 16, 1), h))))
    for _ in range(80):  # one axis up, the other down (either way round)
        w, h = rng.randint(2, 200), rng.randint(2, 200)
        up, down = (rng.randint(w, 4 * w), rng.randint(max(h // 16, 1), h))
        pairs.append(((w, h), (up, down)) if rng.random() < 0.5 else ((h, w), (down, up)))
    for _ in range(80):  # the height shrinks by more than twice the width: the vertical pass runs first
        w, h = rng.randint(1, 200), rng.randint(3, 300)
        height = rng.randint(max(h // 16, 1), h - 1)
        widest_shrink = (h - height - 1) // 2
        pairs.append(((w, h), (rng.randint(max(w - widest_shrink, 1), 2 * w), height)))
    for _ in range(10):  # on the order rule's boundary: height shrink == 2 x width shrink, and one more
        w, h = rng.randint(20, 200), rng.randint(60, 300)
        width_shrink = rng.randint(1, min(w - 1, (h - 2) // 2))
        pairs.append(((w, h), (w - width_shrink, h - 2 * width_shrink)))
        pairs.append(((w, h), (w - width_shrink, h - 2 * width_shrink - 1)))
    for _ in range(12):  # 1-pixel sources and targets
        n, m = rng.randint(2, 200), rng.randint(2, 200)
        for source in ((1, 1), (1, n), (n, 1)):
            pairs.append((source, rng.choice([(1, 1), (1, m), (m, 1), (m, rng.randint(2, 64))])))
    for _ in range(6):  # extreme aspect ratios
        pairs.append(((3000, 2), (rng.randint(1, 300), rng.randint(1, 16))))
        pairs.append(((2, 3000), (rng.randint(1, 16), rng.randint(1, 300))))
    pairs += [((640, 480), (1456, 1092)), ((1600, 1200), (364, 273))]  # a few pipeline-sized ones
    return [(source, target) for source, target in pairs if source != target]


SIZE_PAIRS = draw_size_pairs()


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """One thread, as the job's CPU preprocessing tasks run: hundreds of small resizes otherwise stall on
    thread hand-offs whenever this 2-core machine is busy (integer results do not depend on it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def noise(width: int, height: int, seed: int) -> np.ndarray:
    """Uniform noise: LANCZOS rings past 0 and 255 everywhere, so clipping is exercised."""
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def test_drawn_pairs_cover_both_pass_orders_and_enough_cases():
    orders = [vertical_pass_first(source, target) for source, target in SIZE_PAIRS]
    assert len(SIZE_PAIRS) >= 500
    assert sum(orders) >= 80 and len(orders) - sum(orders) >= 80


@pytest.mark.parametrize(
    "index, source, target",
    [(i, source, target) for i, (source, target) in enumerate(SIZE_PAIRS)],
    ids=[f"{s[0]}x{s[1]}->{t[0]}x{t[1]}" for s, t in SIZE_PAIRS],
)
def test_matches_pillow_byte_for_byte(index, source, target):
    smooth = np.array(random_image(*source, seed=index))
    for pixels in (smooth, noise(*source, seed=index)):
        expected = pillow_lanczos(pixels, target)
        got = resize(torch.from_numpy(pixels), target)
        assert got.dtype == torch.uint8
        np.testing.assert_array_equal(got.numpy(), expected)


@pytest.mark.parametrize("source, target", [((90, 70), (200, 150)), ((90, 200), (80, 30))])
def test_batch_equals_image_by_image(source, target):
    batch = torch.from_numpy(np.stack([noise(*source, seed=seed) for seed in range(3)]))
    got = resize(batch, target)
    assert got.shape == (3, target[1], target[0], 3)
    for image, resized in zip(batch, got):
        assert torch.equal(resized, resize(image, target))
        np.testing.assert_array_equal(resized.numpy(), pillow_lanczos(image.numpy(), target))


def test_views_resize_as_their_copies():
    channels_first = torch.from_numpy(noise(60, 40, seed=7)).permute(2, 0, 1).contiguous()
    view = channels_first.permute(1, 2, 0)[5:35, 10:50]
    assert not view.is_contiguous()
    np.testing.assert_array_equal(resize(view, (97, 33)).numpy(), pillow_lanczos(view.numpy().copy(), (97, 33)))


@pytest.mark.parametrize("shape", [(40, 30, 3), (2, 40, 30, 3)])
def test_unchanged_size_returns_an_equal_copy(shape):
    pixels = torch.from_numpy(np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8))
    got = resize(pixels, (30, 40))
    assert torch.equal(got, pixels)
    got.zero_()
    assert pixels.any(), "the result must not share the input's storage"


@pytest.mark.parametrize(
    "pixels, size, message",
    [
        (torch.zeros(4, 4, 3), (2, 2), "uint8 torch tensor, got torch.float32"),
        (torch.zeros(4, 4, 3, dtype=torch.int32), (2, 2), "uint8 torch tensor, got torch.int32"),
        (np.zeros((4, 4, 3), dtype=np.uint8), (2, 2), "uint8 torch tensor"),
        (torch.zeros(4, 4, dtype=torch.uint8), (2, 2), r"\(H, W, 3\) or \(B, H, W, 3\).*got shape \(4, 4\)"),
        (torch.zeros(4, 4, 4, dtype=torch.uint8), (2, 2), r"got shape \(4, 4, 4\)"),
        (torch.zeros(1, 1, 4, 4, 3, dtype=torch.uint8), (2, 2), r"got shape \(1, 1, 4, 4, 3\)"),
        (torch.zeros(0, 4, 3, dtype=torch.uint8), (2, 2), r"H, W >= 1, got shape \(0, 4, 3\)"),
        (torch.zeros(4, 4, 3, dtype=torch.uint8), (0, 2), r"two positive ints, got \(0, 2\)"),
        (torch.zeros(4, 4, 3, dtype=torch.uint8), (2.0, 2), r"two positive ints"),
        (torch.zeros(4, 4, 3, dtype=torch.uint8), (2, 2, 2), r"size must be \(width, height\)"),
    ],
)
def test_bad_input_is_a_clear_value_error(pixels, size, message):
    with pytest.raises(ValueError, match=message):
        resize(pixels, size)
