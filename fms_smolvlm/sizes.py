"""HF's resize arithmetic for SmolVLM's image and video processors, in HF's exact order of operations (pure
integer and float arithmetic: the sizes decide the tiles, and so the tokens)."""

import math

MAX_RESIZED_EDGE = 4096  # HF's absolute cap on a resized image or frame


def even_longest_edge(height: int, width: int, longest_edge: int) -> tuple[int, int]:
    """Scale so the longest side is ``longest_edge`` (up or down), the other by the aspect ratio rounded up to
    even, at least 1."""
    aspect_ratio = width / height
    if width >= height:
        width = longest_edge
        height = int(width / aspect_ratio)
        height += height % 2
    else:
        height = longest_edge
        width = int(height * aspect_ratio)
        width += width % 2
    return max(height, 1), max(width, 1)


def longest_edge_size(height: int, width: int, longest_edge: int) -> tuple[int, int]:
    """The image processor's first resize: :func:`even_longest_edge`, then capped at 4096 (keeping the aspect
    ratio, not the evenness)."""
    height, width = even_longest_edge(height, width, longest_edge)
    aspect_ratio = width / height
    if width >= height and width > MAX_RESIZED_EDGE:
        width = MAX_RESIZED_EDGE
        height = int(width / aspect_ratio)
    elif height > width and height > MAX_RESIZED_EDGE:
        height = MAX_RESIZED_EDGE
        width = int(height * aspect_ratio)
    return max(height, 1), max(width, 1)


def resized_frame_size(height: int, width: int, longest_edge: int) -> tuple[int, int]:
    """The video processor's ``get_resize_output_image_size``: the cap applies to ``longest_edge`` first."""
    return even_longest_edge(height, width, min(MAX_RESIZED_EDGE, longest_edge))


def tile_grid_size(height: int, width: int, tile: int) -> tuple[int, int]:
    """Round up to whole tiles, the long side first and the other from the aspect ratio."""
    aspect_ratio = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect_ratio) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect_ratio) / tile) * tile
    return height, width
