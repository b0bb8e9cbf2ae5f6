"""Region inputs -> binary masks for PixelRefer.

Users describe a region in whatever form their data already has; everything downstream (crops, patch masks, object
tokens) works on one `(H, W)` boolean mask per region and frame. This module does that conversion once, strictly, and
names the sample / region / frame in every error, because a wrong mask otherwise surfaces much later as a silently
bad answer or an opaque shape error deep inside the image processor.

Accepted region forms (`region_to_mask`):

* **Mask**: numpy array, torch tensor (any device) or PIL image (mode "1", "L", "P", "I" or "F") of shape `(H, W)`;
  leading singleton dimensions (`(1, H, W)`, `(1, 1, H, W)`) are squeezed. The shape must equal the frame size.
  Binary rule:
    - bool: used as is;
    - integer: must contain only {0, 1} or only {0, 255}; non-zero is foreground. Anything else is most likely a
      label map (one id per object), which would silently merge objects, so it is rejected;
    - float: must lie in [0, 1] (soft masks are fine) and a pixel is foreground when its value is **> 0.5**
      (0.5 itself is background). NaN or values outside [0, 1] are rejected.
* **Box**: `[x0, y0, x1, y1]` in pixels (x = column, y = row), as a list, tuple or 1-D array of 4 numbers. Pixels with
  column in `[floor(x0), ceil(x1))` and row in `[floor(y0), ceil(y1))` are foreground, so fractional boxes cover every
  pixel they touch. A box partly outside the frame is clipped to it; one entirely outside is an error.
* **COCO RLE**: `{"size": [h, w], "counts": ...}` with compressed (`str` / `bytes`) or uncompressed (`list[int]`)
  counts, decoded by the pure-numpy codec below (no pycocotools needed). `size` must equal the frame size.
* **Polygons**: `{"polygons": [[x0, y0, x1, y1, ...], ...]}` in COCO polygon convention, rasterised with PIL.

An empty result (no foreground pixel) is always an error: it would produce zero object tokens.
"""

import math
import numbers
import operator

import numpy as np
import torch
from PIL import Image, ImageDraw

ACCEPTED_REGION_FORMS = (
    "a binary mask of shape (H, W) (numpy array, torch tensor, or PIL image in mode '1', 'L', 'P', 'I' or 'F'), "
    "a box [x0, y0, x1, y1] in pixels, a COCO RLE dict {'size': [h, w], 'counts': ...}, "
    "or a polygon dict {'polygons': [[x0, y0, x1, y1, ...], ...]}"
)
_PIL_MASK_MODES = ("1", "L", "P", "I", "F")
# Compressed COCO RLE: each count is written in 5-bit groups, one character per group (`chr(48 + group)`), bit 0x20
# flags "more groups follow", bit 0x10 of the last group is the sign. From the fourth count on, the difference to the
# count two places earlier is written instead of the count itself.
_RLE_CHAR_OFFSET = 48
_RLE_MORE = 0x20
_RLE_SIGN = 0x10
_RLE_GROUP = 0x1F


def _check_rle_size(size) -> tuple[int, int]:
    if not isinstance(size, (list, tuple)) or len(size) != 2:
        raise ValueError(f"RLE 'size' must be [height, width], got {size!r}")
    if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 0 for v in size):
        raise ValueError(f"RLE 'size' must hold two non-negative integers, got {size!r}")
    return int(size[0]), int(size[1])


def _counts_from_string(counts: str) -> list[int]:
    """Parse the compressed counts string (the inverse of `_counts_to_string`)."""
    values: list[int] = []
    value, shift = 0, 0
    for position, char in enumerate(counts):
        code = ord(char) - _RLE_CHAR_OFFSET
        if not 0 <= code <= _RLE_MORE + _RLE_GROUP:
            raise ValueError(f"RLE counts contain invalid character {char!r} at position {position}")
        value |= (code & _RLE_GROUP) << shift
        shift += 5
        if code & _RLE_MORE:
            continue
        if code & _RLE_SIGN:
            value -= 1 << shift
        if len(values) > 2:
            value += values[-2]
        values.append(value)
        value, shift = 0, 0
    if shift:
        raise ValueError("RLE counts string is truncated (its last character announces more data)")
    return values


def _counts_to_string(counts: list[int]) -> str:
    chars: list[str] = []
    for index, count in enumerate(counts):
        value = count - counts[index - 2] if index > 2 else count
        more = True
        while more:
            code = value & _RLE_GROUP
            value >>= 5
            more = value != -1 if code & _RLE_SIGN else value != 0
            chars.append(chr(_RLE_CHAR_OFFSET + (code | _RLE_MORE if more else code)))
    return "".join(chars)


def rle_decode(rle: dict) -> np.ndarray:
    """Decode a COCO RLE dict into an `(H, W)` uint8 array of 0/1.

    Accepts compressed counts (`str` or `bytes`, as written by pycocotools and found in COCO-style json files) and
    uncompressed counts (`list[int]`). Runs alternate background / foreground starting with background and walk the
    mask in column-major order. Raises `ValueError` when the dict does not describe a valid mask, so that a corrupt
    annotation fails loudly instead of producing a garbage region.
    """
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise ValueError("COCO RLE must be a dict with keys 'size' and 'counts'")
    height, width = _check_rle_size(rle["size"])
    counts = rle["counts"]
    if isinstance(counts, bytes):
        try:
            counts = counts.decode("ascii")
        except UnicodeDecodeError as error:
            raise ValueError("RLE counts bytes are not ascii") from error
    if isinstance(counts, str):
        counts = _counts_from_string(counts)
    elif isinstance(counts, (list, tuple)):
        if not all(isinstance(c, numbers.Integral) and not isinstance(c, bool) for c in counts):
            raise ValueError("uncompressed RLE counts must be a list of integers")
        counts = [int(c) for c in counts]
    else:
        raise ValueError(f"RLE counts must be str, bytes or list[int], got {type(counts).__name__}")
    if any(c < 0 for c in counts):
        raise ValueError("RLE counts contain a negative run length")
    if sum(counts) != height * width:
        raise ValueError(f"RLE counts sum to {sum(counts)} but size {height}x{width} needs {height * width}")
    values = np.arange(len(counts), dtype=np.uint8) % 2
    flat = np.repeat(values, counts)
    return np.ascontiguousarray(flat.reshape(width, height).T)


def rle_encode(mask: np.ndarray) -> dict:
    """Encode an `(H, W)` mask (non-zero is foreground) as compressed COCO RLE.

    The result is byte-for-byte what `pycocotools.mask.encode` returns for the same binary mask (with `counts` as an
    ascii `str` so it serialises to json directly), which keeps masks exchangeable with COCO tooling.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"rle_encode expects a 2-D (H, W) mask, got shape {tuple(mask.shape)}")
    height, width = mask.shape
    flat = mask.astype(bool).ravel(order="F")
    if flat.size == 0:
        counts = [0]
    else:
        starts = np.flatnonzero(flat[1:] != flat[:-1]) + 1
        counts = np.diff(np.concatenate(([0], starts, [flat.size]))).tolist()
        if flat[0]:
            counts.insert(0, 0)
    return {"size": [height, width], "counts": _counts_to_string(counts)}


def _is_number_list(value) -> bool:
    return isinstance(value, (list, tuple)) and all(
        isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)) for v in value
    )


def polygons_to_mask(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    """Rasterise COCO polygons (`[[x0, y0, x1, y1, ...], ...]`, pixel coordinates) into an `(H, W)` uint8 0/1 mask.

    Uses PIL `ImageDraw.polygon` (fill and outline) so that no pycocotools is needed. pycocotools' own rasteriser
    (`frPyObjects`) follows a different rule, so the two masks can differ by one pixel along the polygon boundary
    (either way); interiors agree.
    """
    if not isinstance(polygons, (list, tuple)) or not polygons:
        raise ValueError("polygons must be a non-empty list of [x0, y0, x1, y1, ...] lists")
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for index, polygon in enumerate(polygons):
        try:
            coords = np.asarray(polygon, dtype=np.float64) if _is_number_list(polygon) else None
        except OverflowError:  # an integer beyond float64
            coords = None
        if coords is None or coords.size < 6 or coords.size % 2 or not np.isfinite(coords).all():
            raise ValueError(
                f"polygon {index} must be a flat list of at least 3 finite (x, y) pairs [x0, y0, x1, y1, ...]"
            )
        draw.polygon(coords.tolist(), fill=1, outline=1)
    return np.asarray(canvas, dtype=np.uint8).copy()


def check_dense_tensor(tensor: torch.Tensor, where: str) -> None:
    """Refuse a tensor that holds no readable data (meta device) or is not dense (sparse layouts)."""
    if tensor.is_meta or tensor.layout != torch.strided:
        kind = "a meta tensor (it holds no data)" if tensor.is_meta else f"a {tensor.layout} tensor"
        raise ValueError(f"{where}: got {kind}; pass a dense tensor with data (e.g. `.to_dense()`)")


def _to_array(region, where: str) -> np.ndarray:
    """Bring a numpy / torch / PIL mask to a numpy array without changing its values."""
    if isinstance(region, torch.Tensor):
        check_dense_tensor(region, where)
        tensor = region.detach().cpu()
        if tensor.is_floating_point():
            tensor = tensor.float()  # numpy has no bfloat16
        return tensor.numpy()
    if isinstance(region, Image.Image):
        if region.mode not in _PIL_MASK_MODES:
            raise ValueError(
                f"{where}: PIL image mode {region.mode!r} is not a mask; pass a single-channel mask "
                f"(mode {', '.join(repr(m) for m in _PIL_MASK_MODES)})"
            )
        return np.asarray(region)
    return region


def _binarize(array: np.ndarray, where: str) -> np.ndarray:
    """Apply the binary rule of the module docstring."""
    if array.dtype == np.bool_:
        return array
    if np.issubdtype(array.dtype, np.integer):
        offending = np.unique(array[(array != 0) & (array != 1) & (array != 255)])
        if offending.size:
            shown = ", ".join(str(v) for v in offending[:5].tolist()) + (", ..." if offending.size > 5 else "")
            raise ValueError(
                f"{where}: integer mask must contain only 0/1 or only 0/255, found values {shown}; a label map "
                "must be split into one binary mask per region"
            )
        if (array == 1).any() and (array == 255).any():
            raise ValueError(f"{where}: integer mask mixes values 1 and 255; use only 0/1 or only 0/255")
        return array != 0
    if np.issubdtype(array.dtype, np.floating):
        if np.isnan(array).any():
            raise ValueError(f"{where}: float mask contains NaN")
        low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
        if low < 0 or high > 1:
            raise ValueError(
                f"{where}: float mask values must lie in [0, 1] (values > 0.5 are foreground), "
                f"got range [{low:g}, {high:g}]"
            )
        return array > 0.5
    raise ValueError(f"{where}: mask dtype {array.dtype} is not supported; use bool, integer or float")


def _check_size(mask_size: tuple[int, ...], image_size: tuple[int, int], what: str, where: str) -> None:
    if tuple(mask_size) != tuple(image_size):
        raise ValueError(
            f"{where}: {what} is {mask_size[0]}x{mask_size[1]} but the image is {image_size[0]}x{image_size[1]} (H x W)"
        )


def _mask_from_array(array: np.ndarray, image_size: tuple[int, int], where: str) -> np.ndarray:
    squeezed = array
    while squeezed.ndim > 2 and squeezed.shape[0] == 1:
        squeezed = squeezed[0]
    if squeezed.ndim != 2:
        raise ValueError(f"{where}: mask must be 2-D (H, W) after squeezing leading 1s, got shape {array.shape}")
    _check_size(squeezed.shape, image_size, "mask", where)
    return _binarize(squeezed, where)


def mask_to_box(mask: np.ndarray) -> list[int]:
    """`[x0, y0, x1, y1]` (pixels, end exclusive) of the tight bounding box of a non-empty `(H, W)` mask: the box that
    `region_to_mask` turns back into the filled rectangle around it."""
    rows, cols = np.nonzero(mask)
    if not len(rows):
        raise ValueError("an empty mask has no bounding box")
    return [int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1]


def _mask_from_box(box, image_size: tuple[int, int], where: str) -> np.ndarray:
    if len(box) != 4:
        raise ValueError(f"{where}: a box must have exactly 4 numbers [x0, y0, x1, y1], got {len(box)}")
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except OverflowError as error:  # an integer beyond float64
        raise ValueError(f"{where}: box {list(box)!r} holds a number too large for a pixel coordinate") from error
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise ValueError(f"{where}: box {[x0, y0, x1, y1]} contains a non-finite number")
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"{where}: box {[x0, y0, x1, y1]} has zero or negative area (need x1 > x0 and y1 > y0)")
    height, width = image_size
    col0, col1 = max(0, math.floor(x0)), min(width, math.ceil(x1))
    row0, row1 = max(0, math.floor(y0)), min(height, math.ceil(y1))
    if col1 <= col0 or row1 <= row0:
        raise ValueError(f"{where}: box {[x0, y0, x1, y1]} lies entirely outside the {height}x{width} image")
    mask = np.zeros((height, width), dtype=bool)
    mask[row0:row1, col0:col1] = True
    return mask


def _mask_from_dict(region: dict, image_size: tuple[int, int], where: str) -> np.ndarray:
    if "counts" in region or "size" in region:
        # The size is checked against the image before decoding: a hostile `size` would otherwise allocate `h * w`
        # bytes (a decompression bomb in one dict).
        try:
            size = _check_rle_size(region["size"]) if "size" in region and "counts" in region else None
        except ValueError as error:
            raise ValueError(f"{where}: invalid COCO RLE: {error}") from error
        if size is not None:
            _check_size(size, image_size, "RLE mask", where)
        try:
            mask = rle_decode(region)
        except ValueError as error:
            raise ValueError(f"{where}: invalid COCO RLE: {error}") from error
        _check_size(mask.shape, image_size, "RLE mask", where)
        return mask.astype(bool)
    if "polygons" in region:
        try:
            return polygons_to_mask(region["polygons"], *image_size).astype(bool)
        except ValueError as error:
            raise ValueError(f"{where}: invalid polygons: {error}") from error
    keys = sorted(map(str, region))
    raise ValueError(f"{where}: dict region with keys {keys} is not supported; use {ACCEPTED_REGION_FORMS}")


def region_to_mask(region, image_size: tuple[int, int], where: str) -> np.ndarray:
    """Convert one user region into an `(H, W)` bool mask for a frame of size `image_size = (H, W)`.

    See the module docstring for the accepted forms and the binary rule. `where` (e.g. `"sample 2, region 1"`) starts
    every error message so that users can find the offending input in a batch.
    """
    image_size = (int(image_size[0]), int(image_size[1]))
    empty_reason = "no foreground pixel"
    if isinstance(region, (torch.Tensor, np.ndarray, Image.Image)):
        array = _to_array(region, where)
        if array.ndim == 1:
            if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.number):
                raise ValueError(f"{where}: a 1-D region is read as a box [x0, y0, x1, y1] and must hold numbers")
            mask = _mask_from_box(array.tolist(), image_size, where)
        elif array.ndim == 0:
            raise ValueError(f"{where}: a 0-d value is not a region; use {ACCEPTED_REGION_FORMS}")
        else:
            mask = _mask_from_array(array, image_size, where)
            if np.issubdtype(array.dtype, np.floating):
                empty_reason = "no pixel > 0.5"
    elif _is_number_list(region):
        mask = _mask_from_box(region, image_size, where)
    elif isinstance(region, dict):
        mask = _mask_from_dict(region, image_size, where)
    else:
        raise ValueError(f"{where}: unsupported region of type {type(region).__name__}; use {ACCEPTED_REGION_FORMS}")
    if not mask.any():
        raise ValueError(f"{where}: mask is empty ({empty_reason})")
    return mask


def validate_frame_index(frame_index, num_frames: int, where: str) -> int:
    """Return `frame_index` as an `int`, or raise a `ValueError` naming `where`.

    Integers of any flavour (Python, numpy, 0-d integer tensors) are accepted; bools and floats are rejected because
    `True` or `2.0` as a frame index is almost always a bug in the caller's data, not an intended frame.
    """
    is_bool = isinstance(frame_index, (bool, np.bool_)) or (
        isinstance(frame_index, torch.Tensor) and frame_index.dtype == torch.bool
    )
    try:
        index = None if is_bool else operator.index(frame_index)
    except TypeError:
        index = None
    if index is None:
        raise ValueError(f"{where}: frame index must be an integer, got {type(frame_index).__name__} {frame_index!r}")
    if not 0 <= index < num_frames:
        raise ValueError(f"{where}: frame index {index} is out of range for a video with {num_frames} frames")
    return index
