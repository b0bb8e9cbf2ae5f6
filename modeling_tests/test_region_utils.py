"""Tests of region parsing: RLE codec (checked against pycocotools), mask / box / RLE forms, and error messages."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# The package is flat remote code under src/ and is not installed in the test environment.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from pixelrefer_hf.region_utils import (  # noqa: E402
    mask_to_box,
    polygons_to_mask,
    region_to_mask,
    rle_decode,
    rle_encode,
    validate_frame_index,
)

WHERE = "sample 2, region 1"
SIZE = (6, 8)


def _random_masks() -> list[np.ndarray]:
    """Masks of odd shapes and densities, including runs long enough to need several RLE characters."""
    rng = np.random.default_rng(0)
    masks = [np.zeros((5, 7), np.uint8), np.ones((5, 7), np.uint8), np.zeros((0, 4), np.uint8)]
    for shape in [(1, 1), (1, 23), (19, 1), (7, 13), (33, 5), (64, 47)]:
        for density in (0.05, 0.5, 0.95):
            masks.append((rng.random(shape) < density).astype(np.uint8))
    sparse = np.zeros((3, 40000), np.uint8)
    sparse[1, [5, 17, 30000, 39999]] = 1
    masks.append(sparse)
    return masks


def _reference_mask() -> np.ndarray:
    mask = np.zeros(SIZE, dtype=bool)
    mask[1:4, 2:7] = True
    return mask


# ---------------------------------------------------------------------------------------------------------------- RLE


@pytest.mark.parametrize("mask", _random_masks(), ids=lambda m: "x".join(map(str, m.shape)))
def test_rle_round_trip(mask):
    rle = rle_encode(mask)
    assert rle["size"] == list(mask.shape)
    assert isinstance(rle["counts"], str)
    decoded = rle_decode(rle)
    assert decoded.dtype == np.uint8 and decoded.shape == mask.shape
    np.testing.assert_array_equal(decoded, mask)
    np.testing.assert_array_equal(rle_decode({**rle, "counts": rle["counts"].encode()}), mask)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside pycocotools
def test_rle_matches_pycocotools():
    mask_utils = pytest.importorskip("pycocotools.mask")
    for mask in _random_masks():
        reference = mask_utils.encode(np.asfortranarray(mask))
        assert rle_encode(mask) == {"size": reference["size"], "counts": reference["counts"].decode("ascii")}
        np.testing.assert_array_equal(rle_decode(reference), mask_utils.decode(reference))


def test_rle_decode_uncompressed_is_column_major():
    # Column-major walk (0,0) (1,0) (0,1) (1,1) (0,2) (1,2): one 0, four 1s, one 0.
    expected = np.array([[0, 1, 1], [1, 1, 0]], dtype=np.uint8)
    np.testing.assert_array_equal(rle_decode({"size": [2, 3], "counts": [1, 4, 1]}), expected)
    np.testing.assert_array_equal(rle_decode({"size": [2, 3], "counts": [0, 6]}), np.ones((2, 3), np.uint8))


@pytest.mark.parametrize(
    ("rle", "match"),
    [
        ({"size": [2, 3]}, "keys 'size' and 'counts'"),
        ({"size": [2], "counts": [6]}, "size"),
        ({"size": [2, 3], "counts": [1, -1, 6]}, "negative"),
        ({"size": [2, 3], "counts": [1, 2]}, "sum to 3 but size 2x3 needs 6"),
        ({"size": [2, 3], "counts": 6}, "must be str, bytes or list"),
        ({"size": [2, 3], "counts": [1.5, 4.5]}, "list of integers"),
        ({"size": [2, 3], "counts": "0~"}, "invalid character '~' at position 1"),
        ({"size": [2, 3], "counts": "0P"}, "truncated"),
        ({"size": [2, 3], "counts": b"\xff"}, "not ascii"),
    ],
)
def test_rle_decode_errors(rle, match):
    with pytest.raises(ValueError, match=match):
        rle_decode(rle)


def test_polygons_to_mask():
    mask = polygons_to_mask([[1, 1, 5, 1, 5, 3, 1, 3]], *SIZE)
    expected = np.zeros(SIZE, np.uint8)
    expected[1:4, 1:6] = 1
    np.testing.assert_array_equal(mask, expected)


# ------------------------------------------------------------------------------------------------------ region forms


def _mask_forms() -> dict[str, object]:
    base = _reference_mask()
    soft = np.where(base, 0.9, 0.2).astype(np.float32)
    return {
        "numpy_bool": base,
        "numpy_uint8_01": base.astype(np.uint8),
        "numpy_uint8_0255": base.astype(np.uint8) * 255,
        "numpy_int64_01": base.astype(np.int64),
        "numpy_float_soft": soft,
        "numpy_leading_ones": base[None, None],
        "torch_bool": torch.from_numpy(base),
        "torch_bfloat16": torch.from_numpy(soft).to(torch.bfloat16)[None],
        "pil_L": Image.fromarray(base.astype(np.uint8) * 255),
        "pil_1": Image.fromarray(base),
        "pil_F": Image.fromarray(soft),
        "rle_compressed": rle_encode(base),
        "rle_uncompressed": {"size": list(SIZE), "counts": [13, 3, 3, 3, 3, 3, 3, 3, 3, 3, 8]},
        "polygons": {"polygons": [[2, 1, 6, 1, 6, 3, 2, 3]]},
        "box_list": [2, 1, 7, 4],
        "box_numpy": np.array([2.0, 1.0, 7.0, 4.0]),
        "box_torch": torch.tensor([2, 1, 7, 4]),
    }


@pytest.mark.parametrize("name", list(_mask_forms()))
def test_region_forms(name):
    mask = region_to_mask(_mask_forms()[name], SIZE, WHERE)
    assert mask.dtype == np.bool_ and mask.shape == SIZE
    np.testing.assert_array_equal(mask, _reference_mask())


def test_float_threshold_is_strictly_above_half():
    soft = np.full(SIZE, 0.5, dtype=np.float32)
    soft[0, 0] = 0.51
    mask = region_to_mask(soft, SIZE, WHERE)
    assert mask.sum() == 1 and mask[0, 0]


@pytest.mark.parametrize(
    ("box", "rows", "cols"),
    [
        ([0, 0, 8, 6], (0, 6), (0, 8)),
        ([1.2, 0.5, 3.1, 2.0], (0, 2), (1, 4)),
        ((2.9, 3.0, 3.1, 3.5), (3, 4), (2, 4)),
        ([-5, -2, 3, 2], (0, 2), (0, 3)),
        ([6.5, 4, 100, 100], (4, 6), (6, 8)),
    ],
)
def test_box(box, rows, cols):
    expected = np.zeros(SIZE, dtype=bool)
    expected[rows[0] : rows[1], cols[0] : cols[1]] = True
    np.testing.assert_array_equal(region_to_mask(box, SIZE, WHERE), expected)


# ------------------------------------------------------------------------------------------------------------ errors


def _error_cases() -> dict[str, tuple[object, str]]:
    base = _reference_mask()
    label_map = base.astype(np.int32) * 3
    label_map[0, :2] = [7, 1]
    return {
        "empty_float": (np.full(SIZE, 0.5, np.float32), r"mask is empty \(no pixel > 0\.5\)"),
        "empty_bool": (np.zeros(SIZE, bool), "mask is empty"),
        "empty_rle": (rle_encode(np.zeros(SIZE, np.uint8)), "mask is empty"),
        "size_mismatch": (np.ones((4, 8), bool), r"mask is 4x8 but the image is 6x8 \(H x W\)"),
        "label_map": (label_map, "only 0/1 or only 0/255, found values 3, 7"),
        "mixed_1_255": (np.where(base, 255, np.eye(*SIZE, dtype=np.uint8)), "mixes values 1 and 255"),
        "float_out_of_range": (base * 2.0, r"must lie in \[0, 1\].*range \[0, 2\]"),
        "float_negative": (base - 0.5, r"must lie in \[0, 1\]"),
        "nan": (np.where(base, np.nan, 0.0), "NaN"),
        "pil_rgb": (Image.new("RGB", (8, 6)), "mode 'RGB' is not a mask; pass a single-channel mask"),
        "three_d": (np.ones((2, 6, 8), bool), r"2-D \(H, W\).*shape \(2, 6, 8\)"),
        "complex": (np.ones(SIZE, np.complex64), "dtype complex64 is not supported"),
        "zero_area_box": ([3, 1, 3, 4], "zero or negative area"),
        "negative_area_box": ([5, 4, 2, 1], "zero or negative area"),
        "box_outside": ([8, 0, 12, 3], "entirely outside the 6x8 image"),
        "box_outside_negative": ([-4, -4, 0, 0], "entirely outside"),
        "box_three_numbers": ([1, 2, 3], "exactly 4 numbers.*got 3"),
        "box_inf": ([0, 0, float("inf"), 3], "non-finite"),
        "box_bool_vector": (np.array([True, False, True, True]), "must hold numbers"),
        "rle_corrupt": ({"size": list(SIZE), "counts": "a#b"}, "invalid COCO RLE: .*invalid character '#'"),
        "rle_bad_sum": ({"size": list(SIZE), "counts": [10, 5]}, "invalid COCO RLE: RLE counts sum to 15 but size 6x8"),
        "rle_size_mismatch": (rle_encode(np.ones((3, 8), np.uint8)), "RLE mask is 3x8 but the image is 6x8"),
        "bad_polygon": ({"polygons": [[1, 2, 3]]}, "invalid polygons: polygon 0"),
        "other_dict": ({"bbox": [1, 2, 3, 4]}, r"keys \['bbox'\] is not supported; use a binary mask"),
        "none": (None, "unsupported region of type NoneType; use a binary mask"),
        "string": ("mask.png", "unsupported region of type str"),
        "nested_list": ([[0, 1], [1, 0]], "unsupported region of type list.*a box"),
        "scalar_array": (np.array(1), "0-d value is not a region"),
    }


@pytest.mark.parametrize("name", list(_error_cases()))
def test_region_errors_name_where(name):
    region, match = _error_cases()[name]
    with pytest.raises(ValueError, match=match) as info:
        region_to_mask(region, SIZE, WHERE)
    assert str(info.value).startswith(WHERE + ": ")


def test_label_map_lists_at_most_five_values():
    label_map = np.arange(48, dtype=np.int64).reshape(SIZE)
    with pytest.raises(ValueError, match=r"found values 2, 3, 4, 5, 6, \.\.\."):
        region_to_mask(label_map, SIZE, WHERE)


# ------------------------------------------------------------------------------------------------------- frame index


@pytest.mark.parametrize("index", [0, 4, np.int64(2), torch.tensor(3)])
def test_frame_index_valid(index):
    assert validate_frame_index(index, 5, WHERE) == int(index)
    assert type(validate_frame_index(index, 5, WHERE)) is int


@pytest.mark.parametrize(
    ("index", "match"),
    [
        (5, "frame index 5 is out of range for a video with 5 frames"),
        (-1, "frame index -1 is out of range"),
        (2.0, "must be an integer, got float 2.0"),
        (True, "must be an integer, got bool True"),
        (np.bool_(False), "must be an integer"),
        ("1", "must be an integer, got str"),
    ],
)
def test_frame_index_errors(index, match):
    where = "sample 0, region 3, frame 5"
    with pytest.raises(ValueError, match=match) as info:
        validate_frame_index(index, 5, where)
    assert str(info.value).startswith(where + ": ")


def test_mask_to_box_is_the_tight_box_that_region_to_mask_fills_back():
    mask = np.zeros(SIZE, bool)
    mask[1, 2] = mask[4, 6] = mask[3, 3] = True
    box = mask_to_box(mask)
    assert box == [2, 1, 7, 5]
    filled = region_to_mask(box, SIZE, WHERE)
    assert filled.sum() == 5 * 4 and (filled >= mask).all()
    with pytest.raises(ValueError, match="empty mask"):
        mask_to_box(np.zeros(SIZE, bool))
