"""Final-logit parity with the whole official PixelRefer / PixelRefer-Lite model (issue 3, deliverable 2).

`fixtures/logits_{variant}_{case}.safetensors` hold what the official `PixelreferQwen2ForCausalLM` /
`PixelreferliteQwen2ForCausalLM` (transformers 4.46.3, fp32, CPU) computed from the synthetic official snapshot of
`fixtures/official_checkpoint.py` (seed 0): its input ids and logits, with the raw frames and masks and the prompt
they came from (see `fixtures/make_logits_fixtures.py`). Here the same snapshot goes through our converter, the raw
inputs through our processor, and the converted model must give the same logits. The official model was fed our
processor's pixel tensors (rearranged into its input format); the tests check that our processor still produces
exactly those tensors, so the comparison covers our converter, model and text expansion against the official model.
The fixture script also checked those crops and patch masks against the official crop function (equal), and fed the
official patch masks to the official model. The checkpoint is converted with the converter's defaults, the path a
released checkpoint takes (OpenCV resizing): measured differences are at most 1.3e-5 (with `resize_backend="numpy"` up
to 0.1: the tiny random models amplify a one-grey-level crop difference). Crop preprocessing against OpenCV on more
shapes is covered by `test_parity.py`.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures.official_checkpoint import write_official_checkpoint
from safetensors import safe_open
from safetensors.torch import load_file

from pixelrefer_hf import PixelReferForConditionalGeneration, PixelReferProcessor
from pixelrefer_hf.convert import convert_checkpoint

FIXTURES = Path(__file__).parent / "fixtures"
CASES = [(variant, case) for variant in ("pixelrefer", "pixelrefer-lite") for case in ("image", "video")]
ATOL = 5e-5


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """`{variant: (model, processor)}` converted from the snapshot the official logits were computed with."""
    pairs = {}
    for variant in ("pixelrefer", "pixelrefer-lite"):
        root = tmp_path_factory.mktemp(variant)
        write_official_checkpoint(root / "official", variant, fmt="bin", seed=0)
        out = convert_checkpoint(root / "official", root / "converted")  # the defaults: no option
        model = PixelReferForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
        processor = PixelReferProcessor.from_pretrained(out)
        assert processor.image_processor.resize_backend == "opencv"
        pairs[variant] = (model, processor)
    return pairs


def load_case(variant: str, case: str) -> tuple[dict[str, torch.Tensor], str]:
    """The fixture's tensors and the prompt the inputs were made from."""
    path = FIXTURES / f"logits_{variant}_{case}.safetensors"
    with safe_open(path, "pt") as handle:
        prompt = handle.metadata()["prompt"]
    return load_file(path), prompt


def our_inputs(processor: PixelReferProcessor, stored: dict[str, torch.Tensor], case: str, prompt: str):
    """Our processor on the raw frames and masks of the fixture."""
    frames = [stored[f"frame_{i}"].numpy() for i in range(3 if case == "video" else 1)]
    regions: dict[int, dict[int, np.ndarray]] = {}
    for key in sorted(k for k in stored if k.startswith("mask_")):
        _, region, frame = key.split("_")
        regions.setdefault(int(region), {})[int(frame)] = stored[key].numpy()
    ordered = [regions[r] for r in sorted(regions)]
    if case == "image":
        return processor(text=[prompt], images=[frames[0]], regions=[[r[0] for r in ordered]], return_tensors="pt")
    return processor(text=[prompt], videos=[frames], regions=[ordered], return_tensors="pt")


def image_runs(input_ids: torch.Tensor, image_token_id: int) -> list[int]:
    """Lengths of the maximal runs of image tokens in a 1-D id sequence."""
    is_image = torch.cat([torch.tensor([False]), input_ids == image_token_id, torch.tensor([False])]).int()
    edges = is_image.diff()
    return ((edges == -1).nonzero()[:, 0] - (edges == 1).nonzero()[:, 0]).tolist()


@pytest.mark.parametrize("variant,case", CASES)
def test_our_processor_makes_the_inputs_the_official_model_saw(converted, variant, case):
    _, processor = converted[variant]
    stored, prompt = load_case(variant, case)
    inputs = our_inputs(processor, stored, case, prompt)
    for key in (k for k in stored if k.startswith("exact.")):
        torch.testing.assert_close(inputs[key.removeprefix("exact.")], stored[key], rtol=0, atol=0, msg=key)
    for key in (k for k in stored if k.startswith("checksum.")):
        value = inputs[key.removeprefix("checksum.")].double()
        torch.testing.assert_close(torch.stack([value.sum(), value.abs().sum()]), stored[key], msg=key)

    ours, official = inputs["input_ids"][0], stored["official_input_ids"][0]
    image_token_id = processor.image_token_id
    if "image_keep_mask" not in inputs:
        assert ours.tolist() == official.tolist()
        return
    # Text tokens are identical; the official ids carry every frame's full run of image tokens (its model drops the
    # compressed ones), ours only the tokens that survive compression.
    assert ours[ours != image_token_id].tolist() == official[official != image_token_id].tolist()
    full = (inputs["image_grid_thw"].prod(-1) // inputs["image_merge_sizes"] ** 2).tolist()
    kept = [int(chunk.sum()) for chunk in inputs["image_keep_mask"].split(full)]
    assert image_runs(official, image_token_id) == full
    assert image_runs(ours, image_token_id) == kept
    if case == "video":
        assert sum(kept) < sum(full), "the video case must exercise token compression"


@pytest.mark.parametrize("variant,case", CASES)
def test_final_logits_match_the_official_model(converted, variant, case):
    model, processor = converted[variant]
    stored, prompt = load_case(variant, case)
    inputs = our_inputs(processor, stored, case, prompt)
    with torch.no_grad():
        logits = model(**inputs).logits
    torch.testing.assert_close(logits, stored["official_logits"], rtol=0, atol=ATOL)
