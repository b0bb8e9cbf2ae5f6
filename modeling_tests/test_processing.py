"""Tests of the data side: tiny tokenizer, `PixelReferImageProcessor`, `PixelReferProcessor`.

Expected crop sizes below are computed by hand from the rules of `docs/design.md` ("Scale-adaptive crop") with
P = 14, n = 32, pad = 28, max patches 100 (PixelRefer) / 50 (Lite).
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from synthetic_inputs import box_mask, random_image
from transformers.models.video_llama_3.image_processing_pil_video_llama_3 import VideoLlama3ImageProcessorPil

from pixelrefer_hf.image_processing_pixelrefer import (
    PixelReferImageProcessor,
    _bilinear,
    _box_resize,
    _opencv_linear_support,
    _torch_uint8_bilinear,
    object_token_count,
)
from pixelrefer_hf.processing_pixelrefer import PixelReferProcessor
from pixelrefer_hf.tokenizer_assets import CHAT_TEMPLATE, SPECIAL_TOKENS, build_tiny_tokenizer

VARIANTS = ["pixelrefer", "pixelrefer-lite"]
IMAGE_ID, REGION_ID = 3, 4  # ids of `<image>` and `<REGION>` in the tiny tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture
def make_processor(tokenizer):
    def make(variant: str = "pixelrefer", **kwargs) -> PixelReferProcessor:
        image_processor = PixelReferImageProcessor(variant=variant, **kwargs)
        return PixelReferProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)

    return make


def split_rows(tensor: torch.Tensor, grid_thw: torch.Tensor) -> list[torch.Tensor]:
    return list(tensor.split(grid_thw.prod(-1).tolist()))


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------------


def test_tiny_tokenizer_round_trip_and_special_tokens(tokenizer):
    assert 500 <= len(tokenizer) <= 600
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.convert_tokens_to_ids(token) == expected_id
        assert tokenizer.encode(token, add_special_tokens=False) == [expected_id]
    assert (tokenizer.pad_token, tokenizer.eos_token, tokenizer.bos_token) == ("<|endoftext|>", "<|im_end|>", None)

    text = "<|im_start|>user\n<image><image>\nWhat is [<REGION><REGION>] on the left? Time 1.5s: 42 é<|im_end|>"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert ids.count(IMAGE_ID) == 2 and ids.count(REGION_ID) == 2
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\n\nWhat is [] on the left? Time 1.5s: 42 é"
    # Training is deterministic.
    assert build_tiny_tokenizer().get_vocab() == tokenizer.get_vocab()


# ----------------------------------------------------------------------------------------------------------------
# Image processor: token counts, crops, masks, boxes
# ----------------------------------------------------------------------------------------------------------------


def test_object_token_count():
    assert object_token_count(5, 32, "pixelrefer") == 5
    assert object_token_count(90, 32, "pixelrefer") == 32
    assert object_token_count(5, 32, "pixelrefer-lite") == 32
    with pytest.raises(ValueError, match="variant must be one of"):
        object_token_count(5, 32, "pixelrefer-xl")


def test_image_processor_defaults_and_config_round_trip():
    lite = PixelReferImageProcessor(variant="pixelrefer-lite")
    assert (lite.max_object_patches, lite.legacy_local_crop_reuse) == (50, True)
    full = PixelReferImageProcessor()
    assert (full.max_object_patches, full.legacy_local_crop_reuse) == (100, False)
    assert tuple(full.image_mean) == tuple(full.image_std) == (0.5, 0.5, 0.5)

    custom = PixelReferImageProcessor(variant="pixelrefer-lite", num_object_tokens=8, max_visual_tokens=512)
    reloaded = PixelReferImageProcessor.from_dict(custom.to_dict())
    assert reloaded.to_dict() == custom.to_dict()
    assert (reloaded.num_object_tokens, reloaded.max_visual_tokens, reloaded.variant) == (8, 512, "pixelrefer-lite")
    with pytest.raises(ValueError, match="variant must be one of"):
        PixelReferImageProcessor(variant="lite")


# (frame size, object rows/cols, expected grid) per variant; see the module docstring for the rules.
CROP_CASES = {
    # 7x7 object, A = 49: r = ceil(sqrt(196 * 32 / 49)) = 12; box rows [62, 124]; PixelRefer crop 62 px,
    # Lite 63 px; ceil(62 * 12 / 14) = ceil(63 * 12 / 14) = 54 -> upscaled to 54 x 54 patches.
    "small": ((200, 200), (90, 97), {"pixelrefer": 54, "pixelrefer-lite": 54}),
    # 84x84 object = 36 patches: r = 1 and 36 <= 50 -> kept; crop 139 (PixelRefer) / 140 (Lite) px -> 10 patches.
    "medium": ((224, 224), (28, 112), {"pixelrefer": 10, "pixelrefer-lite": 10}),
    # 200x200 object = 204 patches: PixelRefer r = 1 / sqrt(204.08 / 100) = 0.700, crop 255 px -> ceil(12.75) = 13;
    # Lite r = 1 / sqrt(204.08 / 50) = 0.495, crop 256 px -> ceil(9.05) = 10.
    "large": ((300, 300), (50, 250), {"pixelrefer": 13, "pixelrefer-lite": 10}),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", list(CROP_CASES))
def test_scale_adaptive_crop_sizes(variant, case):
    (height, width), (start, end), expected_side = CROP_CASES[case]
    image_processor = PixelReferImageProcessor(variant=variant)
    mask = box_mask(height, width, (start, end), (start, end))
    features, layouts = image_processor.preprocess_multimodal(images=[random_image(height, width)], regions=[[mask]])
    side = expected_side[variant]
    assert features["region_grid_thw"].tolist() == [[1, side, side]]
    assert features["region_pixel_values"].shape == (side * side, 3 * 14 * 14)
    assert features["region_patch_masks"].shape == (side * side,)

    masked = int(features["region_patch_masks"].sum())
    if case == "small":
        assert masked >= 32  # the object now covers at least n patches
    elif case == "large":
        # about max_object_patches: 10.2 (PixelRefer) / 7.1 (Lite) patches per side before the patch threshold
        target = image_processor.max_object_patches
        assert target <= masked <= 1.3 * target
    else:
        assert masked == 36  # native resolution: 6 x 6 patches
    assert layouts[0].region_token_counts == [[object_token_count(masked, 32, variant)]]


def test_crop_is_clamped_into_the_per_crop_budget():
    # max_visual_tokens = 64 shared by 2 crops -> at most 32 patches per crop (the 7x7 object alone would take 54^2).
    image_processor = PixelReferImageProcessor(max_visual_tokens=64)
    mask = box_mask(200, 200, (90, 97), (90, 97))
    features, layouts = image_processor.preprocess_multimodal(images=[random_image(200, 200)], regions=[[mask, mask]])
    patches = features["region_grid_thw"].prod(-1)
    assert patches.tolist() == [25, 25]  # smart_resize(756, 756, 14, max_pixels=32 * 196) -> 70 x 70
    masked = [int(m.sum()) for m in split_rows(features["region_patch_masks"], features["region_grid_thw"])]
    assert layouts[0].region_token_counts == [[min(32, masked[0])], [min(32, masked[1])]]
    assert masked[0] < 32  # PixelRefer then emits fewer than n tokens


@pytest.mark.parametrize("variant", VARIANTS)
def test_patch_mask_is_aligned_with_region_pixel_values(variant):
    # A white 84x84 object on black, aligned with the 14-px patch grid of the (almost) unscaled crop.
    image = np.zeros((224, 224, 3), dtype=np.uint8)
    image[28:112, 28:112] = 255
    mask = box_mask(224, 224, (28, 112), (28, 112))
    features, _ = PixelReferImageProcessor(variant=variant).preprocess_multimodal(images=[image], regions=[[mask]])
    grid = features["region_grid_thw"][0, 1:].tolist()
    patch_mask = features["region_patch_masks"].reshape(grid)
    expected = torch.zeros(grid)
    expected[2:8, 2:8] = 1  # object rows / cols 28..111 = patches 2..7
    assert torch.equal(patch_mask, expected)
    # Row r of region_pixel_values is patch r in raster order: white patches are exactly the masked ones.
    patch_is_white = features["region_pixel_values"].mean(-1) > 0
    assert torch.equal(patch_is_white, features["region_patch_masks"].bool())


def test_crop_window_and_region_boxes_both_conventions():
    # Inside: rows 40..59, cols 50..89 of 120x160. Border: rows 100..119, cols 140..159 (touches bottom/right).
    inside = box_mask(120, 160, (40, 60), (50, 90))
    border = box_mask(120, 160, (100, 120), (140, 160))
    expected_boxes = [[12, 22, 87, 117], [72, 112, 119, 159]]  # (top, left, bottom, right), inclusive
    windows = {
        "pixelrefer": [(12, 22, 87, 117), (72, 112, 119, 159)],  # official off-by-one: exclusive end = bottom
        "pixelrefer-lite": [(12, 22, 88, 118), (72, 112, 120, 160)],  # exclusive end = bottom + 1
    }
    for variant in VARIANTS:
        image_processor = PixelReferImageProcessor(variant=variant)
        for mask, box, window in zip((inside, border), expected_boxes, windows[variant], strict=True):
            assert image_processor.crop_window(mask) == (tuple(box), window)
        features, _ = image_processor.preprocess_multimodal(images=[random_image(120, 160)], regions=[[inside, border]])
        assert features["region_boxes"].tolist() == expected_boxes
        assert features["region_boxes"].dtype == torch.float32
        assert features["region_image_sizes"].tolist() == [[120, 160], [120, 160]]


def test_thin_object_on_the_dropped_border_row_still_gets_tokens():
    # A one-pixel line on the last row: PixelRefer's crop window excludes it, yet one patch is kept.
    mask = box_mask(100, 100, (99, 100), (20, 80))
    features, layouts = PixelReferImageProcessor().preprocess_multimodal(
        images=[random_image(100, 100)], regions=[[mask]]
    )
    assert features["region_patch_masks"].sum() >= 1
    assert layouts[0].region_token_counts[0][0] >= 1


# ----------------------------------------------------------------------------------------------------------------
# Patch-grid masks: the official rules
# ----------------------------------------------------------------------------------------------------------------

# x86 CPUs with AVX2 run torch's vectorised uint8 kernel; torch's portable fallback (other CPUs) reads the wrong rows
# when the output is one column wide, which the emulation does not reproduce.
VECTORISED_TORCH = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def official_uint8_resize(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """What the official PixelRefer crop function computes: torch's bilinear resize of a uint8 mask."""
    resized = torch.nn.functional.interpolate(
        torch.from_numpy(np.ascontiguousarray(mask))[None, None], size=size, mode="bilinear", align_corners=False
    )
    return resized[0, 0].numpy()


def rounding_edge_cases() -> list[tuple[np.ndarray, tuple[int, int]]]:
    """uint8 masks and output sizes that hit the uint8 kernel's rounding: exact 0.25 / 0.5 interpolation values,
    thin lines, odd sizes, up- and downscaling, one-pixel sizes, 22 x 22 grids, and arbitrary uint8 values."""
    rng = np.random.default_rng(0)
    cases = []
    for row, col in np.ndindex(4, 4):  # one pixel halved both ways: exactly 0.25 at one output
        mask = np.zeros((8, 8), np.uint8)
        mask[row, col] = 1
        cases.append((mask, (4, 4)))
    for size_in in (2, 5, 9, 22, 44, 45, 67, 69, 97, 330):  # a cross of one-pixel lines: 0.5 when halved
        mask = np.zeros((size_in, size_in + 1), np.uint8)
        mask[size_in // 2, :] = 1
        mask[:, size_in // 3] = 1
        diagonal = np.eye(size_in, size_in + 1, dtype=np.uint8)
        for size_out in (1, 2, 3, 11, 15, 22, 23, 44, 130):
            cases += [(mask, (size_out, size_out + 2)), (diagonal, (size_out + 1, size_out))]
    for size in range(23, 330, 9):  # blobs on 22 x 22 grids (video frames) from crops of many sizes
        blob = rng.random((size, size + 5)) < 0.35
        cases.append((blob.astype(np.uint8), (22, 22)))
    for index in range(400):  # anything: odd sizes, up and down, 1-pixel axes, full uint8 range
        height, width = (int(v) for v in rng.integers(1, 90, size=2))
        size_out = tuple(int(v) for v in rng.integers(1, 60, size=2))
        if index % 3 == 2:
            mask = rng.integers(0, 256, (height, width), dtype=np.uint8)
        else:
            mask = (rng.random((height, width)) < rng.random()).astype(np.uint8)
        cases.append((mask, size_out))
    return cases


@pytest.mark.parametrize("threads", [1, 2])
def test_uint8_mask_resize_equals_torch_interpolate(threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        compared = rounded_up = 0
        for mask, size in rounding_edge_cases():
            if size[1] == 1 and not VECTORISED_TORCH:
                continue
            expected = official_uint8_resize(mask, size)
            np.testing.assert_array_equal(_torch_uint8_bilinear(mask, *size), expected, err_msg=f"{mask.shape} {size}")
            compared += 1
            if mask.max() <= 1:
                # Where interpolating in float and keeping values >= 0.5 (the rule this replaces) loses patches.
                rounded_up += int(((expected > 0) != (_bilinear(mask, *size) >= 0.5)).any())
    finally:
        torch.set_num_threads(previous)
    assert compared > 550 and rounded_up > 100


def test_uint8_mask_resize_equals_torch_portable_kernel(tmp_path):
    """torch's portable kernel (ATEN_CPU_CAPABILITY=default, what CPUs without AVX2 run) agrees on outputs at least two
    columns wide."""
    cases = [(mask, size) for mask, size in rounding_edge_cases() if size[1] > 1]
    np.savez(tmp_path / "cases.npz", *[mask for mask, _ in cases])
    (tmp_path / "sizes.json").write_text(json.dumps([size for _, size in cases]))
    child = textwrap.dedent(
        """
        import json, sys
        import numpy as np, torch
        masks = np.load(sys.argv[1] + "/cases.npz")
        sizes = json.loads(open(sys.argv[1] + "/sizes.json").read())
        out = {}
        for i, size in enumerate(sizes):
            mask = torch.from_numpy(masks[f"arr_{i}"])[None, None]
            resized = torch.nn.functional.interpolate(mask, size=size, mode="bilinear", align_corners=False)
            out[f"arr_{i}"] = resized[0, 0].numpy()
        np.savez(sys.argv[1] + "/resized.npz", **out)
        print(torch.backends.cpu.get_cpu_capability())
        """
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-c", child, str(tmp_path)], check=False, env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "DEFAULT"
    resized = np.load(tmp_path / "resized.npz")
    for i, (mask, size) in enumerate(cases):
        np.testing.assert_array_equal(_torch_uint8_bilinear(mask, *size), resized[f"arr_{i}"], err_msg=str(size))


def test_pixelrefer_patch_masks_round_like_the_official_uint8_resize():
    # A 13 x 11 object: its crop (68 x 66 rows / cols) is upscaled x7 and its mask halved onto a 34 x 33 grid; the
    # corner patch covers one mask pixel of four (0.25 in float), which the official uint8 kernel keeps.
    mask = box_mask(120, 120, (40, 53), (50, 61))
    image_processor = PixelReferImageProcessor()
    features, _ = image_processor.preprocess_multimodal(images=[random_image(120, 120)], regions=[[mask]])
    top, left, bottom, right = (int(v) for v in features["region_boxes"][0])
    grid = tuple(features["region_grid_thw"][0, 1:].tolist())
    expected = official_uint8_resize(mask[top:bottom, left:right].astype(np.uint8), grid) > 0
    assert grid == (34, 33) and int(expected.sum()) == 42  # interpolating in float and keeping >= 0.5 gave 41
    assert torch.equal(features["region_patch_masks"].bool(), torch.from_numpy(expected).flatten())

    # Video: every crop of a moving, irregular object follows the same rule.
    rng = np.random.default_rng(1)
    rows, cols = np.mgrid[0:96, 0:128]
    frames = [random_image(96, 128, seed) for seed in range(4)]
    region = {}
    for t in range(4):
        blob = np.hypot((rows - 40 - 3 * t) / 1.3, cols - 50 - 5 * t) < 9 + 2 * t
        region[t] = blob & (rng.random((96, 128)) < 0.9)
    features, _ = image_processor.preprocess_multimodal(videos=[frames], regions=[[region]])
    grids = features["region_grid_thw"]
    for t, (patch_mask, box, grid) in enumerate(
        zip(split_rows(features["region_patch_masks"], grids), features["region_boxes"], grids, strict=True)
    ):
        top, left, bottom, right = (int(v) for v in box)
        crop = region[t][top:bottom, left:right].astype(np.uint8)
        expected = official_uint8_resize(crop, (int(grid[1]), int(grid[2]))) > 0
        assert torch.equal(patch_mask.bool(), torch.from_numpy(expected).flatten()), t


@pytest.mark.parametrize("backend", ["opencv", "numpy"])
def test_lite_patch_masks_follow_opencv_on_the_float_mask(backend):
    """Official Lite: `cv2.resize(float32 mask, INTER_LINEAR) > 0`; "numpy" emulates OpenCV's own kernels (compared
    with Intel IPP off, which opencv-python otherwise uses for some float resizes, adding ~1e-15 weights)."""
    import cv2

    image_processor = PixelReferImageProcessor(variant="pixelrefer-lite", resize_backend=backend)
    rng = np.random.default_rng(2)
    # The first object's patch-grid rows sample the mask exactly on its last row (OpenCV weighs it 0; interpolating
    # in float64 gave it ~1e-15 and kept 6 patches more).
    boxes = [((79, 108), (133, 160))]
    for _ in range(12):
        top, left = (int(v) for v in rng.integers(0, 100, size=2))
        boxes.append(((top, top + int(rng.integers(2, 40))), (left, left + int(rng.integers(2, 50)))))
    masks = [box_mask(120, 160, rows, cols) & (rng.random((120, 160)) < 0.95) for rows, cols in boxes]
    masks[0] = box_mask(120, 160, *boxes[0])
    features, _ = image_processor.preprocess_multimodal(images=[random_image(120, 160)], regions=[masks])
    grids = features["region_grid_thw"]
    use_ipp = cv2.ipp.useIPP()
    cv2.ipp.setUseIPP(backend == "opencv" and use_ipp)
    try:
        for i, (patch_mask, box, grid) in enumerate(
            zip(split_rows(features["region_patch_masks"], grids), features["region_boxes"], grids, strict=True)
        ):
            top, left, bottom, right = (int(v) for v in box)
            crop = masks[i][top : bottom + 1, left : right + 1].astype(np.float32)
            soft = cv2.resize(crop, (int(grid[2]), int(grid[1])), interpolation=cv2.INTER_LINEAR)
            assert torch.equal(patch_mask.bool(), torch.from_numpy(soft > 0).flatten()), i
            if i == 0:
                assert int(patch_mask.sum()) == 36
    finally:
        cv2.ipp.setUseIPP(use_ipp)


def test_opencv_linear_support_equals_opencv_without_ipp():
    import cv2

    use_ipp = cv2.ipp.useIPP()
    cv2.ipp.setUseIPP(False)
    try:
        for mask, size in rounding_edge_cases():
            if mask.max() > 1:
                continue
            soft = cv2.resize(mask.astype(np.float32), size[::-1], interpolation=cv2.INTER_LINEAR)
            np.testing.assert_array_equal(_opencv_linear_support(mask, *size), soft.reshape(size) > 0, str(size))
    finally:
        cv2.ipp.setUseIPP(use_ipp)


def test_global_images_match_videollama3(make_processor):
    image = Image.fromarray(random_image(200, 300))
    features, layouts = make_processor(max_visual_tokens=64).image_processor.preprocess_multimodal(
        images=[[image, image]]
    )
    # Two images share the 64-token budget (merge 1): VideoLLaMA3 with max_pixels = 32 * 14^2 per image.
    reference = VideoLlama3ImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": 32 * 196})(
        [image, image], return_tensors="pt"
    )
    assert torch.equal(features["pixel_values"], reference["pixel_values"])
    assert torch.equal(features["image_grid_thw"], reference["image_grid_thw"])
    assert features["image_merge_sizes"].tolist() == [1, 1]
    tokens = reference["image_grid_thw"].prod(-1).tolist()
    assert layouts[0].visual_token_counts == tokens and max(tokens) <= 32
    assert features["image_keep_mask"].all() and features["image_keep_mask"].numel() == sum(tokens)


def test_image_input_types_are_equivalent(make_processor):
    array = random_image(60, 80)
    mask = box_mask(60, 80, (10, 30), (20, 50))
    processor = make_processor()
    inputs = [
        Image.fromarray(array),
        array,
        torch.from_numpy(array).permute(2, 0, 1),
        torch.from_numpy(array).permute(2, 0, 1).float() / 255,
    ]
    outputs = [processor(text="<region>", images=image, regions=[mask], return_tensors="pt") for image in inputs]
    for output in outputs[1:]:
        for key in outputs[0]:
            assert torch.equal(output[key], outputs[0][key]), key


# ----------------------------------------------------------------------------------------------------------------
# Processor: text expansion and token counts
# ----------------------------------------------------------------------------------------------------------------


def test_token_counts_match_visual_tensors(make_processor):
    processor = make_processor(max_visual_tokens=128)
    masks = [box_mask(90, 120, (10, 40), (10, 60)), box_mask(90, 120, (50, 80), (60, 110)), [5, 5, 110, 85]]
    output = processor(
        text=["<image>\nCompare <region> and <region> with <region>.", "What is <region>?"],
        images=[random_image(90, 120, 1), random_image(70, 70, 2)],
        regions=[masks, [box_mask(70, 70, (0, 10), (0, 70))]],
        padding=True,
        return_tensors="pt",
    )
    merge = output["image_merge_sizes"]
    tokens_per_image = output["image_grid_thw"].prod(-1) // merge**2
    kept_per_image = [int(m.sum()) for m in output["image_keep_mask"].split(tokens_per_image.tolist())]
    masks_per_crop = split_rows(output["region_patch_masks"], output["region_grid_thw"])
    object_tokens = [object_token_count(int(m.sum()), 32, "pixelrefer") for m in masks_per_crop]
    crops_per_sample = [3, 1]
    image_ids = (output["input_ids"] == IMAGE_ID).sum(-1).tolist()
    region_ids = (output["input_ids"] == REGION_ID).sum(-1).tolist()
    assert image_ids == kept_per_image
    assert region_ids == [sum(object_tokens[:3]), sum(object_tokens[3:])]
    assert len(masks_per_crop) == sum(crops_per_sample)


def test_expanded_text_of_an_image_sample(make_processor, tokenizer):
    processor = make_processor()
    image, mask = random_image(56, 84), box_mask(56, 84, (0, 28), (0, 28))
    output = processor(text="What is <region>?", images=image, regions=[mask])
    num_image_tokens = 4 * 6  # 56x84 -> 4 x 6 patches, merge 1
    (count,) = [min(32, int(np.asarray(output["region_patch_masks"]).sum()))]
    expected = "<image>" * num_image_tokens + "\nWhat is [" + "<REGION>" * count + "]?"
    assert tokenizer.decode(output["input_ids"][0]) == expected

    # An explicit tag keeps its position; Lite removes the tag and its newline.
    tagged = processor(text="Look: <image>\nWhat is <region>?", images=image, regions=[mask])
    assert tokenizer.decode(tagged["input_ids"][0]).startswith("Look: " + "<image>" * num_image_tokens + "\nWhat")
    lite = make_processor("pixelrefer-lite")(text="Look: <image>\nWhat is <region>?", images=image, regions=[mask])
    assert tokenizer.decode(lite["input_ids"][0]) == "Look: What is [" + "<REGION>" * 32 + "]?"
    assert "pixel_values" not in lite


def test_several_images_need_an_image_index(make_processor, tokenizer):
    processor = make_processor("pixelrefer-lite", legacy_local_crop_reuse=False)
    images = [random_image(60, 60, 1), random_image(80, 60, 2)]
    region = {"image_index": 1, "region": [5, 5, 30, 40]}
    output = processor(text="<image><image>Is <region> big?", images=images, regions=[region], return_tensors="pt")
    assert output["region_image_sizes"].tolist() == [[80, 60]]
    assert tokenizer.decode(output["input_ids"][0]) == "Is [" + "<REGION>" * 32 + "] big?"
    with pytest.raises(ValueError, match="sample 0 has 2 images; say which one a region refers to"):
        processor(text="<region>", images=images, regions=[[5, 5, 30, 40]])
    with pytest.raises(ValueError, match="sample 0, region 0: image_index 2 is out of range"):
        processor(text="<region>", images=images, regions=[{"image_index": 2, "region": [5, 5, 30, 40]}])


@pytest.mark.parametrize("legacy", [True, False])
def test_lite_local_and_global_context_images(make_processor, legacy):
    processor = make_processor("pixelrefer-lite", legacy_local_crop_reuse=legacy)
    video = np.stack([random_image(64, 96, seed) for seed in range(3)])
    image = random_image(70, 90, 7)
    output = processor(
        text=["<image>\n<region> and <region>", "<video>\n<region> or <region>"],
        images=[image, None],
        videos=[None, video],
        regions=[
            [box_mask(70, 90, (5, 30), (5, 30)), box_mask(70, 90, (40, 70), (50, 90))],
            [{2: [0, 0, 40, 40], 0: [10, 10, 50, 50]}, {0: [50, 20, 90, 60]}],
        ],
        padding=True,
        return_tensors="pt",
    )
    assert (output["input_ids"] == IMAGE_ID).sum() == 0
    assert "pixel_values" not in output and "image_grid_thw" not in output
    # Crops: s0 r0 (image), s0 r1 (image), s1 r0 frame 0, s1 r0 frame 2, s1 r1 frame 0.
    assert output["region_global_index"].tolist() == [0, 0, 1, 2, 1]
    assert output["region_global_grid_thw"].tolist() == [[1, 24, 24]] * 3
    if legacy:
        assert output["region_local_index"].tolist() == [0, 0, 1, 2, 1]
    else:
        assert output["region_local_index"].tolist() == [0, 1, 2, 3, 4]
    num_locals = 3 if legacy else 5
    assert output["region_local_grid_thw"].tolist() == [[1, 16, 16]] * num_locals
    assert output["region_local_pixel_values"].shape == (num_locals * 256, 588)
    assert output["region_global_pixel_values"].shape == (3 * 576, 588)

    # The global image is the whole frame resized to 336 x 336 like OpenCV INTER_AREA (the official Lite call; checked
    # against OpenCV in test_parity.py), normalised, in raster patch order.
    expected = _box_resize(video[2], 336, 336).astype(np.float32)
    expected = (expected / 255 - 0.5) / 0.5  # (336, 336, 3)
    expected = expected.reshape(24, 14, 24, 14, 3).transpose(0, 2, 4, 1, 3).reshape(576, 588)
    global_2 = split_rows(output["region_global_pixel_values"], output["region_global_grid_thw"])[2]
    torch.testing.assert_close(global_2, torch.from_numpy(expected))


# ----------------------------------------------------------------------------------------------------------------
# Video
# ----------------------------------------------------------------------------------------------------------------


def video_frames() -> np.ndarray:
    """Three 56x56 frames (2x2 merged tokens each): A, B, and B with the inside of its top-left 28x28 window changed."""
    first, second = random_image(56, 56, 1), random_image(56, 56, 2)
    third = second.copy()
    third[4:20, 4:20] = 255 - third[4:20, 4:20]
    return np.stack([first, second, third])


def test_video_timestamps_and_token_compression(make_processor, tokenizer):
    processor = make_processor(multi_frame_regions=True)
    mask = box_mask(56, 56, (10, 40), (10, 40))
    output = processor(
        text="<video>\nWhat do <region> and <region> do?",
        videos=video_frames(),
        regions=[{1: mask}, {0: mask, 2: [0, 0, 30, 30]}],
        video_timestamps=[0.5, 1.5, 2.5],
        return_tensors="pt",
    )
    assert output["image_grid_thw"].tolist() == [[1, 4, 4]] * 3
    assert output["image_merge_sizes"].tolist() == [2, 2, 2]
    # Frame 0 keeps all tokens, frame 1 (new content) all, frame 2 only the changed top-left window.
    assert output["image_keep_mask"].tolist() == [True] * 8 + [True, False, False, False]
    counts = [
        object_token_count(int(m.sum()), 32, "pixelrefer")
        for m in split_rows(output["region_patch_masks"], output["region_grid_thw"])
    ]
    expected = (
        "Time 0.5s:"
        + "<image>" * 4
        + ",Time 1.5s:"
        + "<image>" * 4
        + ",Time 2.5s:"
        + "<image>"
        + "\nWhat do ["
        + "<REGION>" * counts[0]
        + "] and [Time 0.5:"
        + "<REGION>" * counts[1]
        + ",Time 2.5:"
        + "<REGION>" * counts[2]
        + "] do?"
    )
    assert tokenizer.decode(output["input_ids"][0]) == expected


def test_identical_frames_keep_one_token_and_compression_can_be_disabled(make_processor):
    frame = random_image(56, 56)
    repeated = [frame, frame, frame]
    output = make_processor()(text="<video>", videos=[repeated], return_tensors="pt")
    assert output["image_keep_mask"].tolist() == [True] * 4 + [True, False, False, False] * 2
    assert (output["input_ids"] == IMAGE_ID).sum() == 6
    uncompressed = make_processor(use_token_compression=False)(text="<video>", videos=[repeated], return_tensors="pt")
    assert uncompressed["image_keep_mask"].all() and (uncompressed["input_ids"] == IMAGE_ID).sum() == 12


def test_video_frame_budget(make_processor):
    # 16 tokens for 2 frames -> at most 8 merged tokens per frame: 112x112 is shrunk to 56x56 (2 x 2 tokens).
    output = make_processor(max_visual_tokens=16)(text="<video>", videos=[[random_image(112, 112)] * 2])
    assert np.asarray(output["image_grid_thw"]).tolist() == [[1, 4, 4]] * 2


def test_lite_video_regions_always_carry_time(make_processor, tokenizer):
    output = make_processor("pixelrefer-lite")(
        text="<video>\nWhat is <region>?", videos=video_frames(), regions=[{1: [0, 0, 20, 20]}]
    )
    assert tokenizer.decode(output["input_ids"][0]) == "What is [Time 1.0:" + "<REGION>" * 32 + "]?"


# ----------------------------------------------------------------------------------------------------------------
# Batching, padding, truncation, chat template, save / load
# ----------------------------------------------------------------------------------------------------------------


def test_batch_with_left_padding_equals_single_samples(make_processor):
    processor = make_processor()
    images = [random_image(50, 70, 1), random_image(84, 56, 2)]
    regions = [
        [box_mask(50, 70, (5, 25), (5, 40))],
        [[0, 0, 20, 20], [10, 30, 50, 80], box_mask(84, 56, (60, 84), (0, 56))],
    ]
    texts = ["What is <region>?", "Is <region> left of <region> or <region>? Answer yes or no."]
    batch = processor(
        text=texts, images=images, regions=regions, padding=True, padding_side="left", return_tensors="pt"
    )
    singles = [
        processor(text=t, images=i, regions=r, return_tensors="pt")
        for t, i, r in zip(texts, images, regions, strict=True)
    ]

    lengths = [single["input_ids"].shape[1] for single in singles]
    assert lengths[0] < lengths[1] == batch["input_ids"].shape[1]
    pad = lengths[1] - lengths[0]
    assert batch["attention_mask"][0].tolist() == [0] * pad + [1] * lengths[0]
    assert (batch["input_ids"][0, :pad] == 0).all()
    for row, single in enumerate(singles):
        assert torch.equal(batch["input_ids"][row][batch["attention_mask"][row].bool()], single["input_ids"][0])
    for key in (
        "pixel_values",
        "image_grid_thw",
        "region_pixel_values",
        "region_grid_thw",
        "region_patch_masks",
        "region_boxes",
        "region_image_sizes",
    ):
        assert torch.equal(batch[key], torch.cat([single[key] for single in singles])), key
    assert set(batch) <= set(processor.model_input_names)


def test_unbatched_and_batched_calls_agree(make_processor):
    processor = make_processor()
    image, mask = random_image(40, 60), box_mask(40, 60, (0, 20), (0, 30))
    single = processor(text="What is <region>?", images=image, regions=[mask], return_tensors="pt")
    batched = processor(text=["What is <region>?"], images=[[image]], regions=[[mask]], return_tensors="pt")
    assert single.keys() == batched.keys()
    for key in single:
        assert torch.equal(single[key], batched[key]), key


def test_truncation_never_cuts_visual_tokens(make_processor):
    processor = make_processor()
    image, mask = random_image(28, 28), box_mask(28, 28, (0, 14), (0, 14))
    text = "What is <region>?" + " The answer is yes." * 10
    full = processor(text=text, images=image, regions=[mask])
    length = len(full["input_ids"][0])
    last_protected = max(i for i, t in enumerate(full["input_ids"][0]) if t in (IMAGE_ID, REGION_ID))

    safe = processor(text=text, images=image, regions=[mask], truncation=True, max_length=last_protected + 3)
    assert safe["input_ids"][0] == full["input_ids"][0][: last_protected + 3] and length > last_protected + 3
    with pytest.raises(ValueError, match=r"sample 1: truncating its \d+ tokens to max_length=\d+ would cut through"):
        processor(
            text=["<region>", text],
            images=[image, image],
            regions=[[mask], [mask]],
            truncation=True,
            max_length=last_protected,
        )


def test_chat_template_renders_qwen_style(make_processor):
    processor = make_processor()
    image_turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is <region>?"}]}]
    assert processor.apply_chat_template(image_turn, add_generation_prompt=True) == (
        "<|im_start|>user\n<image>\nWhat is <region>?<|im_end|>\n<|im_start|>assistant\n"
    )
    video_turn = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Describe <region>."}]}]
    assert processor.apply_chat_template(video_turn) == "<|im_start|>user\n<video>\nDescribe <region>.<|im_end|>\n"
    conversation = [
        {"role": "user", "content": "Is <region> red?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Yes."}]},
        {"role": "user", "content": "And <region>?"},
    ]
    assert processor.apply_chat_template(conversation, add_generation_prompt=True) == (
        "<|im_start|>user\nIs <region> red?<|im_end|>\n<|im_start|>assistant\nYes.<|im_end|>\n"
        "<|im_start|>user\nAnd <region>?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_chat_template_tokenizes_video_frames(make_processor, tokenizer):
    conversation = [
        {
            "role": "user",
            "content": [
                {"type": "video", "video": list(video_frames())},
                {"type": "text", "text": "What is <region>?"},
            ],
        }
    ]
    output = make_processor().apply_chat_template(
        conversation,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        processor_kwargs={"regions": [{0: [0, 0, 20, 20]}]},
    )
    text = tokenizer.decode(output["input_ids"][0])
    assert text.startswith(
        "<|im_start|>user\nTime 0.0s:" + "<image>" * 4 + ",Time 1.0s:" + "<image>" * 4 + ",Time 2.0s:"
    )
    assert text.endswith("\nWhat is [" + "<REGION>" * 32 + "]?<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("variant", VARIANTS)
def test_chat_template_assistant_mask_after_expansion(make_processor, tokenizer, variant):
    processor = make_processor(variant)
    image, mask = random_image(56, 84), box_mask(56, 84, (10, 40), (10, 50))
    conversation = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is <region>?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A red square."}]},
    ]
    output = processor.apply_chat_template(
        [conversation, conversation],
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
        return_tensors="pt",
        processor_kwargs={"regions": [[mask], [mask]], "padding": True, "padding_side": "right"},
    )
    for row in range(2):
        answer = output["input_ids"][row][output["assistant_masks"][row].bool()]
        assert tokenizer.decode(answer) == "A red square.<|im_end|>"
    assert (output["input_ids"][0] == REGION_ID).sum() > 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_save_and_load_round_trip(make_processor, tmp_path, variant):
    processor = make_processor(variant, num_object_tokens=8, max_visual_tokens=256, multi_frame_regions=True)
    processor.save_pretrained(tmp_path)
    reloaded = PixelReferProcessor.from_pretrained(tmp_path)
    assert reloaded.image_processor.to_dict() == processor.image_processor.to_dict()
    assert reloaded.chat_template == CHAT_TEMPLATE

    kwargs = {
        "text": ["<image>\nWhat is <region>?", "<video>\n<region> moves."],
        "images": [random_image(60, 70), None],
        "videos": [None, video_frames()],
        "regions": [[box_mask(60, 70, (10, 30), (10, 30))], [{0: [0, 0, 30, 30], 2: [5, 5, 40, 40]}]],
        "padding": True,
        "return_tensors": "pt",
    }
    expected, actual = processor(**kwargs), reloaded(**kwargs)
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


def test_pixelrefer_takes_a_video_region_on_one_frame_unless_asked(make_processor):
    """The official PixelRefer writes `[<REGION>...]` for a region on one frame and never saw a region on several;
    the timed form is an opt-in extension for PixelRefer and the released form for Lite."""
    mask = box_mask(56, 56, (10, 40), (10, 40))
    kwargs = {
        "text": "<video>\n<region> and <region>",
        "videos": video_frames(),
        "regions": [{1: mask}, {0: mask, 2: mask}],
    }
    with pytest.raises(ValueError, match=r"sample 0, region 1: given on frames \[0, 2\].*multi_frame_regions=True"):
        make_processor()(**kwargs)
    one_frame = make_processor()(**{**kwargs, "regions": [{1: mask}, {2: mask}]})
    text = make_processor().tokenizer.decode(one_frame["input_ids"][0])
    assert "Time 1.0:" not in text and "[<REGION>" in text  # official single-frame form: no time in the region
    for processor, call_option in ((make_processor(), True), (make_processor(multi_frame_regions=True), None)):
        expanded = processor.tokenizer.decode(processor(**kwargs, multi_frame_regions=call_option)["input_ids"][0])
        assert "[Time 0.0:<REGION>" in expanded and ",Time 2.0:<REGION>" in expanded
    lite = make_processor("pixelrefer-lite")
    assert "[Time 0.0:" in lite.tokenizer.decode(lite(**kwargs)["input_ids"][0])


# ----------------------------------------------------------------------------------------------------------------
# Bad inputs: every error names its sample
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def image_and_mask():
    return random_image(40, 40), box_mask(40, 40, (5, 20), (5, 20))


def test_region_count_mismatch(make_processor, image_and_mask):
    image, mask = image_and_mask
    with pytest.raises(
        ValueError, match=r"sample 1: the text has 3 <region> placeholder\(s\) but 2 region\(s\) were given"
    ):
        make_processor()(
            text=["<region>", "<region> <region> <region>"], images=[image, image], regions=[[mask], [mask, mask]]
        )
    with pytest.raises(
        ValueError, match=r"sample 0: the text has 1 <region> placeholder\(s\) but 0 region\(s\) were given"
    ):
        make_processor()(text="What is <region>?", images=image)


def test_regions_without_media(make_processor, image_and_mask):
    image, mask = image_and_mask
    with pytest.raises(ValueError, match=r"sample 1: 1 region\(s\) were given but the sample has no image or video"):
        make_processor()(text=["<region>", "<region>"], images=[image, None], regions=[[mask], [mask]])


def test_frame_index_outside_the_video(make_processor):
    with pytest.raises(ValueError, match="sample 0, region 0: frame index 3 is out of range for a video with 3"):
        make_processor()(text="<region>", videos=video_frames(), regions=[{3: [0, 0, 10, 10]}])
    with pytest.raises(ValueError, match=r"sample 0, region 0: a video region must be a dict \{frame_index"):
        make_processor()(text="<region>", videos=video_frames(), regions=[[0, 0, 10, 10]])


def test_video_without_frames(make_processor):
    empty = np.zeros((0, 32, 32, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="sample 0: the video has no frames"):
        make_processor()(text="<video>", videos=[empty])
    with pytest.raises(ValueError, match="sample 0: the text has <image> / <video> tags but no image or video"):
        make_processor()(text="<video>", videos=[[]])


def test_image_and_video_in_one_sample(make_processor, image_and_mask):
    image, _ = image_and_mask
    with pytest.raises(ValueError, match="sample 0: give either images or a video, not both"):
        make_processor()(text=["hi"], images=[image], videos=[video_frames()])


def test_unreadable_image(make_processor):
    with pytest.raises(ValueError, match="sample 1, image 0: unsupported image type str"):
        make_processor()(text=["a", "b"], images=[None, "cat.png"])
    with pytest.raises(
        ValueError, match=r"sample 0, image 0: floating-point images must hold finite values in \[0, 1\]"
    ):
        make_processor()(text="a", images=np.full((20, 20, 3), 3.0))


def test_other_bad_inputs(make_processor, image_and_mask):
    image, mask = image_and_mask
    processor = make_processor()
    with pytest.raises(ValueError, match="sample 0, region 1: mask is empty"):
        processor(text="<region><region>", images=image, regions=[mask, np.zeros_like(mask)])
    with pytest.raises(ValueError, match="sample 0: the text already holds <REGION> tokens"):
        processor(text="<REGION> <region>", images=image, regions=[mask])
    with pytest.raises(ValueError, match="sample 0: the text has 2 <image> tags but 1 images were given"):
        processor(text="<image><image>", images=image)
    with pytest.raises(ValueError, match="sample 0: 2 video timestamps were given for 3 frames"):
        processor(text="<video>", videos=video_frames(), video_timestamps=[0.0, 1.0])
    with pytest.raises(ValueError, match="sample 0, frame 1: all frames of a video must have the same size"):
        processor(text="<video>", videos=[[random_image(28, 28), random_image(28, 56)]])
    with pytest.raises(ValueError, match="images has 1 entries but the batch has 2 samples"):
        processor(text=["a", "b"], images=[image])


@pytest.mark.parametrize(
    "region, message",
    [
        (np.ones((10, 10), dtype=bool), r"sample 1, region 1: mask is 10x10 but the image is 64x80 \(H x W\)"),
        ([100, 100, 120, 130], r"sample 1, region 1: box .* lies entirely outside the 64x80 image"),
        ([10, 10, 10, 30], "sample 1, region 1: .*zero or negative area"),
        ({"size": [64, 80], "counts": "not an rle ###"}, "sample 1, region 1: invalid COCO RLE"),
        (
            np.full((64, 80), 3, dtype=np.uint8),
            "sample 1, region 1: integer mask must contain only 0/1 or only 0/255, found values 3",
        ),
        (np.full((64, 80), 1.5, dtype=np.float32), r"sample 1, region 1: .*\[0, 1\]"),
    ],
)
def test_bad_regions_name_the_sample_and_region(make_processor, region, message):
    """Each bad region fails with a ValueError naming its sample and region, whatever else the batch holds."""
    processor = make_processor("pixelrefer")
    image = np.zeros((64, 80, 3), dtype=np.uint8)
    good = [[5, 5, 30, 30]]
    with pytest.raises(ValueError, match=message):
        processor(
            text=["<image>\nWhat is <region>?", "<image>\nCompare <region> and <region>."],
            images=[image, image],
            regions=[good, [good[0], region]],
        )


@pytest.mark.parametrize("variant", ["pixelrefer", "pixelrefer-lite"])
def test_outputs_do_not_depend_on_the_number_of_threads(make_processor, variant):
    """Resizing is done in float64 numpy: torch's CPU kernels rounded values next to x.5 differently per thread count."""
    processor = make_processor(variant)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(75, 91, 3), dtype=np.uint8)
    masks = [box_mask(75, 91, (3, 9), (5, 12)), box_mask(75, 91, (20, 70), (10, 90))]
    kwargs = {"text": "<image>\n<region> and <region>", "images": image, "regions": masks, "return_tensors": "pt"}
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = processor(**kwargs)
        torch.set_num_threads(2)
        double = processor(**kwargs)
    finally:
        torch.set_num_threads(threads)
    for key in single:
        assert torch.equal(single[key], double[key]), key
