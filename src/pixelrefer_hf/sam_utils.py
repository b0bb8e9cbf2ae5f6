"""Clicks and boxes -> binary masks with transformers' native Segment Anything (`SamModel`).

PixelRefer answers about a mask; people point at things. A point region `{"points": [[x, y], ...], "labels": [1, ...]}`
(label 1 = on the object, 0 = not on it, pixel coordinates) is turned into a mask by a SAM checkpoint that the user
names, loaded on first use. Only SAM (v1, `model_type="sam"`) is supported: its PIL image processor works without
torchvision, whereas transformers' SAM2 processors require it and this package does not install it.

    >>> from pixelrefer_hf.sam_utils import SamMaskPredictor
    >>> predictor = SamMaskPredictor("facebook/sam-vit-base")  # doctest: +SKIP
    >>> mask = predictor.predict(image, points=[[120, 80]], labels=[1])  # doctest: +SKIP
"""

import math
import numbers

import numpy as np
import torch
from transformers import AutoConfig, SamModel, SamProcessor
from transformers.utils import logging


logger = logging.get_logger(__name__)

POINT_REGION_HELP = (
    "a point region {'points': [[x, y], ...], 'labels': [1, ...]} (pixel coordinates; label 1 = on the object, 0 = "
    "not on it; optional 'box': [x0, y0, x1, y1]) is turned into a mask by a SAM checkpoint: pass "
    "sam_model='facebook/sam-vit-base' (or a local folder), or give the region as a binary mask, a box "
    "[x0, y0, x1, y1], a COCO RLE or polygons instead"
)


def is_point_region(region) -> bool:
    """Whether `region` is a point prompt `{"points": ..., ...}` that needs SAM to become a mask."""
    return isinstance(region, dict) and "points" in region


def parse_box(box, image_size: tuple[int, int], where: str) -> list[float]:
    """Validate a box `[x0, y0, x1, y1]` (pixels) that overlaps an image of size `(H, W)`; returns it as floats."""
    if not (
        isinstance(box, (list, tuple, np.ndarray))
        and len(box) == 4
        and all(isinstance(v, numbers.Real) and math.isfinite(v) for v in box)
    ):
        raise ValueError(f"{where}: a box must be 4 finite numbers [x0, y0, x1, y1], got {box!r}")
    x0, y0, x1, y1 = (float(v) for v in box)
    height, width = image_size
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"{where}: box {[x0, y0, x1, y1]} has zero or negative area (need x1 > x0 and y1 > y0)")
    if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
        raise ValueError(f"{where}: box {[x0, y0, x1, y1]} lies entirely outside the {height}x{width} image")
    return [x0, y0, x1, y1]


def parse_point_region(region: dict, image_size: tuple[int, int], where: str) -> dict:
    """Validate a point region against an image of size `(H, W)`.

    Returns `{"points": [[x, y], ...], "labels": [0 | 1, ...], "box": [x0, y0, x1, y1] | None}` with floats and ints.
    """
    unknown = set(region) - {"points", "labels", "box"}
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(map(str, unknown))} in a point region; {POINT_REGION_HELP}")
    points = region["points"]
    if isinstance(points, np.ndarray):
        points = points.tolist()
    if (
        not isinstance(points, (list, tuple))
        or not points
        or not all(
            isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(v, numbers.Real) for v in p) for p in points
        )
    ):
        raise ValueError(f"{where}: 'points' must be a non-empty list of [x, y] pairs, got {points!r}")
    height, width = image_size
    parsed_points = []
    for x, y in points:
        if not (math.isfinite(x) and math.isfinite(y) and 0 <= x < width and 0 <= y < height):
            raise ValueError(
                f"{where}: point {[x, y]} is outside the {height}x{width} image "
                f"(need 0 <= x < {width} and 0 <= y < {height})"
            )
        parsed_points.append([float(x), float(y)])
    labels = region.get("labels", [1] * len(points))
    if isinstance(labels, np.ndarray):
        labels = labels.tolist()
    if not isinstance(labels, (list, tuple)) or len(labels) != len(points) or any(v not in (0, 1) for v in labels):
        raise ValueError(f"{where}: 'labels' must hold one 0 or 1 per point ({len(points)} points), got {labels!r}")
    if 1 not in labels:
        raise ValueError(f"{where}: at least one point must be on the object (label 1)")
    box = region.get("box")
    return {
        "points": parsed_points,
        "labels": [int(v) for v in labels],
        "box": None if box is None else parse_box(box, image_size, where),
    }


class SamMaskPredictor:
    """Predict one binary mask per prompt with a SAM checkpoint, loaded on first use.

    Args:
        checkpoint (`str`): a local folder or hub repo id of a transformers SAM checkpoint (`SamModel` +
            `SamProcessor`, e.g. `facebook/sam-vit-base`). Nothing is downloaded when `HF_HUB_OFFLINE=1`.
        device (`str` or `torch.device`, *optional*, defaults to `"cpu"`): where SAM runs.
    """

    def __init__(self, checkpoint: str, device: str | torch.device = "cpu"):
        self.checkpoint = str(checkpoint)
        self.device = torch.device(device)
        self._model: SamModel | None = None
        self._processor: SamProcessor | None = None

    def _load(self) -> tuple[SamModel, SamProcessor]:
        if self._model is None:
            try:
                config = AutoConfig.from_pretrained(self.checkpoint)
            except (OSError, ValueError) as error:
                raise ValueError(f"cannot load the SAM checkpoint {self.checkpoint!r}: {error}") from error
            if config.model_type != "sam":
                raise ValueError(
                    f"sam_model {self.checkpoint!r} is a {config.model_type!r} checkpoint; only SAM checkpoints "
                    "(model_type 'sam', e.g. facebook/sam-vit-base) are supported, because transformers' SAM2 "
                    "processors need torchvision, which pixelrefer-hf does not install"
                )
            logger.info(f"Loading SAM from {self.checkpoint}")
            self._processor = SamProcessor.from_pretrained(self.checkpoint)
            self._model = SamModel.from_pretrained(self.checkpoint).to(self.device).eval()
        return self._model, self._processor

    @torch.no_grad()
    def predict(
        self,
        image: np.ndarray,
        points: list[list[float]] | None = None,
        labels: list[int] | None = None,
        box: list[float] | None = None,
        where: str = "region",
    ) -> np.ndarray:
        """Segment the object that the prompt points at.

        Args:
            image (`np.ndarray`): `(H, W, 3)` RGB uint8.
            points (`list[list[float]]`, *optional*): `[[x, y], ...]` pixel coordinates, with `labels` (1 on the
                object, 0 off it).
            box (`list[float]`, *optional*): `[x0, y0, x1, y1]` in pixels. At least one of `points` and `box`.
            where (`str`): prefix of error messages, e.g. `"item 2, region 0"`.

        Returns:
            `(H, W)` bool mask. With a single point and no box SAM's answer is ambiguous (part or whole), so it
            predicts three masks and the one with the highest predicted IoU is kept, as SAM's authors recommend.
        """
        if points is None and box is None:
            raise ValueError(f"{where}: give SAM points or a box")
        model, processor = self._load()
        prompt = {}
        if points is not None:
            # SamProcessor nesting: [image, object, point, xy] and [image, object, point].
            prompt["input_points"] = [[points]]
            prompt["input_labels"] = [[labels]]
        if box is not None:
            prompt["input_boxes"] = [[box]]
        inputs = processor(images=image, return_tensors="pt", **prompt)
        original_sizes, reshaped_sizes = inputs.pop("original_sizes"), inputs.pop("reshaped_input_sizes")
        inputs = {
            key: value.to(self.device, model.dtype if value.is_floating_point() else value.dtype)
            for key, value in inputs.items()
        }
        multimask = box is None and len(points) == 1
        outputs = model(**inputs, multimask_output=multimask)
        # pred_masks: (images=1, objects=1, masks=1 or 3, h, w) low-resolution logits; iou_scores (1, 1, masks).
        masks = processor.post_process_masks(outputs.pred_masks.float().cpu(), original_sizes, reshaped_sizes)[0]
        best = int(outputs.iou_scores[0, 0].argmax())
        mask = masks[0, best].numpy()
        if not mask.any():
            raise ValueError(
                f"{where}: SAM found no object at the given prompt (points {points}, box {box}); click inside the "
                "object, add points, or give a mask or box instead"
            )
        return mask


__all__ = ["POINT_REGION_HELP", "SamMaskPredictor", "is_point_region", "parse_box", "parse_point_region"]
