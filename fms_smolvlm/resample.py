"""Pillow's LANCZOS resize of uint8 RGB images, replayed byte for byte in torch (any device).

``resize(pixels, (width, height))`` returns exactly what Pillow 13.0.0's
``Image.fromarray(pixels.numpy()).resize((width, height), Image.Resampling.LANCZOS)`` returns, so
tiles made on a GPU match the HF image processor's. It replays ``src/libImaging/Resample.c``:

  * per output pixel, a window of source pixels and its LANCZOS weights, computed in double
    precision as ``precompute_coeffs`` does and turned into 22-bit fixed point as
    ``normalize_coeffs_8bpc`` does; they depend only on (source size, target size) and are cached;
  * two separable passes (``ImagingResampleInner``): vertical first when the height shrinks by more
    than twice as many pixels as the width, else horizontal first; a pass whose axis keeps its size
    is skipped. Each pass sums in int32 from a rounding constant, shifts back and clips to uint8, so
    the order matters and the intermediate image is rounded as Pillow rounds it. (Pillow 12 and older
    always ran the horizontal pass first: their bytes differ for such sizes.)

The arithmetic is integer only: every device computes the same sums, hence the same bytes.
"""

import math
from functools import lru_cache

import torch

PRECISION_BITS = 32 - 8 - 2  # Pillow's: 8 bits of result, 2 of headroom for negative lobes/overshoot
ROUNDING = 1 << (PRECISION_BITS - 1)
LANCZOS_SUPPORT = 3.0


def resize(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 ``(H, W, 3)`` or ``(B, H, W, 3)`` -> uint8 of ``size = (width, height)``, as Pillow's LANCZOS.

    A batch shares one source size (and so one set of coefficients).
    """
    _check(pixels, size)
    width, height = size
    images = pixels if pixels.dim() == 4 else pixels.unsqueeze(0)
    in_height, in_width = images.shape[1:3]
    if (width, height) == (in_width, in_height):
        return pixels.clone()
    # Pillow 13's order: vertical first when the height loses more than twice as many pixels as the width
    if 0 < in_height - height and in_height - height > 2 * (in_width - width):
        images = _resample_axis(_resample_axis(images, 1, height), 2, width)
    else:
        images = _resample_axis(_resample_axis(images, 2, width), 1, height)
    images = images.contiguous()
    return images if pixels.dim() == 4 else images[0]


def _check(pixels: torch.Tensor, size: tuple[int, int]) -> None:
    if not isinstance(pixels, torch.Tensor) or pixels.dtype != torch.uint8:
        raise ValueError(f"pixels must be a uint8 torch tensor, got {getattr(pixels, 'dtype', type(pixels))}")
    if pixels.dim() not in (3, 4) or pixels.shape[-1] != 3 or 0 in pixels.shape[-3:-1]:
        raise ValueError(f"pixels must be (H, W, 3) or (B, H, W, 3) with H, W >= 1, got shape {tuple(pixels.shape)}")
    if len(size) != 2 or not all(isinstance(n, int) and n >= 1 for n in size):
        raise ValueError(f"size must be (width, height), two positive ints, got {size!r}")


def _resample_axis(images: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """One of Pillow's passes: axis ``dim`` of (B, H, W, C) resized to ``size``; skipped when it keeps its size.

    The axis is moved first so that every tap gathers whole contiguous rows (on the CPU, gathering
    pixels within rows made a pass twice as slow); the result is a view with the axis back in place.
    """
    if images.shape[dim] == size:
        return images
    rows = images.movedim(dim, 0)
    taps, weights = lanczos_coefficients(rows.shape[0], size, images.device)
    source = rows.to(torch.int32, memory_format=torch.contiguous_format).view(rows.shape[0], -1)
    return _resample_rows(source, taps, weights).view(size, *rows.shape[1:]).movedim(0, dim)


def _resample_rows(source: torch.Tensor, taps: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """int32 (in, M) -> uint8 (out, M): row i is sum_k weights[i, k] * source[taps[i, k]] in fixed point, clipped.

    One tap at a time over all rows keeps memory at a few copies of the output (never ``(out, ksize,
    M)``) and uses only integer ops that CUDA has (it has no int32 matmul).
    """
    total = torch.full((taps.shape[0], source.shape[1]), ROUNDING, dtype=torch.int32, device=source.device)
    tap_rows = torch.empty_like(total)
    for k in range(taps.shape[1]):
        torch.index_select(source, 0, taps[:, k], out=tap_rows)
        total.addcmul_(tap_rows, weights[:, k, None])
    # clip8: Pillow shifts (arithmetically: negative sums stay negative) then clamps to 0..255
    return total.bitwise_right_shift_(PRECISION_BITS).clamp_(0, 255).to(torch.uint8)


@lru_cache(maxsize=256)
def lanczos_coefficients(in_size: int, out_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pillow's LANCZOS taps for resizing one axis from ``in_size`` to ``out_size`` pixels.

    Returns int32 ``taps`` and ``weights``, both ``(out_size, ksize)``: output pixel i is
    ``sum_k weights[i, k] * input[taps[i, k]]`` (+ rounding, >> PRECISION_BITS). ``ksize`` is the
    longest window; a shorter window (at the edges) is padded with weight 0 on a clamped index.
    """
    windows = [_window(i, in_size, out_size) for i in range(out_size)]
    ksize = max(len(weights) for _, weights in windows)
    taps = [[min(first + k, in_size - 1) for k in range(ksize)] for first, _ in windows]
    weights = [[_fixed_point(w) for w in weights] + [0] * (ksize - len(weights)) for _, weights in windows]
    return (
        torch.tensor(taps, dtype=torch.int32, device=device),
        torch.tensor(weights, dtype=torch.int32, device=device),
    )


def _window(i: int, in_size: int, out_size: int) -> tuple[int, list[float]]:
    """Output pixel i's first source pixel and normalised weights, in precompute_coeffs' double arithmetic.

    Every operation is Pillow's, in its order, so every double is bit for bit Pillow's: a product by
    the reciprocal of the filter scale, not a division; a sequential sum (``sum()`` is compensated
    since Python 3.12); ``math.sin`` is the C library's ``sin`` that Pillow calls.
    """
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    inverse_filter_scale = 1.0 / filter_scale
    support = LANCZOS_SUPPORT * filter_scale
    center = (i + 0.5) * scale
    first = max(int(center - support + 0.5), 0)  # int() truncates toward zero, as C's cast does
    stop = min(int(center + support + 0.5), in_size)
    weights = [_lanczos((j - center + 0.5) * inverse_filter_scale) for j in range(first, stop)]
    total = 0.0
    for w in weights:
        total += w
    if total != 0.0:
        weights = [w / total for w in weights]
    return first, weights


def _lanczos(x: float) -> float:
    """Pillow's LANCZOS kernel: sinc(x) * sinc(x / 3) on [-3, 3)."""
    return _sinc(x) * _sinc(x / 3) if -LANCZOS_SUPPORT <= x < LANCZOS_SUPPORT else 0.0


def _sinc(x: float) -> float:
    if x == 0.0:
        return 1.0
    x = x * math.pi
    return math.sin(x) / x


def _fixed_point(weight: float) -> int:
    """A weight in 22-bit fixed point, rounded half away from zero (int() truncates toward zero)."""
    scaled = weight * (1 << PRECISION_BITS)
    return int(scaled - 0.5) if weight < 0 else int(scaled + 0.5)
