"""Determinism under load: the same inputs give the same outputs with 1 and 2 torch threads, when the processor runs
in two Python threads at once, on repeated calls, and in a batch of mixed good and bad items."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from pixelrefer_hf import RegionQAPipeline
from pixelrefer_hf.testing import tiny_model_and_processor

rng = np.random.default_rng(11)
IMAGES = [rng.integers(0, 256, (36 + 4 * k, 44, 3), dtype=np.uint8) for k in range(3)]
MASK = np.zeros((36, 44), dtype=bool)
MASK[5:20, 8:30] = True
GOOD = [
    {"image": IMAGES[0], "regions": [MASK], "question": "What is <region>?"},
    {"image": IMAGES[1], "regions": [[3, 4, 30, 33]], "question": "Describe <region>."},
    {"image": IMAGES[2], "regions": [[1, 1, 10, 10], [20, 20, 40, 40]], "question": "Compare <region> and <region>."},
    {"video": [IMAGES[0], IMAGES[0][::-1].copy()], "regions": [{1: MASK}], "question": "Where is <region>?"},
]
BAD = [
    {"image": IMAGES[0], "regions": [[5, 5, 5, 9]], "question": "What is <region>?"},  # zero area
    {"image": np.zeros((1, 300, 3), np.uint8), "regions": [[0, 0, 3, 1]], "question": "<region>?"},  # aspect ratio
    {"video": [IMAGES[0]], "video_timestamps": [0.0, 1.0], "regions": [{0: MASK}], "question": "<region>?"},
    {"image": IMAGES[0], "regions": [{"size": [10**6, 10**6], "counts": [0, 10**12]}], "question": "<region>?"},
]


@pytest.fixture(scope="module")
def model_and_processor():
    return tiny_model_and_processor("pixelrefer", seed=7)


def with_threads(count: int, function):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        return function()
    finally:
        torch.set_num_threads(before)


def processor_outputs(processor):
    prompt = "<|im_start|>user\n<image>\nCompare <region> and <region>.<|im_end|>\n<|im_start|>assistant\n"
    inputs = processor(
        text=[prompt, prompt],
        images=IMAGES[:2],
        regions=[[MASK, [1, 2, 20, 30]], [[0, 0, 9, 9], [5, 5, 40, 30]]],
        padding=True,
        return_tensors="pt",
    )
    return {key: value.clone() for key, value in inputs.items()}


def assert_same(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for key, value in first.items():
        assert torch.equal(value, second[key]), key


def test_processor_is_deterministic_across_threads_and_concurrent_calls(model_and_processor):
    _, processor = model_and_processor
    reference = with_threads(1, lambda: processor_outputs(processor))
    assert_same(reference, with_threads(2, lambda: processor_outputs(processor)))
    with ThreadPoolExecutor(max_workers=2) as pool:
        for outputs in pool.map(lambda _: processor_outputs(processor), range(6)):
            assert_same(reference, outputs)


def test_pipeline_answers_are_the_same_with_1_and_2_threads_and_in_a_mixed_batch(model_and_processor):
    model, processor = model_and_processor
    pipe = RegionQAPipeline(model=model, processor=processor, task="region-qa", max_new_tokens=5)
    singles = with_threads(1, lambda: [pipe(item)["answer"] for item in GOOD])
    assert with_threads(2, lambda: [pipe(item)["answer"] for item in GOOD]) == singles
    # Good and bad items interleaved, in batches that hold both.
    mixed = [item for pair in zip(GOOD, BAD, strict=True) for item in pair]
    for threads in (1, 2):
        for batch_size in (3, 8):
            results = with_threads(threads, lambda b=batch_size: pipe(mixed, batch_size=b, skip_bad_items=True))
            assert [r.get("answer") for r in results[::2]] == singles, (threads, batch_size)
            errors = [r.get("error", "") for r in results[1::2]]
            assert [e.split(":")[0] for e in errors] == [f"item {i}" for i in range(1, len(mixed), 2)], errors
    # A second identical call changes nothing (no state is kept between calls).
    again = pipe(mixed, batch_size=8, skip_bad_items=True)
    assert again == pipe(mixed, batch_size=8, skip_bad_items=True)
