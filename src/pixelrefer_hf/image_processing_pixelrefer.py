"""Image processor for PixelRefer and PixelRefer-Lite.

Global images and video frames are processed exactly like VideoLLaMA3 (the PIL backend of transformers' native
`VideoLlama3ImageProcessorPil`: `smart_resize`, PIL bicubic, rescale, normalise, window-major patches). On top of that
this module implements the data side of the Scale-Adaptive Object Tokenizer (SAOT): one object crop per (region,
frame), rescaled so that the object covers a useful number of patches, with its patch-grid mask and crop box; the
Lite context images (a local crop and the whole frame per object); and the differential-frame token compression of
videos. See `docs/design.md` ("Scale-adaptive crop", "Processor output") for the contract with the model.

Interpolation choices (`resize_backend`; checkpoints converted from the released weights use `"opencv"`):

* object crops: OpenCV `INTER_LINEAR` for PixelRefer; Lite crops that shrink along both axes use OpenCV `INTER_AREA`
  instead, as the official Lite code does. `"opencv"` calls OpenCV and reproduces the official crops exactly;
  `"numpy"` emulates them in float64 (the same sampling grid), to within one grey level;
* Lite local (224) and global (336) images: OpenCV `INTER_AREA` (called, or emulated), in one step to their final size;
* patch-grid masks, as the official code computes them: PixelRefer resizes the uint8 crop mask with torch's uint8
  bilinear kernel (`F.interpolate(..., mode="bilinear", align_corners=False)`, fixed-point weights and a rounding to
  uint8 after each separable pass), emulated here in integer numpy, exactly, on any machine and thread count
  (`_torch_uint8_bilinear`); Lite resizes the float32 crop mask with OpenCV `INTER_LINEAR` (called by `"opencv"`,
  emulated from OpenCV's coefficient arithmetic by `"numpy"`). Both keep the patches above 0, as the official region
  encoders do.

Crops and context images match OpenCV exactly with `"opencv"` and to within one grey level with `"numpy"`
(`modeling_tests/test_parity.py`).
"""

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature
from transformers.image_utils import SizeDict
from transformers.models.video_llama_3.image_processing_pil_video_llama_3 import (
    VideoLlama3ImageProcessorKwargs,
    VideoLlama3ImageProcessorPil,
    smart_resize,
)
from transformers.processing_utils import Unpack
from transformers.utils import TensorType

from .configuration_pixelrefer import VARIANTS
from .region_utils import check_dense_tensor, region_to_mask, validate_frame_index

RESIZE_BACKENDS = ("numpy", "opencv")
OBJECT_CROPS = ("scale_adaptive", "frame")
# The processor constants whose released value depends on the variant; an option left at None takes it.
VARIANT_DEFAULTS = {
    "pixelrefer": {"max_object_patches": 100, "legacy_local_crop_reuse": False},
    "pixelrefer-lite": {"max_object_patches": 50, "legacy_local_crop_reuse": True},
}
# Resource bounds of one sample (see `PixelReferImageProcessor`), so that one upload cannot exhaust memory. The pixel
# bound is the size Pillow itself refuses as a decompression bomb (2 x its default `Image.MAX_IMAGE_PIXELS`).
DEFAULT_MAX_IMAGE_PIXELS = 178_956_970
DEFAULT_MAX_REGIONS_PER_SAMPLE = 512
DEFAULT_MAX_VIDEO_FRAMES = 1024
DEFAULT_MAX_PROMPT_CHARS = 1_000_000
RESOURCE_LIMITS = ("max_image_pixels", "max_regions_per_sample", "max_video_frames", "max_prompt_chars")
# The options of VideoLLaMA3's `_preprocess` that global images and frames take from the processor as they are.
_VIDEOLLAMA3_PREPROCESS_SETTINGS = (
    "do_resize",
    "resample",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "image_mean",
    "image_std",
    "patch_size",
    "temporal_patch_size",
)


def _opencv():
    """OpenCV (a dependency of the package), imported only by processors built with `resize_backend="opencv"`:
    processes that never resize with it do not load its native libraries."""
    try:
        import cv2
    except ImportError as error:
        raise ValueError('resize_backend="opencv" needs OpenCV: pip install opencv-python-headless') from error
    return cv2


def object_token_count(num_mask_patches: int, num_object_tokens: int, variant: str) -> int:
    """Number of object tokens (and `<REGION>` placeholders) one object crop yields.

    This is the single source of truth shared by the processor (text expansion) and the model (which checks that the
    prompt holds exactly as many `<REGION>` tokens as it produced object tokens).

    Args:
        num_mask_patches (`int`): patches of the crop's patch-grid mask that are inside the object.
        num_object_tokens (`int`): `n`, the number of k-means clusters per object (32 in the released models).
        variant (`str`): `"pixelrefer"` keeps at most one token per masked patch, `min(n, num_mask_patches)`;
            `"pixelrefer-lite"` always emits `n` tokens (the model zero-pads the missing ones).
    """
    if variant == "pixelrefer":
        return min(num_object_tokens, num_mask_patches)
    if variant == "pixelrefer-lite":
        return num_object_tokens
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


class PixelReferImageProcessorKwargs(VideoLlama3ImageProcessorKwargs, total=False):
    r"""
    variant (`str`, *optional*, defaults to `"pixelrefer"`):
        `"pixelrefer"` (Vision-Object) or `"pixelrefer-lite"` (Object-Only).
    num_object_tokens (`int`, *optional*, defaults to 32):
        Object tokens per crop (`n`); drives the crop upscaling and the token counts.
    context_pixels (`int`, *optional*, defaults to 28):
        Context added around the tight object box, in pixels of the original frame.
    max_object_patches (`int`, *optional*):
        Objects covering more patches than this are downscaled to about this many. 100 for PixelRefer, 50 for Lite.
    local_image_size (`int`, *optional*, defaults to 224):
        Side of the square Lite local context image.
    global_image_size (`int`, *optional*, defaults to 336):
        Side of the square Lite global context image.
    legacy_local_crop_reuse (`bool`, *optional*):
        Lite: every object on a frame reuses the local image of the first object on that frame, as the released
        Lite weights were trained. Defaults to `True` for Lite and `False` for PixelRefer (where it is unused).
    max_visual_tokens (`int`, *optional*, defaults to 8192):
        Visual token budget of one sample (official `mm_max_length`), shared between its images, frames or crops.
    video_merge_size (`int`, *optional*, defaults to 2):
        Spatial merge of video frames (their 2x2 patches become one LLM token).
    use_token_compression (`bool`, *optional*, defaults to `True`):
        Drop merged video tokens that barely change from the previous frame (PixelRefer videos with > 1 frame).
    token_compression_threshold (`float`, *optional*, defaults to 0.1):
        A merged token is kept when its mean absolute change (normalised pixel values x 255) exceeds this.
    resize_backend (`str`, *optional*, defaults to `"numpy"`):
        How object crops, Lite context images and Lite patch masks are resized. `"opencv"` calls OpenCV as the
        official code does and reproduces its preprocessing exactly; `pixelrefer convert` writes it into converted
        checkpoints. `"numpy"` (OpenCV not loaded, the same result on every machine) matches OpenCV to within one
        grey level; the tiny test models and the bundled demo checkpoints were trained with it.
    object_crop (`str`, *optional*, defaults to `"scale_adaptive"`):
        `"scale_adaptive"` is SAOT's crop. `"frame"` is the ablation baseline of plain mask pooling: an object's
        features are the patches under its mask in the whole frame at native scale (no crop, no upscaling of small
        objects); its box and token count rules are unchanged.
    multi_frame_regions (`bool`, *optional*, defaults to `False`):
        PixelRefer only: accept a video region given on several frames and write it as
        `[Time t:<REGION>...,Time t:<REGION>...]`. The official PixelRefer takes each region on one frame (prompt
        `[<REGION>...]`) and its released weights never saw the timed form, so by default such a region is refused
        with an error. PixelRefer-Lite always uses the timed form (as released) and ignores this option.
    max_image_pixels (`int`, *optional*, defaults to 178956970):
        Largest `H * W` of one image or video frame; a larger one is refused before it is converted.
    max_regions_per_sample (`int`, *optional*, defaults to 512):
        Most regions one sample may hold.
    max_video_frames (`int`, *optional*, defaults to 1024):
        Most frames one video may hold.
    max_prompt_chars (`int`, *optional*, defaults to 1000000):
        Longest text of one sample, in characters before expansion (checked by the processor).
    """

    variant: str
    max_image_pixels: int | None
    max_regions_per_sample: int | None
    max_video_frames: int | None
    max_prompt_chars: int | None
    num_object_tokens: int
    context_pixels: int
    max_object_patches: int
    local_image_size: int
    global_image_size: int
    legacy_local_crop_reuse: bool
    resize_backend: str
    object_crop: str
    multi_frame_regions: bool
    max_visual_tokens: int
    video_merge_size: int
    use_token_compression: bool
    token_compression_threshold: float


@dataclass
class PixelReferSample:
    """One validated sample, ready for [`PixelReferImageProcessor.process_samples`].

    Attributes:
        frames (`list[np.ndarray]`): the images of an image sample or the frames of a video, `(H, W, 3)` RGB uint8.
        is_video (`bool`): whether `frames` are the frames of one video.
        timestamps (`list[float]`): seconds of each video frame; empty for images.
        regions (`list[list[tuple[int, np.ndarray]]]`): per region, its `(frame index, (H, W) bool mask)` pairs in
            ascending frame order (exactly one pair for an image region; the index is then the image index).
    """

    frames: list[np.ndarray]
    is_video: bool
    timestamps: list[float]
    regions: list[list[tuple[int, np.ndarray]]]


@dataclass
class PixelReferSampleLayout:
    """What the text side needs to expand one sample's placeholders.

    Attributes:
        is_video (`bool`): whether the sample holds a video.
        visual_token_counts (`list[int]`): `<image>` tokens of each image or video frame after token compression;
            empty for PixelRefer-Lite, whose images never reach the LLM.
        frame_timestamps (`list[float]`): seconds of each video frame; empty for images.
        region_token_counts (`list[list[int]]`): per region, the object-token count of each of its crops.
        region_timestamps (`list[list[float]]`): per region, the timestamp of each of its crops (videos only).
    """

    is_video: bool
    visual_token_counts: list[int]
    frame_timestamps: list[float]
    region_token_counts: list[list[int]]
    region_timestamps: list[list[float]]


def to_rgb_array(image, where: str) -> np.ndarray:
    """Convert a PIL image, a numpy array (HWC, or CHW when the last axis is not a channel axis) or a torch tensor
    (CHW, or HWC when the first axis is not a channel axis) into an `(H, W, 3)` RGB uint8 array."""
    if isinstance(image, Image.Image):
        return np.array(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        check_dense_tensor(image, where)
        array = image.detach().cpu()
        if array.is_floating_point():
            array = array.float()  # numpy has no bfloat16
        array = array.numpy()
        if array.ndim == 3 and array.shape[0] in (1, 3, 4):
            array = array.transpose(1, 2, 0)
    elif isinstance(image, np.ndarray):
        array = image
        if array.ndim == 3 and array.shape[-1] not in (1, 3, 4) and array.shape[0] in (1, 3, 4):
            array = array.transpose(1, 2, 0)
    else:
        raise ValueError(
            f"{where}: unsupported image type {type(image).__name__}; pass a PIL image, a numpy array or a torch tensor"
        )

    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"{where}: expected an (H, W), (H, W, C) or (C, H, W) image with 1, 3 or 4 channels, got "
            f"shape {tuple(image.shape)}"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{where}: the image is empty (shape {tuple(image.shape)})")

    if array.dtype == np.uint8:
        pass
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise ValueError(f"{where}: floating-point images must hold finite values in [0, 1]")
        array = np.round(array * 255).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.integer) and array.dtype != np.bool_:
        if array.min() < 0 or array.max() > 255:
            raise ValueError(f"{where}: integer images must hold values in [0, 255]")
        array = array.astype(np.uint8)
    else:
        raise ValueError(f"{where}: unsupported image dtype {array.dtype}")

    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    # RGBA: the alpha channel is dropped (no compositing), as `PIL.Image.convert("RGB")` does.
    return np.ascontiguousarray(array[:, :, :3])


def _is_video_like(value) -> bool:
    """A list/tuple of frames or a 4-D `(T, ...)` array or tensor."""
    return isinstance(value, (list, tuple)) or (isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim == 4)


def _blend_neighbours(values: np.ndarray, axis: int, source: np.ndarray, fraction: np.ndarray) -> np.ndarray:
    """Linear interpolation along `axis`: `values[source] * (1 - fraction) + values[source + 1] * fraction`, the
    neighbour clamped to the last index. `source` and `fraction` have one entry per output position."""
    shape = [1] * values.ndim
    shape[axis] = -1
    fraction = np.asarray(fraction, dtype=np.float64).reshape(shape)
    following = values.take(np.minimum(source + 1, values.shape[axis] - 1), axis=axis)
    return values.take(source, axis=axis) * (1 - fraction) + following * fraction


def _box_resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize an `(H, W, 3)` uint8 image like OpenCV `INTER_AREA` (what the official Lite code calls), in float.

    Shrinking along both axes (or keeping a size) averages every input pixel by the area it covers in the output
    pixel. Otherwise OpenCV switches to a linear interpolation whose weight is the fraction of the output pixel that
    lies past an input pixel boundary (for an integer enlargement: pixel replication except at the seams), on both
    axes. OpenCV works in fixed point, so results may differ from it by one grey level. Each axis costs O(pixels).
    """
    in_height, in_width = image.shape[:2]
    if (in_height, in_width) == (height, width):
        return image
    shrink = in_height >= height and in_width >= width

    def resize_axis(values: np.ndarray, axis: int, size_out: int) -> np.ndarray:
        size_in = values.shape[axis]
        if shrink:
            # Output pixel o averages the input over [o * scale, (o + 1) * scale): differences of the running sum,
            # taken at fractional positions (the running sum grows linearly inside a pixel).
            scale = size_in / size_out
            running = np.cumsum(values, axis=axis)
            running = np.concatenate([np.zeros_like(running.take([0], axis=axis)), running], axis=axis)
            edges = np.arange(size_out + 1) * scale
            start = np.minimum(np.floor(edges).astype(np.int64), size_in - 1)
            shape = [1] * values.ndim
            shape[axis] = -1
            at_edges = running.take(start, axis=axis) + (edges - start).reshape(shape) * values.take(start, axis=axis)
            return np.diff(at_edges, axis=axis) / scale
        # OpenCV's exact arithmetic (scale as the reciprocal of out/in, the fraction in float32): at the seams, where
        # `outputs * scale` is an integer, another rounding picks the neighbouring source pixel.
        inverse = size_out / size_in
        outputs = np.arange(size_out)
        source = np.floor(outputs * (1.0 / inverse)).astype(np.int64)
        fraction = ((outputs + 1) - (source + 1) * inverse).astype(np.float32)
        fraction = np.where(fraction <= 0, 0.0, fraction - np.floor(fraction))
        fraction = np.where(source >= size_in - 1, 0.0, fraction)
        source = np.minimum(source, size_in - 1)
        return _blend_neighbours(values, axis, source, fraction)

    resized = resize_axis(resize_axis(image.astype(np.float64), 0, height), 1, width)  # (height, width, 3)
    return np.clip(np.rint(resized), 0, 255).astype(np.uint8)


def _bilinear(values: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of the first two axes of `values` with half-pixel centres and no antialiasing (torch
    `align_corners=False`, OpenCV `INTER_LINEAR`), in float64.

    Computed separably in numpy, the same on every machine (torch's float CPU kernel rounds values next to x.5
    differently with the number of threads). Used by `resize_backend="numpy"` for object crops.
    """

    def resize_axis(array: np.ndarray, axis: int, size_out: int) -> np.ndarray:
        size_in = array.shape[axis]
        source = np.maximum((np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5, 0.0)
        lower = np.minimum(np.floor(source).astype(np.int64), size_in - 1)
        return _blend_neighbours(array, axis, lower, source - lower)

    return resize_axis(resize_axis(values.astype(np.float64), 0, height), 1, width)


def _bilinear_resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of an `(H, W, 3)` uint8 image (see `_bilinear`), rounded back to uint8."""
    if image.shape[:2] == (height, width):
        return image
    return np.clip(np.rint(_bilinear(image, height, width)), 0, 255).astype(np.uint8)


def _torch_uint8_linear_taps(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """The fixed-point taps of torch's uint8 linear resize along one axis (`align_corners=False`, no antialias, no
    scale factor): per output index, two source indices, their integer weights and the weights' precision in bits.

    Follows `HelperInterpBase::_compute_indices_min_size_weights` and `_compute_index_ranges_int16_weights`
    (aten/src/ATen/native/cpu/UpSampleKernel.cpp): the source coordinate in float64, clamped at 0; its integer part
    taken in float32 (`floorf`); the two linear weights in float64, both given to the single source pixel at the last
    index; the precision is the first `p` at which the axis's largest weight times `2**(p + 1)`, rounded, reaches
    2**15 (14 bits when a weight is 1, else 15 for linear weights); each weight is rounded half up to `p` bits.
    """
    scale = size_in / size_out
    source = np.maximum(scale * (np.arange(size_out) + 0.5) - 0.5, 0.0)
    lower = np.minimum(np.floor(source.astype(np.float32)).astype(np.int64), size_in - 1)
    fraction = np.clip(source - lower, 0.0, 1.0)
    # The triangle filter at the two taps, `1 - |x|` for |x| < 1, in torch's order of operations.
    weight_lower = np.where(fraction < 1.0, 1.0 - fraction, 0.0)
    distance = 1.0 - fraction
    weight_upper = np.where(distance < 1.0, 1.0 - distance, 0.0)
    at_end = lower >= size_in - 1
    upper = np.where(at_end, lower, lower + 1)
    weight_lower = np.where(at_end, weight_lower + weight_upper, weight_lower)
    weight_upper = np.where(at_end, 0.0, weight_upper)
    largest = float(max(weight_lower.max(), weight_upper.max()))
    precision = 0
    while precision < 22 and int(0.5 + largest * (1 << (precision + 1))) < 1 << 15:
        precision += 1
    scaled_lower = np.floor(0.5 + weight_lower * (1 << precision)).astype(np.int64)
    scaled_upper = np.floor(0.5 + weight_upper * (1 << precision)).astype(np.int64)
    return lower, upper, scaled_lower, scaled_upper, precision


def _torch_uint8_bilinear(values: np.ndarray, height: int, width: int) -> np.ndarray:
    """`torch.nn.functional.interpolate(values[None, None], (height, width), mode="bilinear", align_corners=False)`
    for an `(H, W)` uint8 array, bit for bit, in integer numpy (no dependence on threads or CPU features).

    torch's uint8 kernel is separable: the width first, then the height, each pass skipped when that size does not
    change; every pass sums integer weights times pixels, adds half a unit, shifts the precision away and clamps to
    uint8 (so a mask value of exactly 0.25 in float, 0.5 after the first pass, rounds up to 1). The AVX2 / AVX-512
    kernels that x86 CPUs run compute exactly this. (torch's portable fallback for CPUs without AVX2 reads the wrong
    rows when the output is one column wide; that case is not reproduced.)
    """
    result = values.astype(np.int64)
    for axis, size_out in ((1, width), (0, height)):
        size_in = result.shape[axis]
        if size_in == size_out:
            continue
        lower, upper, weight_lower, weight_upper, precision = _torch_uint8_linear_taps(size_in, size_out)
        shape = [1, 1]
        shape[axis] = -1
        total = (
            (1 << (precision - 1))
            + result.take(lower, axis=axis) * weight_lower.reshape(shape)
            + result.take(upper, axis=axis) * weight_upper.reshape(shape)
        )
        result = np.clip(total >> precision, 0, 255)
    return result.astype(np.uint8)


def _opencv_linear_taps(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray]:
    """The two source pixels with a positive weight in OpenCV's `INTER_LINEAR` resize along one axis, per output
    index (the same index twice when only one has), from OpenCV's own coefficient arithmetic: the scale is the
    reciprocal of `size_out / size_in`, the source coordinate `(o + 0.5) * scale - 0.5` is rounded to float32, its
    integer part and both neighbours are clamped into the axis, and the second neighbour weighs the (float32)
    fractional part."""
    coordinate = ((np.arange(size_out) + 0.5) * (1.0 / (size_out / size_in)) - 0.5).astype(np.float32)
    integer = np.floor(coordinate)
    lower = np.clip(integer, 0, size_in - 1).astype(np.int64)
    upper = np.where(coordinate > integer, np.clip(integer + 1, 0, size_in - 1).astype(np.int64), lower)
    return lower, upper


def _opencv_linear_support(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Where `cv2.resize(mask.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)` is above 0, for
    an `(H, W)` {0, 1} mask: the output pixels with a positive weight on a pixel of the mask.

    Exact for OpenCV's own kernels. opencv-python on x86 hands some float resizes to Intel IPP, whose weights are
    computed in double precision: a weight that OpenCV rounds to 0 can then be ~1e-15, which makes a patch whose
    sample point lies exactly on the mask's edge positive. `resize_backend="opencv"` calls OpenCV and gets that too.
    """
    rows_lower, rows_upper = _opencv_linear_taps(mask.shape[0], height)
    cols_lower, cols_upper = _opencv_linear_taps(mask.shape[1], width)
    present = mask.astype(bool)
    horizontal = present[:, cols_lower] | present[:, cols_upper]
    return horizontal[rows_lower] | horizontal[rows_upper]


class PixelReferImageProcessor(VideoLlama3ImageProcessorPil):
    r"""
    Image processor of PixelRefer / PixelRefer-Lite.

    Calling it like `VideoLlama3ImageProcessorPil` (`image_processor(images)`) processes still images exactly like
    VideoLLaMA3. The PixelRefer inputs (per-sample images or videos plus regions) go through
    [`~PixelReferImageProcessor.preprocess_multimodal`], usually called by [`PixelReferProcessor`].

    Budgets (official inference behaviour, `P = patch_size`): a sample's `N` still images get at most
    `max_visual_tokens // N` patches each (merge 1); its `T` video frames at most `max_visual_tokens * merge**2 // T`
    patches each, i.e. `max_visual_tokens // T` merged tokens; its `m` object crops (and, for Lite, its local and
    global context images) at most `max_visual_tokens // m` patches each. `size["shortest_edge"]` is the minimum pixel
    count of every image, frame and crop; `size["longest_edge"]` only applies to the plain VideoLLaMA3 call.

    Options: every field of [`PixelReferImageProcessorKwargs`] (documented there, with its default), plus every
    `VideoLlama3ImageProcessorPil` option (`size`, `patch_size`, `merge_size` of still images, `image_mean`,
    `image_std`, `resample`, ...). Defaults are the class attributes below; `max_object_patches` and
    `legacy_local_crop_reuse` left unset take their variant's released value (`VARIANT_DEFAULTS`).
    """

    valid_kwargs = PixelReferImageProcessorKwargs
    model_input_names = [
        "pixel_values",
        "image_grid_thw",
        "image_merge_sizes",
        "image_keep_mask",
        "region_pixel_values",
        "region_grid_thw",
        "region_patch_masks",
        "region_boxes",
        "region_image_sizes",
        "region_local_pixel_values",
        "region_local_grid_thw",
        "region_local_index",
        "region_global_pixel_values",
        "region_global_grid_thw",
        "region_global_index",
    ]

    variant = "pixelrefer"
    num_object_tokens = 32
    context_pixels = 28
    max_object_patches = None  # VARIANT_DEFAULTS
    local_image_size = 224
    global_image_size = 336
    legacy_local_crop_reuse = None  # VARIANT_DEFAULTS
    max_visual_tokens = 8192
    video_merge_size = 2
    use_token_compression = True
    token_compression_threshold = 0.1
    resize_backend = "numpy"
    object_crop = "scale_adaptive"
    multi_frame_regions = False
    max_image_pixels = DEFAULT_MAX_IMAGE_PIXELS
    max_regions_per_sample = DEFAULT_MAX_REGIONS_PER_SAMPLE
    max_video_frames = DEFAULT_MAX_VIDEO_FRAMES
    max_prompt_chars = DEFAULT_MAX_PROMPT_CHARS

    def __init__(self, **kwargs: Unpack[PixelReferImageProcessorKwargs]):
        variant = kwargs.setdefault("variant", self.variant)
        for name, choices in (
            ("variant", VARIANTS),
            ("resize_backend", RESIZE_BACKENDS),
            ("object_crop", OBJECT_CROPS),
        ):
            value = kwargs.get(name, getattr(self, name))
            if value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        for name, value in VARIANT_DEFAULTS[variant].items():
            if kwargs.get(name) is None:
                kwargs[name] = value
        for name in RESOURCE_LIMITS:
            value = kwargs.get(name, getattr(self, name))
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if kwargs.get("resize_backend") == "opencv":
            _opencv()  # fail at construction, not at the first crop
        if kwargs.get("size") is None and "min_pixels" not in kwargs and "max_pixels" not in kwargs:
            # The plain VideoLLaMA3 call then gets the budget of a one-image sample.
            patch_size = kwargs.get("patch_size") or self.patch_size
            max_visual_tokens = kwargs.get("max_visual_tokens") or self.max_visual_tokens
            kwargs["size"] = {"shortest_edge": 56 * 56, "longest_edge": max_visual_tokens * patch_size**2}
        super().__init__(**kwargs)

    @property
    def is_lite(self) -> bool:
        return self.variant == "pixelrefer-lite"

    # ------------------------------------------------------------------------------------------------------------
    # Input validation (one sample at a time, so that every error names its sample)
    # ------------------------------------------------------------------------------------------------------------

    def prepare_sample(
        self,
        index: int,
        images=None,
        video=None,
        regions: list | None = None,
        video_timestamps: list[float] | None = None,
    ) -> PixelReferSample:
        """Validate and normalise the visual inputs of one sample.

        Args:
            index (`int`): position of the sample in the batch, used in error messages (`"sample 2, region 1: ..."`).
            images: `None`, one image, or a list of images (PIL, numpy HWC, torch CHW/HWC). An empty list means none.
            video: `None`, a list of frames, a 4-D array/tensor `(T, ...)`, or a one-element list holding either (the
                form `apply_chat_template` produces). An empty list means no video.
            regions (`list`, *optional*): the sample's regions, in `<region>` placeholder order. For an image sample
                each is a mask, box `[x0, y0, x1, y1]` or COCO RLE of its image (`region_utils.region_to_mask`); with
                several images write `{"image_index": i, "region": r}`. For a video each is a dict
                `{frame_index: mask | box | rle}` with one or more frames.
            video_timestamps (`list[float]`, *optional*): seconds of each video frame. Defaults to the frame index
                (1 fps sampling).

        Raises:
            `ValueError` naming the sample (and region / frame) for any inconsistent input.
        """
        where = f"sample {index}"
        image_list = [] if images is None else list(images) if isinstance(images, (list, tuple)) else [images]
        frames_in = self._video_frames(video, where)
        if image_list and frames_in is not None:
            raise ValueError(f"{where}: give either images or a video, not both")

        if frames_in is not None:
            if self.max_video_frames is not None and len(frames_in) > self.max_video_frames:
                raise ValueError(
                    f"{where}: the video has {len(frames_in)} frames, more than max_video_frames="
                    f"{self.max_video_frames} (an image processor option); sample fewer frames"
                )
            for t, frame in enumerate(frames_in):
                self.check_image_pixels(frame, f"{where}, frame {t}")
            frames = [to_rgb_array(frame, f"{where}, frame {t}") for t, frame in enumerate(frames_in)]
            for t, frame in enumerate(frames[1:], start=1):
                if frame.shape != frames[0].shape:
                    raise ValueError(
                        f"{where}, frame {t}: all frames of a video must have the same size, got "
                        f"{frame.shape[:2]} after {frames[0].shape[:2]}"
                    )
            timestamps = self._video_timestamps(video_timestamps, len(frames), where)
        else:
            for k, image in enumerate(image_list):
                self.check_image_pixels(image, f"{where}, image {k}")
            frames = [to_rgb_array(image, f"{where}, image {k}") for k, image in enumerate(image_list)]
            if video_timestamps is not None and not (
                hasattr(video_timestamps, "__len__") and len(video_timestamps) == 0
            ):
                raise ValueError(f"{where}: video_timestamps were given but the sample has no video")
            timestamps = []

        if regions is None:
            regions = []
        if not isinstance(regions, (list, tuple)):
            raise ValueError(f"{where}: regions must be a list of regions, got {type(regions).__name__}")
        if regions and not frames:
            raise ValueError(f"{where}: {len(regions)} region(s) were given but the sample has no image or video")
        if self.max_regions_per_sample is not None and len(regions) > self.max_regions_per_sample:
            raise ValueError(
                f"{where}: {len(regions)} regions, more than max_regions_per_sample={self.max_regions_per_sample} "
                "(an image processor option)"
            )

        if frames_in is not None:
            parsed = [self._video_region(region, frames, f"{where}, region {j}") for j, region in enumerate(regions)]
        else:
            parsed = [self._image_region(region, frames, index, j) for j, region in enumerate(regions)]
        return PixelReferSample(frames=frames, is_video=frames_in is not None, timestamps=timestamps, regions=parsed)

    def check_image_pixels(self, image, where: str) -> None:
        """Refuse an image or frame larger than `max_image_pixels` before it is converted (PIL images are measured
        without decoding them)."""
        if self.max_image_pixels is None:
            return
        if isinstance(image, Image.Image):
            height, width = image.height, image.width
        elif isinstance(image, (np.ndarray, torch.Tensor)) and image.ndim in (2, 3):
            shape = tuple(image.shape)
            channels_first = len(shape) == 3 and shape[-1] not in (1, 3, 4) and shape[0] in (1, 3, 4)
            height, width = shape[1:3] if channels_first else shape[:2]
            if isinstance(image, torch.Tensor) and len(shape) == 3 and shape[0] in (1, 3, 4):
                height, width = shape[1:3]
        else:
            return  # to_rgb_array names what is wrong with it
        if height * width > self.max_image_pixels:
            raise ValueError(
                f"{where}: the image is {height}x{width} = {height * width} pixels, more than max_image_pixels="
                f"{self.max_image_pixels} (an image processor option)"
            )

    @staticmethod
    def _video_frames(video, where: str) -> list | None:
        """The frames of a sample's video, `None` when it has none; raises for zero frames or several videos."""
        if video is None:
            return None
        if isinstance(video, (list, tuple)):
            if len(video) == 0:
                return None
            if all(_is_video_like(item) for item in video):
                if len(video) > 1:
                    raise ValueError(f"{where}: a sample holds at most one video, got {len(video)}")
                video = video[0]
        if isinstance(video, (np.ndarray, torch.Tensor)):
            if video.ndim != 4:
                raise ValueError(f"{where}: a video array must be 4-D (T, ...), got shape {tuple(video.shape)}")
            frames = list(video)
        elif isinstance(video, (list, tuple)):
            frames = list(video)
        else:
            raise ValueError(f"{where}: a video must be a list of frames or a 4-D array, got {type(video).__name__}")
        if not frames:
            raise ValueError(f"{where}: the video has no frames")
        return frames

    @staticmethod
    def _video_timestamps(video_timestamps, num_frames: int, where: str) -> list[float]:
        if video_timestamps is None:
            return [float(t) for t in range(num_frames)]
        try:
            timestamps = [float(t) for t in video_timestamps]
        except (TypeError, ValueError) as error:
            raise ValueError(f"{where}: video timestamps must be a list of numbers") from error
        if len(timestamps) != num_frames:
            raise ValueError(f"{where}: {len(timestamps)} video timestamps were given for {num_frames} frames")
        if not all(math.isfinite(t) for t in timestamps):
            raise ValueError(f"{where}: video timestamps must be finite numbers")
        return timestamps

    @staticmethod
    def _image_region(region, frames: list[np.ndarray], sample_index: int, region_index: int):
        where = f"sample {sample_index}, region {region_index}"
        if isinstance(region, dict) and "image_index" in region:
            if "region" not in region:
                raise ValueError(f"{where}: a dict with 'image_index' also needs a 'region' key")
            image_index = region["image_index"]
            if isinstance(image_index, bool) or not isinstance(image_index, (int, np.integer)):
                raise ValueError(f"{where}: image_index must be an integer, got {image_index!r}")
            if not 0 <= image_index < len(frames):
                raise ValueError(f"{where}: image_index {image_index} is out of range for {len(frames)} image(s)")
            region = region["region"]
        elif len(frames) > 1:
            raise ValueError(
                f"sample {sample_index} has {len(frames)} images; say which one a region refers to: give region "
                f"{region_index} as {{'image_index': i, 'region': ...}}"
            )
        else:
            image_index = 0
        image_index = int(image_index)
        return [(image_index, region_to_mask(region, frames[image_index].shape[:2], where))]

    @staticmethod
    def _video_region(region, frames: list[np.ndarray], where: str):
        if not isinstance(region, dict) or "counts" in region or "image_index" in region:
            raise ValueError(f"{where}: a video region must be a dict {{frame_index: mask | box | rle}}")
        if not region:
            raise ValueError(f"{where}: a video region needs at least one frame")
        parsed = {}
        for key, value in region.items():
            frame_index = validate_frame_index(key, len(frames), where)
            if frame_index in parsed:
                raise ValueError(f"{where}: frame {frame_index} is given twice")
            parsed[frame_index] = region_to_mask(value, frames[frame_index].shape[:2], f"{where}, frame {frame_index}")
        return sorted(parsed.items(), key=lambda item: item[0])

    # ------------------------------------------------------------------------------------------------------------
    # Processing
    # ------------------------------------------------------------------------------------------------------------

    def preprocess_multimodal(
        self,
        images: list | None = None,
        videos: list | None = None,
        regions: list | None = None,
        video_timestamps: list | None = None,
        return_tensors: str | TensorType | None = "pt",
    ) -> tuple[BatchFeature, list[PixelReferSampleLayout]]:
        """Process a batch of samples: global images / frames, object crops and (Lite) context images.

        Every argument is a list with one entry per sample (or `None`); the entries are described in
        [`~PixelReferImageProcessor.prepare_sample`].

        Returns:
            `tuple[BatchFeature, list[PixelReferSampleLayout]]`: the tensors of the processor-output table of
            `docs/design.md` (only the keys that apply to the batch), and one layout per sample with the token counts
            the text side needs.
        """
        per_sample = {"images": images, "videos": videos, "regions": regions, "video_timestamps": video_timestamps}
        lengths = {name: len(value) for name, value in per_sample.items() if value is not None}
        if not lengths:
            raise ValueError("preprocess_multimodal needs images or videos")
        if len(set(lengths.values())) != 1:
            raise ValueError(f"every argument needs one entry per sample, got lengths {lengths}")
        batch_size = next(iter(lengths.values()))
        entries = {name: value if value is not None else [None] * batch_size for name, value in per_sample.items()}
        samples = [
            self.prepare_sample(
                i, entries["images"][i], entries["videos"][i], entries["regions"][i], entries["video_timestamps"][i]
            )
            for i in range(batch_size)
        ]
        return self.process_samples(samples, return_tensors=return_tensors)

    def process_samples(
        self, samples: list[PixelReferSample], return_tensors: str | TensorType | None = "pt"
    ) -> tuple[BatchFeature, list[PixelReferSampleLayout]]:
        """Process samples validated by [`~PixelReferImageProcessor.prepare_sample`]; see `preprocess_multimodal`.

        Crops are ordered sample-major, then region, then frame (ascending).
        """
        outputs: dict[str, list] = {key: [] for key in self.model_input_names}
        # Lite global context images of the whole call, by frame content: samples asking about the same picture
        # (several questions about one image) share one, so the tower encodes it once.
        global_images: dict[tuple, int] = {}
        layouts = []
        for sample_index, sample in enumerate(samples):
            visual_token_counts = []
            if sample.frames and not self.is_lite:
                visual_token_counts = self._encode_frames(sample, sample_index, outputs)
            region_token_counts, region_timestamps = self._encode_regions(sample, sample_index, outputs, global_images)
            layouts.append(
                PixelReferSampleLayout(
                    is_video=sample.is_video,
                    visual_token_counts=visual_token_counts,
                    frame_timestamps=list(sample.timestamps),
                    region_token_counts=region_token_counts,
                    region_timestamps=region_timestamps,
                )
            )

        data = {}
        for key, values in outputs.items():
            if not values:
                continue
            if key.endswith("pixel_values") or key in ("image_keep_mask", "region_patch_masks"):
                data[key] = np.concatenate(values, axis=0)  # per-image chunks, concatenated along patches
            else:
                data[key] = np.asarray(values, dtype=np.float32 if key == "region_boxes" else np.int64)
        return BatchFeature(data=data, tensor_type=return_tensors), layouts

    def _encode_frames(self, sample: PixelReferSample, sample_index: int, outputs: dict[str, list]) -> list[int]:
        """Global images (merge `merge_size`) or video frames (merge `video_merge_size`) of one PixelRefer sample.

        Appends to `outputs` and returns the number of `<image>` tokens of each image / frame.
        """
        merge = self.video_merge_size if sample.is_video else self.merge_size
        num_frames = len(sample.frames)
        max_pixels = self.max_visual_tokens * merge**2 * self.patch_size**2 // num_frames
        try:
            # VideoLLaMA3's own resize / rescale / normalise / patchify with this processor's settings; only the
            # pixel budget (shared by the sample's frames) and the merge size differ per sample.
            settings = {name: getattr(self, name) for name in _VIDEOLLAMA3_PREPROCESS_SETTINGS}
            processed = self._preprocess(
                [frame.transpose(2, 0, 1) for frame in sample.frames],  # (3, H, W) uint8, channels first
                size=SizeDict(shortest_edge=self.size.shortest_edge, longest_edge=max_pixels),
                merge_size=merge,
                return_tensors=None,
                **settings,
            )
        except ValueError as error:  # e.g. smart_resize rejects an aspect ratio above 200
            raise ValueError(f"sample {sample_index}: {error}") from error
        pixel_values, grid_thw = processed["pixel_values"], processed["image_grid_thw"]
        tokens_per_frame = int(grid_thw[0, 1] * grid_thw[0, 2]) // merge**2

        if sample.is_video:
            keep = self.video_keep_mask(pixel_values, num_frames, merge)  # (T * tokens_per_frame,)
        else:
            keep = np.ones(int((grid_thw[:, 1] * grid_thw[:, 2]).sum()) // merge**2, dtype=bool)

        outputs["pixel_values"].append(pixel_values)
        outputs["image_grid_thw"].extend(grid_thw.tolist())
        outputs["image_merge_sizes"].extend([merge] * num_frames)
        outputs["image_keep_mask"].append(keep)
        if sample.is_video:
            return keep.reshape(num_frames, tokens_per_frame).sum(-1).tolist()
        return [int(h * w) // merge**2 for _, h, w in grid_thw]

    def video_keep_mask(self, pixel_values: np.ndarray, num_frames: int, merge_size: int) -> np.ndarray:
        """Differential-frame token compression of one video (VideoLLaMA3 / PixelRefer).

        Args:
            pixel_values (`np.ndarray` of shape `(num_frames * h * w, C * P * P)`): the video's normalised patches in
                window-major order, so that every run of `merge_size**2` rows is one merged token. All frames share
                the grid `(h, w)`.
            num_frames (`int`): `T`.
            merge_size (`int`): spatial merge of the frames.

        Returns:
            `np.ndarray` of shape `(num_frames * h * w // merge_size**2,)`, bool: the merged tokens to keep. Frame 0
            keeps everything; a later token is kept when `mean(|x_t - x_{t-1}|) * 255 > token_compression_threshold`;
            a frame left with no token keeps its first one. Without compression (or with one frame) all are kept.
        """
        # (T * h * w, D) -> (T, h * w / m^2, m^2 * D): one row per merged token.
        tokens = pixel_values.reshape(num_frames, -1, merge_size**2 * pixel_values.shape[-1])
        keep = np.ones(tokens.shape[:2], dtype=bool)
        if self.use_token_compression and num_frames > 1:
            difference = np.abs(tokens[1:] - tokens[:-1]).mean(axis=-1) * 255  # (T - 1, tokens per frame)
            keep[1:] = difference > self.token_compression_threshold
            keep[np.flatnonzero(~keep.any(axis=-1)), 0] = True
        return keep.reshape(-1)

    def _encode_regions(
        self, sample: PixelReferSample, sample_index: int, outputs: dict[str, list], global_images: dict[tuple, int]
    ) -> tuple[list[list[int]], list[list[float]]]:
        """Object crops (and Lite context images) of one sample; appends to `outputs`. `global_images` maps a frame's
        content and pixel budget to its Lite global context image among those of the call.

        Returns per region the object-token count and the timestamp of each of its crops.
        """
        num_crops = sum(len(frames) for frames in sample.regions)
        if num_crops == 0:
            return [], []
        # Official inference: the sample's budget is shared between its crops (and Lite context images).
        max_pixels = self.max_visual_tokens * self.patch_size**2 // num_crops
        local_of_frame: dict[int, int] = {}
        # Each frame's content digest, computed once however many regions lie on it.
        frame_digests: dict[int, tuple] = {}

        token_counts, timestamps = [], []
        for region_index, region_frames in enumerate(sample.regions):
            region_counts, region_times = [], []
            for frame_index, mask in region_frames:
                where = f"sample {sample_index}, region {region_index}"
                if sample.is_video:
                    where += f", frame {frame_index}"
                frame = sample.frames[frame_index]
                crop = self._object_crop(frame, mask, max_pixels, where)

                outputs["region_pixel_values"].append(crop["pixel_values"])
                outputs["region_grid_thw"].append([1, *crop["grid"]])
                outputs["region_patch_masks"].append(crop["patch_mask"])
                outputs["region_boxes"].append(crop["box"])
                outputs["region_image_sizes"].append(list(frame.shape[:2]))
                num_mask_patches = int(crop["patch_mask"].sum())
                region_counts.append(object_token_count(num_mask_patches, self.num_object_tokens, self.variant))
                if sample.is_video:
                    region_times.append(sample.timestamps[frame_index])

                if self.is_lite:
                    # `local_of_frame` remembers the first local image made on each frame: the one every later
                    # region on that frame reuses when `legacy_local_crop_reuse` is on. Globals are always shared.
                    reuse = self.legacy_local_crop_reuse and frame_index in local_of_frame
                    if not reuse:
                        top, left, row_end, col_end = crop["crop_window"]
                        local = self._context_image(frame[top:row_end, left:col_end], self.local_image_size, max_pixels)
                        local_of_frame.setdefault(frame_index, len(outputs["region_local_grid_thw"]))
                        outputs["region_local_index"].append(len(outputs["region_local_grid_thw"]))
                        outputs["region_local_pixel_values"].append(local[0])
                        outputs["region_local_grid_thw"].append([1, local[1], local[2]])
                    else:
                        outputs["region_local_index"].append(local_of_frame[frame_index])
                    if frame_index not in frame_digests:
                        digest = hashlib.blake2b(frame.tobytes(), digest_size=16).digest()
                        frame_digests[frame_index] = (frame.shape, digest)
                    key = (*frame_digests[frame_index], max_pixels)
                    if key not in global_images:
                        whole = self._context_image(frame, self.global_image_size, max_pixels)
                        global_images[key] = len(outputs["region_global_grid_thw"])
                        outputs["region_global_pixel_values"].append(whole[0])
                        outputs["region_global_grid_thw"].append([1, whole[1], whole[2]])
                    outputs["region_global_index"].append(global_images[key])
            token_counts.append(region_counts)
            timestamps.append(region_times)
        return token_counts, timestamps

    def crop_window(self, mask: np.ndarray) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
        """The padded crop of an `(H, W)` bool mask (design doc, "Scale-adaptive crop", steps 1-2).

        Returns:
            `box`: `(top, left, bottom, right)` with inclusive bottom/right (the official `region_boxes` convention);
            `window`: `(top, left, row_end, col_end)`, the exclusive slice that is cropped. PixelRefer reproduces the
            official off-by-one (`row_end = bottom`, the last row and column are dropped); Lite crops up to
            `bottom + 1`. The window always keeps at least one row and column.
        """
        height, width = mask.shape
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        pad = self.context_pixels
        top, left = max(0, int(rows[0]) - pad), max(0, int(cols[0]) - pad)
        bottom, right = min(height - 1, int(rows[-1]) + pad), min(width - 1, int(cols[-1]) + pad)
        end_offset = 1 if self.is_lite else 0
        row_end, col_end = max(bottom + end_offset, top + 1), max(right + end_offset, left + 1)
        return (top, left, bottom, right), (top, left, row_end, col_end)

    def object_crop_size(self, mask_area: int, crop_height: int, crop_width: int, max_pixels: int) -> tuple[int, int]:
        """Target `(height, width)` of an object crop (design doc, "Scale-adaptive crop", steps 3-4).

        The scale `r = ceil(sqrt(P*P*n / A))` upscales objects covering fewer than `n` patches; objects covering
        more than `max_object_patches` patches get `r = 1 / sqrt(A / (P*P) / max_object_patches)`. The scaled crop is
        rounded up to multiples of `P`, then clamped into `[size["shortest_edge"], max_pixels]` by `smart_resize`.
        """
        patch_area = self.patch_size * self.patch_size
        scale = math.ceil(math.sqrt(patch_area * self.num_object_tokens / mask_area))
        if scale == 1 and mask_area / patch_area > self.max_object_patches:
            scale = 1 / math.sqrt(mask_area / patch_area / self.max_object_patches)
        height = math.ceil(crop_height * scale / self.patch_size) * self.patch_size
        width = math.ceil(crop_width * scale / self.patch_size) * self.patch_size
        return smart_resize(
            height, width, factor=self.patch_size, min_pixels=self.size.shortest_edge, max_pixels=max_pixels
        )

    def _object_crop(self, frame: np.ndarray, mask: np.ndarray, max_pixels: int, where: str) -> dict:
        """Crop, rescale, mask-downsample and patchify one object (design doc, "Scale-adaptive crop")."""
        box, window = self.crop_window(mask)
        if self.object_crop == "frame":
            # Ablation baseline (plain mask pooling): the whole frame at native scale; only the box stays the object's.
            window = (0, 0, *mask.shape)
        top, left, row_end, col_end = window
        crop, crop_mask = frame[top:row_end, left:col_end], mask[top:row_end, left:col_end]
        crop_height, crop_width = crop_mask.shape
        try:
            if self.object_crop == "frame":
                height, width = smart_resize(
                    crop_height,
                    crop_width,
                    factor=self.patch_size,
                    min_pixels=self.size.shortest_edge,
                    max_pixels=max_pixels,
                )
            else:
                height, width = self.object_crop_size(int(mask.sum()), crop_height, crop_width, max_pixels)
        except ValueError as error:  # smart_resize rejects an aspect ratio above 200
            raise ValueError(f"{where}: {error}") from error
        grid_h, grid_w = height // self.patch_size, width // self.patch_size

        # Official: OpenCV's default (linear) for PixelRefer; Lite switches to area averaging when shrinking both ways.
        area = self.is_lite and height < crop_height and width < crop_width
        resized = self._resize(crop, height, width, area=area)

        patch_mask = self.patch_grid_mask(crop_mask, grid_h, grid_w)
        if not patch_mask.any():
            # A thin object can fall between the bilinear sample points (or, with the PixelRefer off-by-one, lie on
            # the dropped last row/column). Keep the patch under its median pixel so that it still yields tokens.
            rows, cols = np.nonzero(mask)
            middle = len(rows) // 2
            row = min(max(int(rows[middle]), top), row_end - 1) - top
            col = min(max(int(cols[middle]), left), col_end - 1) - left
            patch_mask[row * grid_h // crop_height, col * grid_w // crop_width] = True

        pixel_values, _, _ = self._normalize_and_patchify(resized)
        return {
            "pixel_values": pixel_values,
            "grid": (grid_h, grid_w),
            "patch_mask": patch_mask.reshape(-1).astype(np.float32),  # raster order, like merge-1 patches
            "box": [float(v) for v in box],
            "crop_window": window,
        }

    def patch_grid_mask(self, crop_mask: np.ndarray, grid_h: int, grid_w: int) -> np.ndarray:
        """The `(grid_h, grid_w)` bool patch mask of an `(h, w)` bool crop mask, by the official rule (design doc,
        "Scale-adaptive crop", step 5); the fallback for an empty result is `_object_crop`'s.

        PixelRefer (`pixelrefer/mm_utils.py::resize_image_mask`): torch's uint8 bilinear resize of the uint8 mask,
        then the region encoder keeps the patches above 0 (`_torch_uint8_bilinear`, exact with both backends).
        Lite (`pixelreferlite/mm_utils.py::resize_image_mask`): OpenCV `INTER_LINEAR` on the float32 mask, then the
        region encoder keeps the patches above 0: called with `resize_backend="opencv"`, emulated from OpenCV's own
        coefficients with `"numpy"` (`_opencv_linear_support`).
        """
        if not self.is_lite:
            return _torch_uint8_bilinear(crop_mask.astype(np.uint8), grid_h, grid_w) > 0
        if self.resize_backend == "opencv":
            cv2 = _opencv()
            soft = cv2.resize(crop_mask.astype(np.float32), (grid_w, grid_h), interpolation=cv2.INTER_LINEAR)
            return soft.reshape(grid_h, grid_w) > 0
        return _opencv_linear_support(crop_mask, grid_h, grid_w)

    def _context_image(self, image: np.ndarray, side: int, max_pixels: int) -> tuple[np.ndarray, int, int]:
        """Lite local / global context image: area-resized to `side x side` (or less, within `max_pixels`)."""
        height, width = smart_resize(
            side, side, factor=self.patch_size, min_pixels=self.size.shortest_edge, max_pixels=max_pixels
        )
        return self._normalize_and_patchify(self._resize(image, height, width, area=True))

    def _resize(self, image: np.ndarray, height: int, width: int, area: bool) -> np.ndarray:
        """Resize an `(H, W, 3)` uint8 image like OpenCV `INTER_AREA` (`area=True`) or `INTER_LINEAR`."""
        if self.resize_backend == "opencv":
            cv2 = _opencv()
            interpolation = cv2.INTER_AREA if area else cv2.INTER_LINEAR
            return cv2.resize(np.ascontiguousarray(image), (width, height), interpolation=interpolation)
        return _box_resize(image, height, width) if area else _bilinear_resize(image, height, width)

    def _normalize_and_patchify(self, image: np.ndarray) -> tuple[np.ndarray, int, int]:
        """`(H, W, 3)` uint8 with `H, W` multiples of the patch size -> `((H/P) * (W/P), 3 * P * P)` raster patches."""
        channels_first = image.transpose(2, 0, 1).astype(np.float32)  # (3, H, W)
        if self.do_rescale:
            channels_first = self.rescale(channels_first, self.rescale_factor)
        if self.do_normalize:
            channels_first = self.normalize(channels_first, self.image_mean, self.image_std)
        return self.patchify(
            channels_first, patch_size=self.patch_size, merge_size=1, temporal_patch_size=self.temporal_patch_size
        )


__all__ = [
    "PixelReferImageProcessor",
    "PixelReferSample",
    "PixelReferSampleLayout",
    "object_token_count",
    "to_rgb_array",
]
