"""Clicks and boxes -> binary masks with transformers' native Segment Anything, and video masks -> every frame.

PixelRefer answers about a mask; people point at things. A point region `{"points": [[x, y], ...], "labels": [1, ...]}`
(label 1 = on the object, 0 = not on it, pixel coordinates) is turned into a mask by a SAM checkpoint that the user
names, loaded on first use. Only SAM (v1, `model_type="sam"`) does this: its PIL image processor works without
torchvision, whereas transformers' SAM2 processors require it and this package does not install it.

A mask drawn on some frames of a video is carried to the other frames by SAM2's video model (`Sam2VideoModel`, which
needs no torchvision). Its processor does, so [`Sam2VideoPropagator`] prepares frames and masks itself with the same
arithmetic (square resize, rescale, normalisation with the checkpoint's mean and std).

    >>> from pixelrefer_hf.sam_utils import Sam2VideoPropagator, SamMaskPredictor
    >>> predictor = SamMaskPredictor("facebook/sam-vit-base")  # doctest: +SKIP
    >>> mask = predictor.predict(image, points=[[120, 80]], labels=[1])  # doctest: +SKIP
    >>> propagator = Sam2VideoPropagator("facebook/sam2.1-hiera-tiny")  # doctest: +SKIP
    >>> masks = propagator.propagate(frames, {0: mask})  # doctest: +SKIP  {frame_index: (H, W) bool mask}
"""

import json
import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoConfig, Sam2VideoModel, SamModel, SamProcessor
from transformers.models.sam2_video.modeling_sam2_video import Sam2VideoInferenceSession
from transformers.utils import cached_file, logging

from .region_utils import region_to_mask, validate_frame_index

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


def _check_checkpoint_type(checkpoint: str, name: str, option: str, model_type: str, requirement: str):
    """The config of `checkpoint`, refused with one line naming `option` when it cannot load or is not a
    `model_type` checkpoint (`requirement` says what is needed)."""
    try:
        config = AutoConfig.from_pretrained(checkpoint)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot load the {name} checkpoint {checkpoint!r}: {error}") from error
    if config.model_type != model_type:
        raise ValueError(f"{option} {checkpoint!r} is a {config.model_type!r} checkpoint; {requirement}")
    return config


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
            _check_checkpoint_type(
                self.checkpoint,
                "SAM",
                "sam_model",
                "sam",
                "only SAM checkpoints (model_type 'sam', e.g. facebook/sam-vit-base) are supported, because "
                "transformers' SAM2 processors need torchvision, which pixelrefer-hf does not install",
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


# The `resample` field of transformers' processor configs holds PIL codes; these are the ones SAM2 processors use.
_RESAMPLE_MODES = {0: "nearest", 2: "bilinear", 3: "bicubic"}
# Files of a SAM2 checkpoint that can describe its frame preprocessing, most specific first. `processor_config.json`
# counts only when it nests a "video_processor" (newer checkpoints); older ones keep it in its own file.
_SAM2_PREPROCESSING_FILES = ("video_preprocessor_config.json", "processor_config.json", "preprocessor_config.json")
# SAM2's defaults (ImageNet statistics), used where a checkpoint ships no preprocessing file.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

SAM2_HELP = (
    "propagating a region to the other video frames needs a SAM2 video checkpoint: pass "
    "sam2_model='facebook/sam2.1-hiera-tiny' (or a local folder of a transformers Sam2VideoModel, model_type "
    "'sam2_video'), or give the region on every frame it should cover, e.g. {0: mask_0, 8: mask_8}"
)


@dataclass(frozen=True)
class Sam2FramePreprocessing:
    """What SAM2's video processor does to a frame: squash it to `size`, rescale, normalise.

    Equivalent to `Sam2VideoVideoProcessor` (which needs torchvision): the frame is resized to `size` (no aspect
    ratio kept) with antialiasing, rounded back to whole intensities as torchvision does for uint8 frames, multiplied by
    `rescale_factor` and normalised with the checkpoint's mean and std. Masks given as prompts are resized to the
    model's square input (`mask_size`) the way `Sam2VideoProcessor` does: antialiased bilinear, then `>= 0.5`.

    Args:
        size (`tuple[int, int]`): `(height, width)` of the model input.
        mask_size (`int`): side of the square mask prompt (the processor's `target_size`, the model's `image_size`).
        image_mean, image_std (`tuple[float, float, float]`): per-channel statistics, on the rescaled `[0, 1]` scale.
        rescale_factor (`float`): multiplies the 0-255 intensities (1 / 255).
        resample (`str`): `"bilinear"`, `"bicubic"` or `"nearest"`.
        do_resize, do_rescale, do_normalize (`bool`): the processor's switches.
    """

    size: tuple[int, int]
    mask_size: int
    image_mean: tuple[float, float, float] = _IMAGENET_MEAN
    image_std: tuple[float, float, float] = _IMAGENET_STD
    rescale_factor: float = 1 / 255
    resample: str = "bilinear"
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True

    @classmethod
    def from_checkpoint(cls, checkpoint: str, image_size: int) -> "Sam2FramePreprocessing":
        """Read the first preprocessing file the checkpoint has (see `_SAM2_PREPROCESSING_FILES`); without one, SAM2's
        defaults at the model's `image_size`."""
        for filename in _SAM2_PREPROCESSING_FILES:
            path = cached_file(
                checkpoint,
                filename,
                _raise_exceptions_for_missing_entries=False,
                _raise_exceptions_for_connection_errors=False,
            )
            if path is None:
                continue
            try:
                with open(path, encoding="utf-8") as file:
                    values = json.load(file)
            except (OSError, json.JSONDecodeError) as error:
                raise ValueError(f"cannot read {filename} of the SAM2 checkpoint {checkpoint!r}: {error}") from error
            if filename == "processor_config.json":
                values = values.get("video_processor")
                if not isinstance(values, dict):
                    continue
            return cls._from_dict(values, image_size, f"{filename} of the SAM2 checkpoint {checkpoint!r}")
        logger.info(f"{checkpoint} has no preprocessing file; using SAM2's defaults at {image_size} px")
        return cls(size=(image_size, image_size), mask_size=image_size)

    @classmethod
    def _from_dict(cls, values: dict, image_size: int, where: str) -> "Sam2FramePreprocessing":
        # SAM2 squashes frames to a square; a size without height and width (an image processor's
        # {"longest_edge": ...}) says nothing about that, so the model's image_size applies.
        size = values.get("size") or {}
        if not isinstance(size, dict) or ("height" in size) != ("width" in size):
            raise ValueError(f"{where}: 'size' must be {{'height': h, 'width': w}}, got {size!r}")
        resample = values.get("resample", 2)
        if resample not in _RESAMPLE_MODES:
            raise ValueError(
                f"{where}: resample {resample!r} is not supported; use one of {sorted(_RESAMPLE_MODES)} "
                "(PIL codes for nearest, bilinear, bicubic)"
            )
        mean, std = values.get("image_mean", _IMAGENET_MEAN), values.get("image_std", _IMAGENET_STD)
        # A single number applies to all three channels, as in transformers' processors.
        mean = (float(mean),) * 3 if isinstance(mean, numbers.Real) else tuple(float(v) for v in mean)
        std = (float(std),) * 3 if isinstance(std, numbers.Real) else tuple(float(v) for v in std)
        if len(mean) != 3 or len(std) != 3 or not all(v > 0 for v in std):
            raise ValueError(f"{where}: image_mean and image_std need 3 values each, std > 0 (got {mean}, {std})")
        return cls(
            size=(int(size["height"]), int(size["width"])) if "height" in size else (image_size, image_size),
            mask_size=image_size,
            image_mean=mean,
            image_std=std,
            rescale_factor=float(values.get("rescale_factor", 1 / 255)),
            resample=_RESAMPLE_MODES[resample],
            do_resize=bool(values.get("do_resize", True)),
            do_rescale=bool(values.get("do_rescale", True)),
            do_normalize=bool(values.get("do_normalize", True)),
        )

    def frame(self, frame: np.ndarray) -> torch.Tensor:
        """`(H, W, 3)` RGB uint8 -> `(3, height, width)` float32 pixel values."""
        # (H, W, 3) uint8 -> (1, 3, H, W): interpolate works on batched channels-first tensors.
        pixels = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1)[None]
        if self.do_resize and tuple(pixels.shape[-2:]) != self.size:
            if self.resample == "bicubic":
                # torchvision resizes uint8 frames bicubically in float and rounds back to whole intensities.
                pixels = F.interpolate(
                    pixels.float(), size=self.size, mode="bicubic", align_corners=False, antialias=True
                )
                pixels = pixels.round().clamp(0, 255)
            else:
                # On the CPU torchvision resizes uint8 frames with torch's own uint8 kernels; using them directly
                # gives the processor's pixels bit for bit.
                antialias = {"antialias": True, "align_corners": False} if self.resample == "bilinear" else {}
                pixels = F.interpolate(pixels, size=self.size, mode=self.resample, **antialias)
        pixels = pixels[0].float()
        if self.do_rescale:
            pixels = pixels * self.rescale_factor
        if self.do_normalize:
            mean = torch.tensor(self.image_mean).view(3, 1, 1)
            std = torch.tensor(self.image_std).view(3, 1, 1)
            pixels = (pixels - mean) / std
        return pixels

    def mask(self, mask: np.ndarray) -> torch.Tensor:
        """`(H, W)` bool -> `(1, 1, mask_size, mask_size)` float mask prompt in {0, 1}."""
        # (H, W) -> (1, 1, H, W)
        prompt = torch.from_numpy(np.ascontiguousarray(mask)).float()[None, None]
        side = (self.mask_size, self.mask_size)
        if tuple(prompt.shape[-2:]) != side:
            prompt = F.interpolate(prompt, size=side, mode="bilinear", align_corners=False, antialias=True)
            prompt = (prompt >= 0.5).float()
        return prompt


class Sam2VideoPropagator:
    """Carry object masks given on some frames of a video to all its frames with SAM2, loaded on first use.

    Args:
        checkpoint (`str`): a local folder or hub repo id of a transformers SAM2 video checkpoint (`Sam2VideoModel`,
            `model_type="sam2_video"`, e.g. `facebook/sam2.1-hiera-tiny`). Its `video_preprocessor_config.json`
            (or the `video_processor` of `processor_config.json`, or `preprocessor_config.json`) gives the frame
            size, mean and std; without any, SAM2's defaults at the model's `image_size` apply. Nothing is
            downloaded when `HF_HUB_OFFLINE=1`.
        device (`str` or `torch.device`, *optional*, defaults to `"cpu"`): where SAM2 runs and the frames are kept.
        dtype (`torch.dtype`, *optional*): dtype of the model and the frames (default: the checkpoint's float32).
            Preprocessed frames take `3 * height * width` values each (12 MB per frame at 1024 px in float32).
    """

    def __init__(self, checkpoint: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
        self.checkpoint = str(checkpoint)
        self.device = torch.device(device)
        self.dtype = dtype
        self._model: Sam2VideoModel | None = None
        self._preprocessing: Sam2FramePreprocessing | None = None

    def _load(self) -> tuple[Sam2VideoModel, Sam2FramePreprocessing]:
        if self._model is None:
            config = _check_checkpoint_type(
                self.checkpoint,
                "SAM2",
                "sam2_model",
                "sam2_video",
                "mask propagation needs a SAM2 video checkpoint (model_type 'sam2_video', e.g. "
                "facebook/sam2.1-hiera-tiny)",
            )
            logger.info(f"Loading SAM2 from {self.checkpoint}")
            self._preprocessing = Sam2FramePreprocessing.from_checkpoint(self.checkpoint, config.image_size)
            kwargs = {"dtype": self.dtype} if self.dtype is not None else {}
            self._model = Sam2VideoModel.from_pretrained(self.checkpoint, **kwargs).to(self.device).eval()
        return self._model, self._preprocessing

    def propagate(self, frames: list[np.ndarray], masks: dict, where: str = "region") -> dict[int, np.ndarray]:
        """Masks of one object on every frame.

        Args:
            frames (`list[np.ndarray]`): the video, `(H, W, 3)` RGB uint8 frames of one size.
            masks (`dict`): `{frame_index: mask}` on at least one frame; a mask is anything
                [`region_to_mask`] accepts (binary array, box, COCO RLE, polygons).
            where (`str`): prefix of error messages, e.g. `"item 2, region 0"`.

        Returns:
            `{frame_index: (H, W) bool mask}` for every frame. Frames in `masks` keep the given mask as it is; the
            others hold SAM2's prediction, which is empty where SAM2 finds the object absent (occluded, out of view).
        """
        return self.propagate_objects(frames, [masks], [where])[0]

    @torch.no_grad()
    def propagate_objects(
        self,
        frames: list[np.ndarray],
        objects: list[dict],
        wheres: list[str] | None = None,
        video_where: str = "video",
    ) -> list[dict[int, np.ndarray]]:
        """[`~Sam2VideoPropagator.propagate`] for several objects in one pass over the video (each frame is
        encoded once for all of them). `wheres` names each object in error messages (default `"object i"`),
        `video_where` the video."""
        if not isinstance(frames, (list, tuple)) or not frames:
            raise ValueError(f"{video_where}: SAM2 propagation needs a non-empty list of frames")
        for index, frame in enumerate(frames):
            if not (
                isinstance(frame, np.ndarray) and frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[2] == 3
            ):
                raise ValueError(
                    f"{video_where}, frame {index}: SAM2 propagation needs (H, W, 3) uint8 frames, got "
                    f"{getattr(frame, 'shape', type(frame).__name__)} {getattr(frame, 'dtype', '')}"
                )
            if frame.shape != frames[0].shape:
                raise ValueError(
                    f"{video_where}, frame {index}: all frames must have one size, got {frame.shape[:2]} after "
                    f"{frames[0].shape[:2]}"
                )
        height, width = frames[0].shape[:2]
        wheres = list(wheres) if wheres is not None else [f"object {i}" for i in range(len(objects))]
        if len(wheres) != len(objects):
            raise ValueError(f"got {len(wheres)} names for {len(objects)} objects")
        given: list[dict[int, np.ndarray]] = []
        for masks, where in zip(objects, wheres):
            if not isinstance(masks, dict) or not masks:
                raise ValueError(f"{where}: give the object as {{frame_index: mask}} on at least one frame")
            checked = {}
            for key, value in masks.items():
                frame_index = validate_frame_index(key, len(frames), where)
                checked[frame_index] = region_to_mask(value, (height, width), f"{where}, frame {frame_index}")
            given.append(checked)
        if not given:
            return []

        model, preprocessing = self._load()
        # Inference, its state and the frames all stay on the propagator's device.
        devices = dict.fromkeys(("inference_device", "inference_state_device", "video_storage_device"), self.device)
        session = Sam2VideoInferenceSession(video_height=height, video_width=width, dtype=model.dtype, **devices)
        for frame_index, frame in enumerate(frames):
            session.add_new_frame(preprocessing.frame(frame), frame_index)

        # Condition every object on its given masks, frame by frame in time order. Object ids are the positions in
        # `objects`; an object enters the session at its first given frame.
        prompted_frames = sorted({frame_index for masks in given for frame_index in masks})
        for frame_index in prompted_frames:
            object_ids = [obj_id for obj_id, masks in enumerate(given) if frame_index in masks]
            for obj_id in object_ids:
                obj_idx = session.obj_id_to_idx(obj_id)
                session.add_mask_inputs(obj_idx, frame_index, preprocessing.mask(given[obj_id][frame_index]))
            session.obj_with_new_inputs = object_ids
            model(inference_session=session, frame_idx=frame_index)

        # Track forward from the first prompted frame to the end, then backward from it to frame 0.
        logits: dict[int, torch.Tensor] = {}
        start = prompted_frames[0]
        for reverse in (False, True):
            for output in model.propagate_in_video_iterator(session, start_frame_idx=start, reverse=reverse):
                logits[output.frame_idx] = output.pred_masks
        # pred_masks: (objects, 1, h, w) low-resolution logits, objects in session order (= ids in entry order).
        order = [session.obj_idx_to_id(obj_idx) for obj_idx in range(session.get_obj_num())]
        results: list[dict[int, np.ndarray]] = [{} for _ in given]
        for frame_index in range(len(frames)):
            # (objects, 1, h, w) -> (objects, H, W) booleans, as the processor's post_process_masks(binarize=True).
            masks = F.interpolate(
                logits[frame_index].float(), size=(height, width), mode="bilinear", align_corners=False
            )
            masks = (masks[:, 0] > 0).cpu().numpy()
            for position, obj_id in enumerate(order):
                results[obj_id][frame_index] = given[obj_id].get(frame_index, masks[position])
        return results


__all__ = [
    "POINT_REGION_HELP",
    "SAM2_HELP",
    "Sam2FramePreprocessing",
    "Sam2VideoPropagator",
    "SamMaskPredictor",
    "is_point_region",
    "parse_box",
    "parse_point_region",
]
