"""Small synthetic images and masks shared by the tests."""

import numpy as np
from PIL import Image


def random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """`(height, width, 3)` uint8 noise, the same for the same seed."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def random_pil_image(height: int, width: int, seed: int = 0) -> Image.Image:
    """`random_image` as a PIL image (how datasets hand images to the collator)."""
    return Image.fromarray(random_image(height, width, seed))


def box_mask(height: int, width: int, rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
    """A `(height, width)` bool mask that is True on `rows[0]:rows[1]` x `cols[0]:cols[1]`."""
    mask = np.zeros((height, width), dtype=bool)
    mask[rows[0] : rows[1], cols[0] : cols[1]] = True
    return mask
