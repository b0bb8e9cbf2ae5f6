"""Property-based tests (hypothesis) of the processor and the pipeline on hostile in-memory inputs.

Every case must end in an answer or a `ValueError` that names the sample (processor: `sample 0...`) or the item
(pipeline list call: `item i: ...`); any other exception is a bug. The runs are derandomized (a fixed seed) with a
bounded number of examples, so CI sees the same cases every time.
"""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image
from property_settings import fixed

from pixelrefer_hf import RegionQAPipeline
from pixelrefer_hf.testing import HOSTILE_TEXT_PIECES, tiny_model_and_processor

HEIGHT, WIDTH = 24, 30


PROMPT = "<|im_start|>user\n<image>\n{question}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def model_and_processor():
    return tiny_model_and_processor("pixelrefer", seed=5)


@pytest.fixture(scope="module")
def processor(model_and_processor):
    return model_and_processor[1]


@pytest.fixture(scope="module")
def lite_processor():
    return tiny_model_and_processor("pixelrefer-lite", seed=5)[1]


@pytest.fixture(scope="module")
def pipe(model_and_processor):
    model, processor = model_and_processor
    return RegionQAPipeline(model=model, processor=processor, task="region-qa", max_new_tokens=2)


IMAGE = np.random.default_rng(0).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)

# --------------------------------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------------------------------

MASK_DTYPES = [np.bool_, np.uint8, np.int8, np.int16, np.int32, np.int64, np.uint16, np.float16, np.float32, np.float64]
shapes = st.one_of(
    st.just((HEIGHT, WIDTH)),
    st.just((1, HEIGHT, WIDTH)),
    st.just((WIDTH, HEIGHT)),
    hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6),
)


@st.composite
def masks(draw):
    dtype = np.dtype(draw(st.sampled_from(MASK_DTYPES)))
    shape = draw(shapes)
    if dtype.kind == "f":
        elements = st.one_of(
            st.sampled_from([0.0, 0.5, 1.0, np.nan, np.inf, -np.inf, -0.1, 2.0]),
            st.floats(0, 1, width=16 if dtype.itemsize == 2 else 32 if dtype.itemsize == 4 else 64),
        )
    elif dtype.kind == "b":
        elements = st.booleans()
    else:
        info = np.iinfo(dtype)
        elements = st.one_of(
            st.sampled_from([v for v in (0, 1, 255) if info.min <= v <= info.max]),
            st.integers(int(info.min), int(info.max)),
        )
    fill = draw(elements)
    array = np.full(shape, fill, dtype=dtype)
    if array.ndim >= 2 and array.size:
        # A rectangle of a second value, so that masks are rarely constant.
        rows, cols = array.shape[-2:]
        r0, c0 = draw(st.integers(0, rows - 1)), draw(st.integers(0, cols - 1))
        array[..., r0 : r0 + draw(st.integers(1, rows)), c0 : c0 + draw(st.integers(1, cols))] = draw(elements)
    kind = draw(st.sampled_from(["numpy", "torch", "pil"]))
    if kind == "torch" and dtype != np.uint16:
        return torch.from_numpy(array)
    if kind == "pil" and array.ndim == 2 and array.size and dtype in (np.bool_, np.uint8, np.int32, np.float32):
        return Image.fromarray(array)
    return array


coordinates = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(10**30), 10**30),
    st.integers(-5, WIDTH + 5),
    st.floats(-5, WIDTH + 5),
)
boxes = st.one_of(
    st.lists(coordinates, min_size=4, max_size=4),
    st.lists(coordinates, min_size=0, max_size=6),
    st.tuples(st.integers(0, 10), st.integers(0, 10), st.integers(11, 40), st.integers(11, 40)).map(list),
    hnp.arrays(np.float64, st.integers(1, 5), elements=st.floats(-50, 50)),
)
rle_counts = st.one_of(
    st.text(max_size=20),
    st.binary(max_size=20),
    st.lists(st.integers(-(10**6), 10**6), max_size=6),
    st.just([HEIGHT * WIDTH]),
    st.just([10, HEIGHT * WIDTH - 10]),
    st.none(),
    st.floats(),
)
rle_sizes = st.one_of(
    st.just([HEIGHT, WIDTH]),
    st.lists(st.integers(-(10**7), 10**7), max_size=3),
    st.text(max_size=3),
    st.just([10**6, 10**6]),
)
rles = st.one_of(
    st.fixed_dictionaries({"size": rle_sizes, "counts": rle_counts}),
    st.fixed_dictionaries({"size": rle_sizes}),
    st.fixed_dictionaries({"counts": rle_counts}),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)
polygon_numbers = st.one_of(st.floats(), st.integers(-(10**400), 10**400), st.integers(-3, 40))
polygons = st.fixed_dictionaries(
    {
        "polygons": st.one_of(
            st.lists(st.lists(polygon_numbers, max_size=10), max_size=3),
            st.just([[0, 0, 0, 0, 0, 0]]),  # zero area
            st.just([[1, 1, 5, 5, 9, 9]]),  # collinear
            st.integers(),
            st.text(max_size=3),
        )
    }
)
regions = st.one_of(masks(), boxes, rles, polygons, st.none(), st.integers(), st.text(max_size=4))

PIL_MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16", "F", "CMYK", "YCbCr"]


@st.composite
def pil_images(draw):
    mode = draw(st.sampled_from(PIL_MODES))
    width, height = draw(st.sampled_from([(1, 1), (WIDTH, HEIGHT), (2, 1), (300, 1), (57, 3)]))
    return Image.new(mode, (width, height), color=draw(st.integers(0, 255)) if mode not in ("RGB", "RGBA") else None)


images = st.one_of(
    st.just(IMAGE),
    pil_images(),
    hnp.arrays(
        st.sampled_from([np.uint8, np.float32, np.int64, np.bool_, np.uint16]),
        st.sampled_from([(HEIGHT, WIDTH, 3), (HEIGHT, WIDTH), (3, HEIGHT, WIDTH), (HEIGHT, WIDTH, 2), (0, 4, 3)]),
        elements=st.integers(0, 1),
    ),
    st.none(),
    st.text(max_size=3),
)
texts = st.lists(st.one_of(st.sampled_from(HOSTILE_TEXT_PIECES), st.text(max_size=6)), max_size=12).map("".join)


def call_outcome(function, *args, **kwargs):
    """`"ok"` and the result, or `"error"` and the `ValueError`; anything else propagates (a bug)."""
    try:
        return "ok", function(*args, **kwargs)
    except ValueError as error:
        return "error", error


def assert_names_the_sample(error: ValueError) -> None:
    assert str(error).startswith("sample 0"), f"error does not name the sample: {error}"


# --------------------------------------------------------------------------------------------------------------------
# Processor
# --------------------------------------------------------------------------------------------------------------------


@fixed(250)
@given(region=regions)
def test_any_region_gives_tokens_or_an_error_naming_sample_and_region(processor, region):
    text = PROMPT.format(question="What is <region>?")
    outcome, result = call_outcome(processor, text=text, images=IMAGE, regions=[region], return_tensors="pt")
    if outcome == "error":
        assert_names_the_sample(result)
        assert "region 0" in str(result), result
    else:
        assert (result["input_ids"] == processor.region_token_id).any()
        assert torch.isfinite(result["region_pixel_values"]).all()


@fixed(60)
@given(
    dtype=st.sampled_from(MASK_DTYPES),
    rows=st.tuples(st.integers(0, HEIGHT - 1), st.integers(1, HEIGHT)),
    cols=st.tuples(st.integers(0, WIDTH - 1), st.integers(1, WIDTH)),
    on=st.sampled_from(["one", "max", "soft"]),
)
def test_a_valid_mask_of_any_dtype_is_accepted(processor, dtype, rows, cols, on):
    dtype = np.dtype(dtype)
    mask = np.zeros((HEIGHT, WIDTH), dtype=dtype)
    if dtype.kind == "b":
        value = True
    elif dtype.kind == "f":
        value = 0.75 if on == "soft" else 1.0
    else:
        value = 255 if on == "max" and np.iinfo(dtype).max >= 255 else 1
    mask[rows[0] : rows[0] + rows[1], cols[0] : cols[0] + cols[1]] = value
    inputs = processor(text=PROMPT.format(question="<region>"), images=IMAGE, regions=[mask], return_tensors="pt")
    assert (inputs["input_ids"] == processor.region_token_id).any()


@fixed(150)
@given(text=texts, num_regions=st.integers(0, 3), image=images)
def test_any_text_and_image_give_tokens_or_an_error_naming_the_sample(
    processor, lite_processor, text, num_regions, image
):
    for proc in (processor, lite_processor):
        outcome, result = call_outcome(
            proc, text=text, images=image, regions=[[1, 1, 8, 8]] * num_regions, return_tensors="pt"
        )
        if outcome == "error":
            assert_names_the_sample(result)
        else:
            region_tokens = int((result["input_ids"] == proc.region_token_id).sum())
            assert (region_tokens > 0) == (num_regions > 0)


frame_keys = st.one_of(
    st.integers(-3, 4), st.floats(-2, 3), st.text(max_size=2), st.booleans(), st.just(np.int64(1)), st.none()
)


@fixed(120)
@given(
    num_frames=st.integers(0, 3),
    region=st.one_of(st.dictionaries(frame_keys, st.one_of(boxes, masks()), max_size=3), regions),
    timestamps=st.one_of(st.none(), st.lists(st.floats(), max_size=4), st.text(max_size=3), st.integers()),
    multi_frame_regions=st.booleans(),
)
def test_any_video_gives_tokens_or_an_error_naming_the_sample(
    processor, num_frames, region, timestamps, multi_frame_regions
):
    frames = [IMAGE] * num_frames
    text = "<|im_start|>user\n<video>\nWhere is <region>?<|im_end|>\n<|im_start|>assistant\n"
    outcome, result = call_outcome(
        processor,
        text=[text],
        videos=[frames],
        regions=[[region]],
        video_timestamps=[timestamps],
        multi_frame_regions=multi_frame_regions,
        return_tensors="pt",
    )
    if outcome == "error":
        assert_names_the_sample(result)
    else:
        assert num_frames >= 1 and (result["input_ids"] == processor.region_token_id).any()


def test_special_tokens_typed_by_the_user():
    _, processor = tiny_model_and_processor("pixelrefer", seed=5)
    with pytest.raises(ValueError, match="sample 0: the text already holds <REGION>"):
        processor(text="<REGION> <region>", images=IMAGE, regions=[[0, 0, 4, 4]])
    with pytest.raises(ValueError, match="sample 0: the text has 2 <image> tags but 1 images"):
        processor(text="<image><image> <region>", images=IMAGE, regions=[[0, 0, 4, 4]])
    with pytest.raises(ValueError, match="sample 0: the text is not valid unicode"):
        processor(text="\ud800 <region>", images=IMAGE, regions=[[0, 0, 4, 4]])
    # A chat token typed by the user is text like any other.
    processor(text="<|im_end|> <region>", images=IMAGE, regions=[[0, 0, 4, 4]])


def test_hostile_region_forms_found_by_the_fuzzer_are_clear_errors():
    _, processor = tiny_model_and_processor("pixelrefer", seed=5)
    text = "<region>"
    cases = {
        "too large for a pixel coordinate": [0, 0, 10**400, 5],
        "invalid polygons": {"polygons": [[0, 0, 10**400, 0, 0, 5]]},
        # Refused from its size, before 10^12 bytes are allocated.
        "RLE mask is 1000000x1000000 but the image is 24x30": {"size": [10**6, 10**6], "counts": [0, 10**12]},
    }
    for message, region in cases.items():
        with pytest.raises(ValueError, match=f"sample 0, region 0: .*{message}"):
            processor(text=text, images=IMAGE, regions=[region])


# --------------------------------------------------------------------------------------------------------------------
# Resource bounds
# --------------------------------------------------------------------------------------------------------------------


def test_resource_limits_refuse_oversized_samples_with_errors_naming_them():
    from pixelrefer_hf import PixelReferImageProcessor, PixelReferProcessor

    _, base = tiny_model_and_processor("pixelrefer", seed=5)
    limits = {"max_image_pixels": 500, "max_regions_per_sample": 2, "max_video_frames": 2, "max_prompt_chars": 40}
    image_processor = PixelReferImageProcessor(**{**base.image_processor.to_dict(), **limits})
    for name, value in limits.items():
        assert getattr(image_processor, name) == value
    processor = PixelReferProcessor(image_processor=image_processor, tokenizer=base.tokenizer)
    small = IMAGE[:16, :16]
    processor(text=["<region>"], images=[small], regions=[[[0, 0, 4, 4]]])
    with pytest.raises(ValueError, match="sample 0, image 0: the image is 24x30 = 720 pixels, more than max_image_pix"):
        processor(text=["<region>"], images=[IMAGE], regions=[[[0, 0, 4, 4]]])
    with pytest.raises(ValueError, match="sample 0, image 0: .*max_image_pixels"):
        processor(text=["hi"], images=[Image.fromarray(IMAGE)])
    with pytest.raises(ValueError, match="sample 1, frame 0: .*max_image_pixels"):
        processor(text=["a", "<video>"], images=[small, None], videos=[None, [IMAGE]])
    with pytest.raises(ValueError, match="sample 0: 3 regions, more than max_regions_per_sample=2"):
        processor(text=["<region>" * 3], images=[small], regions=[[[0, 0, 4, 4]] * 3])
    with pytest.raises(ValueError, match="sample 0: the video has 3 frames, more than max_video_frames=2"):
        processor(text=["<video>"], videos=[[small] * 3])
    with pytest.raises(ValueError, match="sample 0: the text has 41 characters, more than max_prompt_chars=40"):
        processor(text=["x" * 41], images=[small])
    with pytest.raises(ValueError, match="max_video_frames must be a positive integer or None"):
        PixelReferImageProcessor(max_video_frames=0)
    unbounded = PixelReferImageProcessor(max_image_pixels=None)
    assert unbounded.max_image_pixels is None


def test_resource_limits_survive_save_and_load(tmp_path):
    from pixelrefer_hf import PixelReferImageProcessor

    saved = PixelReferImageProcessor(max_image_pixels=1234, max_regions_per_sample=7, max_prompt_chars=None)
    saved.save_pretrained(tmp_path)
    loaded = PixelReferImageProcessor.from_pretrained(tmp_path)
    assert (loaded.max_image_pixels, loaded.max_regions_per_sample, loaded.max_prompt_chars) == (1234, 7, None)
    assert loaded.max_video_frames == 1024


# --------------------------------------------------------------------------------------------------------------------
# Pipeline
# --------------------------------------------------------------------------------------------------------------------

GOOD_ITEM = {"image": IMAGE, "regions": [[2, 3, 14, 15]], "question": "What is <region>?"}

items = st.one_of(
    st.fixed_dictionaries(
        {"image": images, "regions": st.lists(regions, max_size=2), "question": texts},
    ),
    st.fixed_dictionaries(
        {
            "video": st.one_of(st.just([IMAGE]), st.just([]), st.just([IMAGE, IMAGE]), st.integers()),
            "regions": st.lists(st.dictionaries(frame_keys, boxes, max_size=2), max_size=2),
            "question": st.sampled_from(["<region>?", "Where is <region> and <region>?", ""]),
        },
        optional={"video_timestamps": st.one_of(st.lists(st.floats(), max_size=3), st.integers(), st.text(max_size=2))},
    ),
    st.dictionaries(st.sampled_from(["image", "regions", "question", "extra"]), st.integers(), max_size=4),
    st.none(),
    st.integers(),
)


@pytest.fixture(scope="module")
def good_answer(pipe):
    return pipe(GOOD_ITEM)["answer"]


@fixed(40)
@given(item=items, position=st.integers(0, 2))
def test_bad_items_in_a_batch_leave_the_good_answers_as_single_calls(pipe, good_answer, item, position):
    batch = [dict(GOOD_ITEM), dict(GOOD_ITEM)]
    batch.insert(position, item)
    results = pipe(batch, batch_size=3, skip_bad_items=True)
    assert len(results) == 3
    for index, result in enumerate(results):
        if index == position:
            assert set(result) in ({"answer"}, {"error"})
            if "error" in result:
                assert result["error"].startswith(f"item {position}: "), result
        else:
            assert result == {"answer": good_answer}
    # Without skip_bad_items the same item either is answered or raises an error naming it.
    outcome, error = call_outcome(pipe, [item], batch_size=1)
    if outcome == "error":
        assert str(error).startswith("item 0: "), error
    else:
        assert "answer" in error[0]


def test_very_large_images_are_resized_within_the_budget_or_refused_without_a_copy(processor):
    large = np.random.default_rng(2).integers(0, 256, (1500, 2000, 3), dtype=np.uint8)
    inputs = processor(text="<image>\n<region>", images=large, regions=[[100, 200, 1900, 1400]], return_tensors="pt")
    assert int(inputs["image_grid_thw"].prod(-1).sum()) <= processor.image_processor.max_visual_tokens
    # 200 million pixels (600 MB as a real array) refused from the shape of a zero-copy view, before any copy.
    huge = np.broadcast_to(np.zeros((1, 1, 3), dtype=np.uint8), (10_000, 20_000, 3))
    with pytest.raises(ValueError, match="sample 0, image 0: the image is 10000x20000 = 200000000 pixels"):
        processor(text="<image>\n<region>", images=huge, regions=[[0, 0, 5, 5]])
    with pytest.raises(ValueError, match="sample 0, frame 1: the image is 10000x20000"):
        processor(text="<video>\n<region>", videos=[[large[:8, :8], huge]], regions=[{0: [0, 0, 5, 5]}])


def test_tensors_without_dense_data_are_clear_errors(processor):
    image = torch.rand(3, HEIGHT, WIDTH)
    cases = {
        "image 0: got a meta tensor": {
            "images": torch.empty(3, HEIGHT, WIDTH, device="meta"),
            "regions": [[0, 0, 4, 4]],
        },
        "image 0: got a torch.sparse_coo tensor": {"images": image.to_sparse(), "regions": [[0, 0, 4, 4]]},
        "region 0: got a meta tensor": {"images": image, "regions": [torch.ones(HEIGHT, WIDTH, device="meta")]},
        "region 0: got a torch.sparse_coo tensor": {
            "images": image,
            "regions": [torch.ones(HEIGHT, WIDTH).to_sparse()],
        },
    }
    for message, inputs in cases.items():
        with pytest.raises(ValueError, match=f"sample 0, {message}"):
            processor(text="<region>", **inputs)
