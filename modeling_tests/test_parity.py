"""Parity with the official PixelRefer code, against golden tensors made by `fixtures/make_parity_fixtures.py`.

The fixtures hold the inputs and the outputs of the official functions (crop function, region encoder with k-means and
OCI) on synthetic frames and tiny random weights; these tests run our implementation on the same inputs, without the
official code. See the fixture script for what exactly was computed and how.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures.official_checkpoint import write_official_checkpoint
from safetensors import safe_open

from pixelrefer_hf import (
    PixelReferImageProcessor,
    PixelReferObjectCentricInfusion,
    PixelReferObjectTokenizer,
    PixelReferProcessor,
)
from pixelrefer_hf.convert import convert_checkpoint, convert_state_dict
from pixelrefer_hf.testing import tiny_config

FIXTURES = Path(__file__).resolve().parent / "fixtures"
VARIANTS = ("pixelrefer", "pixelrefer-lite")
# OpenCV's bilinear / area resize works in fixed point and rounds differently from our numpy resize (float64, then
# rounded): those crops may differ by one grey level on some pixels, never more. The "opencv" backend calls OpenCV
# like the official code and must match exactly.
MAX_GREY_LEVELS = {"numpy": 1, "opencv": 0}
BACKENDS = ("numpy", "opencv")


def load_fixture(variant: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(FIXTURES / f"parity_{variant}.safetensors", framework="pt") as file:
        return {key: file.get_tensor(key) for key in file.keys()}, file.metadata()  # noqa: SIM118 (not iterable)


def official_layout(golden: dict[str, torch.Tensor]):
    """Frames, and our regions in the official mask order: region i is the i-th mask, on its official frame."""
    frames = [golden["frame_0"].numpy(), golden["frame_1"].numpy()]
    frame_ids = golden["mask_frame_ids"].tolist()
    regions = [{frame: golden[f"mask_{i}"].numpy().astype(bool)} for i, frame in enumerate(frame_ids)]
    return frames, regions


def processed(image_processor: PixelReferImageProcessor, golden: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    frames, regions = official_layout(golden)
    # Both frames as one video, so that the Lite per-frame local-crop cache applies as in the official code.
    features, _ = image_processor.preprocess_multimodal(videos=[frames], regions=[regions])
    return features


def fixture_processor(variant: str, metadata: dict[str, str], backend: str) -> PixelReferImageProcessor:
    # The default budget (8192 visual tokens) leaves every crop and context image at its official size.
    return PixelReferImageProcessor(
        variant=variant, num_object_tokens=int(metadata["num_object_tokens"]), resize_backend=backend
    )


def split_per_image(values: torch.Tensor, grid_thw: torch.Tensor) -> list[torch.Tensor]:
    return list(values.split(grid_thw.prod(-1).tolist()))


def assert_official_crops(image_processor, golden, metadata, max_grey_levels: int) -> None:
    """Crops, patch masks and boxes of `image_processor` on the fixture frames equal the official ones."""
    num_crops = int(metadata["num_crops"])
    features = processed(image_processor, golden)
    grids = features["region_grid_thw"]
    pixel_values = split_per_image(features["region_pixel_values"], grids)
    patch_masks = split_per_image(features["region_patch_masks"], grids)
    assert len(grids) == num_crops

    torch.testing.assert_close(features["region_boxes"], golden["boxes"], atol=1e-4, rtol=0)
    assert torch.equal(features["region_image_sizes"], golden["image_sizes"])
    unit = 1 / 255 / image_processor.image_std[0]  # one grey level in normalised units
    for i in range(num_crops):
        crop = golden[f"crop_{i}"].numpy()
        official_mask = golden[f"patch_mask_{i}"]
        assert grids[i].tolist() == [1, crop.shape[0] // 14, crop.shape[1] // 14], i
        assert list(official_mask.shape) == grids[i, 1:].tolist(), i
        # Official: PixelRefer keeps its uint8-rounded mask, Lite any patch above 0; both select patches with > 0.
        assert torch.equal(patch_masks[i].bool(), (official_mask > 0).flatten()), i
        expected, _, _ = image_processor._normalize_and_patchify(crop)
        difference = (pixel_values[i] - torch.from_numpy(expected)).abs()
        assert float(difference.max()) <= max_grey_levels * unit + 1e-6, (i, float(difference.max()) / unit)


def assert_official_context_images(image_processor, golden, max_grey_levels: int) -> None:
    """Lite local / global context images of `image_processor` on the fixture frames equal the official ones."""
    features = processed(image_processor, golden)
    unit = 1 / 255 / image_processor.image_std[0]
    for kind in ("local", "global"):
        # Same sharing pattern: crop i uses our image index[i] exactly when it used the official distinct image index[i].
        assert features[f"region_{kind}_index"].tolist() == golden[f"{kind}_index"].tolist(), kind
        ours = split_per_image(features[f"region_{kind}_pixel_values"], features[f"region_{kind}_grid_thw"])
        for j, values in enumerate(ours):
            expected, _, _ = image_processor._normalize_and_patchify(golden[f"{kind}_{j}"].numpy())
            difference = (values - torch.from_numpy(expected)).abs()
            assert float(difference.max()) <= max_grey_levels * unit + 1e-6, (kind, j)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_scale_adaptive_crops_match_the_official_crop_function(variant, backend):
    golden, metadata = load_fixture(variant)
    assert_official_crops(fixture_processor(variant, metadata, backend), golden, metadata, MAX_GREY_LEVELS[backend])


@pytest.mark.parametrize("backend", BACKENDS)
def test_lite_context_images_match_the_official_ones_including_the_local_crop_reuse(backend):
    golden, metadata = load_fixture("pixelrefer-lite")
    image_processor = fixture_processor("pixelrefer-lite", metadata, backend)
    assert_official_context_images(image_processor, golden, MAX_GREY_LEVELS[backend])


@pytest.fixture(scope="module")
def converted_image_processors(tmp_path_factory) -> dict[str, PixelReferImageProcessor]:
    """The image processor of a tiny official-layout checkpoint converted with no option, per variant."""
    processors = {}
    for variant in VARIANTS:
        root = tmp_path_factory.mktemp(f"converted-{variant}")
        write_official_checkpoint(root / "official", variant, fmt="safetensors")
        config = json.loads((root / "official" / "config.json").read_text())
        # The released budget (official mm_max_length): every fixture crop and context image keeps its official size.
        config["mm_max_length"] = 8192
        (root / "official" / "config.json").write_text(json.dumps(config))
        out = convert_checkpoint(root / "official", root / "converted")
        processors[variant] = PixelReferProcessor.from_pretrained(out).image_processor
    return processors


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_converted_checkpoint_reproduces_the_official_preprocessing_by_default(converted_image_processors, variant):
    """Whoever converts the released weights gets the official crops, patch masks and context images exactly."""
    image_processor = converted_image_processors[variant]
    golden, metadata = load_fixture(variant)
    assert image_processor.resize_backend == "opencv"
    assert image_processor.num_object_tokens == int(metadata["num_object_tokens"])
    assert_official_crops(image_processor, golden, metadata, max_grey_levels=0)
    if variant == "pixelrefer-lite":
        assert_official_context_images(image_processor, golden, max_grey_levels=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_object_tokens_match_the_official_region_encoder(variant):
    golden, metadata = load_fixture(variant)
    num_crops, n = int(metadata["num_crops"]), int(metadata["num_object_tokens"])
    config = tiny_config(variant, num_object_tokens=n, oci_num_heads=8)
    config._attn_implementation = "sdpa"  # standalone modules: no model sets it
    tokenizer = PixelReferObjectTokenizer(config).eval()
    infusion = PixelReferObjectCentricInfusion(config).eval() if variant == "pixelrefer-lite" else None

    # The official weights, through the converter's key mapping.
    official = {
        key.removeprefix("official_weights."): value for key, value in golden.items() if key.startswith("official_")
    }
    weights, _, unmapped = convert_state_dict(official, variant)
    assert unmapped == []
    tokenizer.load_state_dict(
        {k.removeprefix("model.object_tokenizer."): v for k, v in weights.items() if "object_tokenizer" in k}
    )
    if infusion is not None:
        infusion.load_state_dict(
            {k.removeprefix("model.object_infusion."): v for k, v in weights.items() if "object_infusion" in k}
        )

    grids = torch.tensor([[1, *golden[f"patch_mask_{i}"].shape] for i in range(num_crops)])
    patch_masks = torch.cat([golden[f"patch_mask_{i}"].flatten() for i in range(num_crops)])
    with torch.no_grad():
        tokens, valid = tokenizer.aggregate(
            golden["crop_features"],
            grids,
            patch_masks,
            golden["boxes"],
            golden["image_sizes"],
            init_indices=golden["kmeans_init_indices"],
        )
        if infusion is not None:
            local_length, global_length = (
                len(golden["local_features"]) // num_crops,
                len(golden["global_features"]) // num_crops,
            )
            # The official encoder gets one local and one global feature map per crop, in crop order.
            tokens = infusion(
                tokens,
                golden["local_features"],
                torch.full((num_crops,), local_length),
                torch.arange(num_crops),
                golden["global_features"],
                torch.full((num_crops,), global_length),
                torch.arange(num_crops),
            )
            flat = tokens.flatten(0, 1)
        else:
            flat = tokens[valid]
        object_tokens = tokenizer.projector(flat)
    assert object_tokens.shape == golden["object_tokens"].shape
    torch.testing.assert_close(object_tokens, golden["object_tokens"], atol=1e-4, rtol=1e-4)


def test_fixtures_record_a_kmeans_start_for_every_crop_that_needs_one():
    """The comparison above is meaningful only if k-means really ran (more masked patches than object tokens)."""
    for variant in VARIANTS:
        golden, metadata = load_fixture(variant)
        n = int(metadata["num_object_tokens"])
        counts = [int((golden[f"patch_mask_{i}"] > 0).sum()) for i in range(int(metadata["num_crops"]))]
        assert len(golden["kmeans_init_indices"]) == sum(count > n for count in counts) >= 4, variant
        assert all(np.unique(row).size == n for row in golden["kmeans_init_indices"].numpy())


def test_vision_tower_matches_the_official_tower():
    """Our tower (transformers' VideoLlama3VisionModel) with the official weights, on packed crops (merge 1)."""
    from transformers.models.video_llama_3.modeling_video_llama_3 import VideoLlama3VisionModel

    golden, _ = load_fixture("pixelrefer")
    official = {
        key.removeprefix("official_weights."): value
        for key, value in golden.items()
        if key.startswith("official_weights.model.vision_encoder.")
    }
    weights, _, unmapped = convert_state_dict(official, "pixelrefer")
    assert unmapped == []
    tower = VideoLlama3VisionModel(tiny_config("pixelrefer").vision_config).eval()
    tower.load_state_dict({key.removeprefix("model.vision_model."): value for key, value in weights.items()})
    grid_thw = golden["tower_grid_thw"]
    with torch.no_grad():
        features = tower(
            pixel_values=golden["tower_pixel_values"],
            grid_thw=grid_thw,
            merge_sizes=torch.ones(len(grid_thw), dtype=torch.long),
        ).last_hidden_state
    torch.testing.assert_close(features, golden["tower_features"], atol=1e-4, rtol=1e-4)
