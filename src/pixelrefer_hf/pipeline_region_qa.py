"""`pipeline("region-qa")`: ask PixelRefer about regions of an image or a video.

    >>> from transformers import pipeline
    >>> pipe = pipeline("region-qa", model="path/or/repo", trust_remote_code=True)  # doctest: +SKIP
    >>> pipe(image="photo.jpg", regions=[[40, 30, 200, 180]], question="What is <region> doing?")  # doctest: +SKIP
    {'answer': '...'}

Each item is a dict `{"image" | "video": ..., "regions": [...], "question": "... <region> ..."}`; a list of items is
answered in real batches of `batch_size` (one left-padded `generate` call per batch). Regions are whatever
[`PixelReferProcessor`] accepts (masks, boxes, COCO RLE, polygons) plus point prompts, which a SAM checkpoint named by
`sam_model=` turns into masks. Videos are lists of frames or paths to files decoded with PyAV (`media_io.py`); with
`propagate_regions=True` a SAM2 video checkpoint named by `sam2_model=` carries each region to every frame.
"""

import hashlib
import math
import numbers
import os
import re
from collections.abc import Iterable, Iterator
from itertools import islice

import numpy as np
import torch
from transformers import GenerationConfig, Pipeline
from transformers.utils import logging

from .configuration_pixelrefer import PIPELINE_TASK, check_processor_matches_config
from .media_io import DEFAULT_FPS, DEFAULT_MAX_FRAMES, load_image, read_video
from .processing_pixelrefer import check_region_placeholders
from .region_utils import region_to_mask, validate_frame_index
from .sam_utils import (
    POINT_REGION_HELP,
    SAM2_HELP,
    Sam2VideoPropagator,
    SamMaskPredictor,
    is_point_region,
    parse_box,
    parse_point_region,
)

logger = logging.get_logger(__name__)

BOX_TO_MASK_MODES = ("box", "sam")
# Call keywords that go to `preprocess` (and `skip_bad_items` to the batching); all others go to `generate`.
PREPROCESS_OPTIONS = (
    "sam_model",
    "box_to_mask",
    "fps",
    "max_frames",
    "propagate_regions",
    "sam2_model",
    "skip_bad_items",
)
# Tokens the processor writes itself; a question that already holds them would be expanded wrongly.
_RESERVED_TOKENS = ("<REGION>", "<image>", "<video>")


def _is_box(region) -> bool:
    return (
        isinstance(region, (list, tuple))
        and len(region) == 4
        and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in region)
    )


def _media_key(item: dict) -> tuple:
    """What identifies a prepared item's pixels (its images, or its video frames and their times): items with the
    same key ask about the same picture."""
    frames = item["images"] if item["images"] is not None else item["video"]
    digests = tuple(
        (frame.shape, hashlib.blake2b(np.ascontiguousarray(frame).tobytes(), digest_size=16).digest())
        for frame in frames
    )
    timestamps = tuple(item["video_timestamps"]) if item["video_timestamps"] is not None else None
    return ("video" if item["images"] is None else "images", digests, timestamps)


def _item_error(where: str, error: ValueError) -> str:
    """A processor error about the one-sample batch of item `where`, reworded to name the item."""
    message = str(error)
    if not where:
        return message
    return f"{where}: " + re.sub(r"^sample 0(: |, )", "", message)


# What `config.custom_pipelines` says of this pipeline in a folder saved with it (the form transformers' own
# `Pipeline.save_pretrained` writes for a registered pipeline).
PIPELINE_ENTRY = {
    PIPELINE_TASK: {
        "impl": "pipeline_region_qa.RegionQAPipeline",
        "pt": ["AutoModelForImageTextToText"],
        "type": "multimodal",
    }
}


def save_with_pipeline(model, processor, save_directory: str | os.PathLike, **model_save_kwargs) -> None:
    """Write `model` (`model_save_kwargs` go to its `save_pretrained`, e.g. `state_dict`), `processor`, and the code
    of the `region-qa` pipeline with the modules it imports, naming it in the saved `config.custom_pipelines`.

    The model alone never carries the pipeline: running it needs none of this code (SAM helpers, video decoding).
    """
    from transformers.dynamic_module_utils import custom_object_save

    config = model.config
    had_entry, previous = hasattr(config, "custom_pipelines"), getattr(config, "custom_pipelines", None)
    config.custom_pipelines = {**(previous or {}), **PIPELINE_ENTRY}
    try:
        model.save_pretrained(save_directory, **model_save_kwargs)
    finally:
        # In memory the registered pipeline keeps winning (see configuration_pixelrefer._LOADED_AS_REMOTE_CODE).
        if had_entry:
            config.custom_pipelines = previous
        else:
            del config.custom_pipelines
    processor.save_pretrained(save_directory)
    if model_save_kwargs.get("is_main_process", True):
        custom_object_save(RegionQAPipeline, save_directory)


class RegionQAPipeline(Pipeline):
    r"""
    Region question answering with PixelRefer / PixelRefer-Lite.

    Call it with one item (as keywords or a dict) or a list of items:

    * `image`: a PIL image, numpy array `(H, W[, C])`, torch tensor, or a local file path; or
    * `video`: a list of frames, a `(T, H, W, C)` array, or a local video file path (decoded at `fps`, at most
      `max_frames` frames, with PyAV);
    * `regions`: one entry per `<region>` of the question, in order. On an image: a binary mask, a box
      `[x0, y0, x1, y1]`, a COCO RLE dict, `{"polygons": [[x0, y0, ...]]}` or a point prompt
      `{"points": [[x, y], ...], "labels": [1, ...]}` (needs `sam_model`). On a video: a dict
      `{frame_index: region}` with any of those forms, on one or several frames.
    * `question`: text holding one `<region>` per region.
    * `video_timestamps` (*optional*): seconds of each given video frame (default: 1 frame per second; a decoded
      file brings its own).

    Returns `{"answer": str}` per item, or `{"error": str}` for a bad item when `skip_bad_items=True`.

    Pipeline arguments (at construction or per call):
        sam_model (`str`, *optional*): SAM checkpoint (local folder or repo id) for point prompts and, with
            `box_to_mask="sam"`, boxes. Loaded on first use.
        box_to_mask (`str`, *optional*, defaults to `"box"`): `"box"` gives PixelRefer the box itself (every pixel
            inside it); `"sam"` segments the object inside the box with SAM first.
        propagate_regions (`bool`, *optional*, defaults to `False`): on a video, carry every region from the frames it
            is given on to all the other frames with the SAM2 checkpoint `sam2_model`, so that PixelRefer sees the
            object on every frame. The given frames keep their regions as they are; a frame where SAM2 finds the
            object absent (empty mask) is left out for that region. Image items are not affected.
        sam2_model (`str`, *optional*): SAM2 video checkpoint (local folder or repo id of a `Sam2VideoModel`, e.g.
            `facebook/sam2.1-hiera-tiny`) for `propagate_regions`. Loaded on first use. Separate from `sam_model`,
            which turns clicks into masks on single frames.
        fps (`float`, *optional*, defaults to 1.0), max_frames (`int`, *optional*, defaults to 32): sampling of video
            files.
        skip_bad_items (`bool`, *optional*, defaults to `False`): with a list, answer the good items and put
            `{"error": "item i: ..."}` in the slot of a bad one, instead of raising.
        batch_size (`int`, *optional*, defaults to 1): items per `generate` call.
        Any other keyword (`max_new_tokens`, `do_sample`, `temperature`, `streamer`, ...) goes to `generate`.
    """

    _load_processor = True
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False
    _load_video_processor = False
    _pipeline_calls_generate = True
    _default_generation_config = GenerationConfig(max_new_tokens=256)

    def __init__(self, *args, **kwargs):
        self._sam_predictors: dict[str, SamMaskPredictor] = {}
        self._sam2_propagators: dict[str, Sam2VideoPropagator] = {}
        super().__init__(*args, **kwargs)
        if self.processor is None:
            raise ValueError("the region-qa pipeline needs the PixelRefer processor (pass processor=...)")
        check_processor_matches_config(self.model.config, self.processor.image_processor)
        # The base class only takes the padding id from a tokenizer given on its own; batches need it here too.
        if self.model.can_generate() and self.processor.tokenizer.pad_token_id is not None:
            self._generation_defaults.setdefault("pad_token_id", self.processor.tokenizer.pad_token_id)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Save the model, the processor and this pipeline's code, so that `pipeline("region-qa",
        model=save_directory, trust_remote_code=True)` rebuilds this pipeline where the package is not installed."""
        save_with_pipeline(self.model, self.processor, save_directory, **kwargs)

    # ------------------------------------------------------------------------------------------------------------
    # Arguments
    # ------------------------------------------------------------------------------------------------------------

    def _sanitize_parameters(self, **kwargs) -> tuple[dict, dict, dict]:
        """Route the call's keywords: those of `preprocess` (`PREPROCESS_OPTIONS`, None meaning "default") to it,
        every other one to `generate`."""
        preprocess_params = {
            name: kwargs.pop(name) for name in PREPROCESS_OPTIONS if name in kwargs and kwargs[name] is not None
        }
        kwargs = {name: value for name, value in kwargs.items() if name not in PREPROCESS_OPTIONS}
        box_to_mask = preprocess_params.get("box_to_mask")
        if box_to_mask is not None and box_to_mask not in BOX_TO_MASK_MODES:
            raise ValueError(f"box_to_mask must be one of {BOX_TO_MASK_MODES}, got {box_to_mask!r}")
        if "propagate_regions" in preprocess_params:
            preprocess_params["propagate_regions"] = bool(preprocess_params["propagate_regions"])
        forward_params = {"generate_kwargs": kwargs} if kwargs else {}
        return preprocess_params, forward_params, {}

    def __call__(
        self,
        inputs: dict | list[dict] | Iterable[dict] | None = None,
        *,
        image=None,
        video=None,
        regions: list | None = None,
        question: str | None = None,
        video_timestamps: list[float] | None = None,
        **kwargs,
    ):
        """Answer one item (keywords or a dict) or a list of items; see the class docstring."""
        keywords = {
            "image": image,
            "video": video,
            "regions": regions,
            "question": question,
            "video_timestamps": video_timestamps,
        }
        keywords = {key: value for key, value in keywords.items() if value is not None}
        if inputs is None:
            inputs = keywords
        elif keywords:
            raise ValueError(
                "give the item as a dict (or a list of dicts) or as keywords, not both "
                f"(got keywords {sorted(keywords)})"
            )
        if isinstance(inputs, list) and not inputs:
            return []
        return super().__call__(inputs, **kwargs)

    # ------------------------------------------------------------------------------------------------------------
    # Batching: items are validated one by one (so that errors name them), then answered batch by batch
    # ------------------------------------------------------------------------------------------------------------

    def get_iterator(
        self, inputs, num_workers: int, batch_size: int, preprocess_params, forward_params, postprocess_params
    ) -> Iterator[dict]:
        if num_workers:
            logger.warning_once("the region-qa pipeline prepares items in the main process; num_workers is ignored")
        return self._answer(inputs, batch_size, preprocess_params, forward_params, postprocess_params, indexed=True)

    def run_single(self, inputs, preprocess_params, forward_params, postprocess_params) -> dict:
        results = self._answer([inputs], 1, preprocess_params, forward_params, postprocess_params, indexed=False)
        return next(results)

    def _answer(
        self,
        inputs: Iterable,
        batch_size: int,
        preprocess_params: dict,
        forward_params: dict,
        postprocess_params: dict,
        indexed: bool,
    ) -> Iterator[dict]:
        """Yield one result per item, in order, running `generate` once per `batch_size` good items."""
        preprocess_params = dict(preprocess_params)
        skip_bad_items = preprocess_params.pop("skip_bad_items", False)
        # Checked here, where construction and call arguments are merged: it concerns every item, not one.
        if preprocess_params.get("propagate_regions") and preprocess_params.get("sam2_model") is None:
            raise ValueError(f"propagate_regions=True needs sam2_model=...; {SAM2_HELP}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        items = iter(enumerate(inputs))
        while batch := list(islice(items, batch_size)):
            prepared = []
            for index, item in batch:
                try:
                    # Every error raised while preparing an item starts with "item {index}: " in a list call.
                    where = f"item {index}" if indexed else ""
                    prepared.append(self.preprocess(item, where=where, **preprocess_params))
                except ValueError as error:
                    if not skip_bad_items:
                        raise
                    prepared.append({"error": str(error)})
            for (index, _), item in zip(batch, prepared):
                item.setdefault("where", f"item {index}" if indexed else "")
            answers = {}
            for group, share_image in self._generate_calls(prepared):
                inputs = self._encode_batch(group, skip_bad_items)
                good = [item for item in group if "error" not in item]
                if good:
                    new_tokens = self.forward(inputs, share_image=share_image and len(good) > 1, **forward_params)
                    answers |= {id(item): tokens for item, tokens in zip(good, new_tokens, strict=True)}
            for item in prepared:
                if "error" in item:
                    yield {"error": item["error"]}
                else:
                    yield self.postprocess(answers[id(item)], **postprocess_params)

    def _generate_calls(self, prepared: list[dict]) -> list[tuple[list[dict], bool]]:
        """How one batch is answered: `(items, share_image)` per `generate` call. PixelRefer items of the batch that
        ask about the same image or video (the same pixels) form one call that encodes it and prefills its prompt
        prefix once (`generate_sharing_image`); the other items form one plain left-padded call. PixelRefer-Lite
        feeds no image tokens to its LLM: its batch stays one call, where the processor encodes each distinct
        context image once."""
        good = [item for item in prepared if "error" not in item]
        if not good:
            return []
        if self.model.config.is_lite or len(good) == 1:
            return [(good, False)]
        groups: dict[tuple, list[dict]] = {}
        for item in good:
            groups.setdefault(_media_key(item), []).append(item)
        shared = [(items, True) for items in groups.values() if len(items) > 1]
        alone = [items[0] for items in groups.values() if len(items) == 1]
        return shared + ([(alone, False)] if alone else [])

    def _encode_batch(self, prepared: list[dict], skip_bad_items: bool):
        """The processor's inputs for the good items of `prepared`, in one left-padded batch, or `None` if none.

        A processor error (e.g. an image whose aspect ratio the vision tower cannot take) concerns one item: the
        items are then encoded one by one to find it, its error names it, and with `skip_bad_items` it is marked
        and the others are batched without it (their answers are those of single calls, as left padding gives)."""
        good = [item for item in prepared if "error" not in item]
        if not good:
            return None
        try:
            return self._encode(good)
        except ValueError:
            found = False
            for item in good:
                try:
                    self._encode([item])
                except ValueError as error:
                    found = True
                    message = _item_error(item["where"], error)
                    if not skip_bad_items:
                        raise ValueError(message) from error
                    item["error"] = message
            if not found:
                raise
        good = [item for item in prepared if "error" not in item]
        return self._encode(good) if good else None

    # ------------------------------------------------------------------------------------------------------------
    # Steps
    # ------------------------------------------------------------------------------------------------------------

    def preprocess(
        self,
        item: dict,
        where: str = "",
        sam_model: str | None = None,
        box_to_mask: str = "box",
        fps: float = DEFAULT_FPS,
        max_frames: int | None = DEFAULT_MAX_FRAMES,
        propagate_regions: bool = False,
        sam2_model: str | None = None,
    ) -> dict:
        """Validate one item, load its image or video, turn every region into a boolean mask, render the prompt."""
        prefix = f"{where}: " if where else ""
        if not isinstance(item, dict):
            raise ValueError(f"{prefix}an item must be a dict with 'image' or 'video', 'regions' and 'question'")
        unknown = set(item) - {"image", "video", "regions", "question", "video_timestamps"}
        if unknown:
            raise ValueError(f"{prefix}unknown keys {sorted(map(str, unknown))}")
        question, regions = item.get("question"), item.get("regions", [])
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"{prefix}'question' must be a non-empty string")
        try:
            question.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ValueError(f"{prefix}the question is not valid unicode ({error.reason})") from error
        for token in _RESERVED_TOKENS:
            if token in question:
                raise ValueError(f"{prefix}the question must not contain {token}; write <region> for each region")
        if not isinstance(regions, (list, tuple)):
            raise ValueError(f"{prefix}'regions' must be a list (one entry per <region>)")
        check_region_placeholders(where, question, len(regions))
        if ("image" in item) == ("video" in item):
            raise ValueError(f"{prefix}give exactly one of 'image' and 'video'")
        max_pixels = getattr(self.processor.image_processor, "max_image_pixels", None)

        def region_mask(region, frame: np.ndarray, region_where: str) -> np.ndarray:
            return self._region_mask(region, frame, region_where, sam_model, box_to_mask)

        if "image" in item:
            if item.get("video_timestamps") is not None:
                raise ValueError(f"{prefix}'video_timestamps' were given for an image")
            image = load_image(item["image"], f"{prefix}image", max_pixels)
            masks = [region_mask(region, image, f"{prefix}region {j}") for j, region in enumerate(regions)]
            content_type, images, video, timestamps = "image", [image], None, None
        else:
            frames, timestamps = self._load_video(
                item["video"],
                item.get("video_timestamps"),
                prefix,
                fps,
                max_frames,
                max_pixels,
                getattr(self.processor.image_processor, "max_video_frames", None),
            )
            masks = []
            for j, region in enumerate(regions):
                region_where = f"{prefix}region {j}"
                if not isinstance(region, dict) or not region or "points" in region or "counts" in region:
                    raise ValueError(f"{region_where}: a video region must be a dict {{frame_index: region}}")
                frame_masks = {}
                for key, value in region.items():
                    frame_index = validate_frame_index(key, len(frames), region_where)
                    frame_where = f"{region_where}, frame {frame_index}"
                    frame_masks[frame_index] = region_mask(value, frames[frame_index], frame_where)
                masks.append(frame_masks)
            if propagate_regions and masks:
                wheres = [f"{prefix}region {j}" for j in range(len(masks))]
                masks = self._propagate(frames, masks, wheres, f"{prefix}video", sam2_model)
            else:
                # Checked here so that the item fails alone (skip_bad_items), not its whole batch in the processor.
                where_item = prefix.removesuffix(": ") or "item"
                self.processor.check_region_frames(where_item, [list(frame_masks) for frame_masks in masks], None)
            content_type, images, video = "video", None, frames

        messages = [{"role": "user", "content": [{"type": content_type}, {"type": "text", "text": question}]}]
        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return {
            "prompt": prompt,
            "images": images,
            "video": video,
            "video_timestamps": timestamps,
            "regions": masks,
            # Propagated regions cover many frames: the timed multi-frame form, asked for by propagating.
            "multi_frame_regions": True if propagate_regions else None,
        }

    def _region_mask(
        self, region, frame: np.ndarray, where: str, sam_model: str | None, box_to_mask: str
    ) -> np.ndarray:
        """One region on one `(H, W, 3)` frame -> `(H, W)` bool mask (through SAM for points, and boxes on request)."""
        size = frame.shape[:2]
        if is_point_region(region):
            if sam_model is None:
                raise ValueError(f"{where}: a point region needs sam_model=...; {POINT_REGION_HELP}")
            prompt = parse_point_region(region, size, where)
            return self._sam(sam_model).predict(frame, prompt["points"], prompt["labels"], prompt["box"], where)
        if box_to_mask == "sam" and _is_box(region):
            if sam_model is None:
                raise ValueError(f"{where}: box_to_mask='sam' needs sam_model=... (a SAM checkpoint)")
            box = parse_box(region, size, where)
            return self._sam(sam_model).predict(frame, box=box, where=where)
        return region_to_mask(region, size, where)

    def _propagate(
        self,
        frames: list[np.ndarray],
        masks: list[dict[int, np.ndarray]],
        wheres: list[str],
        video_where: str,
        sam2_model: str,
    ) -> list[dict[int, np.ndarray]]:
        """Every region's masks on all frames: the given ones as they are, SAM2's where it sees the object."""
        if sam2_model not in self._sam2_propagators:
            self._sam2_propagators[sam2_model] = Sam2VideoPropagator(sam2_model, device=self.device)
        propagated = self._sam2_propagators[sam2_model].propagate_objects(frames, masks, wheres, video_where)
        kept = []
        for tracked, where in zip(propagated, wheres):
            # A given mask is never empty (region_to_mask rejects that), so only SAM2's empty predictions go.
            region = {frame_index: mask for frame_index, mask in tracked.items() if mask.any()}
            if len(region) < len(tracked):
                logger.info(f"{where}: SAM2 finds the object on {len(region)} of {len(tracked)} frames")
            kept.append(region)
        return kept

    def _sam(self, checkpoint: str) -> SamMaskPredictor:
        if checkpoint not in self._sam_predictors:
            self._sam_predictors[checkpoint] = SamMaskPredictor(checkpoint, device=self.device)
        return self._sam_predictors[checkpoint]

    @staticmethod
    def _load_video(
        video,
        timestamps,
        prefix: str,
        fps: float,
        max_frames: int | None,
        max_pixels: int | None = None,
        max_video_frames: int | None = None,
    ) -> tuple[list[np.ndarray], list[float] | None]:
        """Frames (and timestamps) of a video item, refusing more than `max_video_frames` frames before they are
        converted or decoded."""
        if isinstance(video, (str, os.PathLike)):
            if timestamps is not None:
                raise ValueError(f"{prefix}'video_timestamps' cannot be given with a video file (it has its own)")
            if max_video_frames is not None and (max_frames is None or max_frames > max_video_frames):
                raise ValueError(
                    f"{prefix}max_frames={max_frames} would decode more frames than the image processor's "
                    f"max_video_frames={max_video_frames}; pass max_frames <= {max_video_frames}"
                )
            try:
                decoded = read_video(video, fps=fps, max_frames=max_frames, max_pixels=max_pixels)
            except ValueError as error:
                raise ValueError(f"{prefix}{error}") from error
            return decoded.frames, decoded.timestamps
        if isinstance(video, (np.ndarray, torch.Tensor)):
            if video.ndim != 4:
                raise ValueError(f"{prefix}a video array must be 4-D (T, H, W, C), got shape {tuple(video.shape)}")
            video = list(video)
        if not isinstance(video, (list, tuple)):
            raise ValueError(f"{prefix}'video' must be a list of frames, a 4-D array or a video file path")
        if not video:
            raise ValueError(f"{prefix}the video has no frames")
        if max_video_frames is not None and len(video) > max_video_frames:
            raise ValueError(
                f"{prefix}the video has {len(video)} frames, more than max_video_frames={max_video_frames} (an image "
                "processor option); sample fewer frames"
            )
        frames = [load_image(frame, f"{prefix}frame {t}", max_pixels) for t, frame in enumerate(video)]
        if timestamps is None:
            return frames, None
        try:
            seconds = [float(t) for t in timestamps]
        except (TypeError, ValueError, OverflowError) as error:
            raise ValueError(f"{prefix}'video_timestamps' must be a list of numbers, one per frame") from error
        if len(seconds) != len(frames) or not all(math.isfinite(t) for t in seconds):
            raise ValueError(
                f"{prefix}'video_timestamps' must hold one finite number per frame ({len(frames)} frames, got "
                f"{len(seconds)} values)"
            )
        return frames, seconds

    def _encode(self, items: list[dict]):
        """Processor inputs (on the CPU) of a batch of prepared items."""
        has_images = any(item["images"] is not None for item in items)
        has_videos = any(item["video"] is not None for item in items)
        has_timestamps = any(item["video_timestamps"] is not None for item in items)
        inputs = self.processor(
            text=[item["prompt"] for item in items],
            images=[item["images"] for item in items] if has_images else None,
            videos=[item["video"] for item in items] if has_videos else None,
            video_timestamps=[item["video_timestamps"] for item in items] if has_timestamps else None,
            regions=[item["regions"] for item in items],
            # One call's items share `propagate_regions`, hence this option.
            multi_frame_regions=items[0]["multi_frame_regions"],
            padding=True,
            padding_side="left",
            return_tensors="pt",
        )
        return dict(inputs)

    def _forward(
        self, inputs: dict, generate_kwargs: dict | None = None, share_image: bool = False
    ) -> list[torch.Tensor]:
        """Answer one batch (the processor's inputs, see `_encode`) with one `generate` call (with `share_image`, its
        items ask about the same image: `generate_sharing_image`); returns each item's new tokens."""
        inputs = {key: value.to(self.device) if torch.is_tensor(value) else value for key, value in inputs.items()}
        for key in inputs:
            # Only images follow the model dtype; boxes and masks keep float32 (bf16 rounds pixel coordinates).
            if key.endswith("pixel_values"):
                inputs[key] = inputs[key].to(self.model.dtype)
        generate_kwargs = self._prepare_generate_kwargs(generate_kwargs or {}, return_dict_in_generate=False)
        generate = self.model.generate_sharing_image if share_image else self.model.generate
        sequences = generate(**inputs, **generate_kwargs)
        # Left padding: every prompt ends at the same column, the answers start right after it.
        return list(sequences[:, inputs["input_ids"].shape[1] :])

    def postprocess(self, new_tokens: torch.Tensor) -> dict:
        """New tokens of one item -> `{"answer": str}`."""
        return {"answer": self.processor.decode(new_tokens, skip_special_tokens=True).strip()}


__all__ = ["RegionQAPipeline"]
