"""Property-based tests (hypothesis) of the training collator and the official-annotation converter on malformed rows:
missing fields, wrong types, masks that do not decode, conversations that alternate wrongly. Each row ends in a
batch / a converted row or a `ValueError` naming it; with `skip_bad_samples=True` the good rows are still batched."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from property_settings import fixed

from pixelrefer_hf import PixelReferDataCollator
from pixelrefer_hf.data import convert_official_sample, make_region_chat_row
from pixelrefer_hf.region_utils import rle_encode
from pixelrefer_hf.testing import tiny_model_and_processor

HEIGHT, WIDTH = 20, 24
IMAGE = Image.fromarray(np.random.default_rng(3).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8))
MASK = np.zeros((HEIGHT, WIDTH), dtype=bool)
MASK[4:12, 5:15] = True
RLE = rle_encode(MASK)
GOOD_ROW = {
    "id": "good",
    "image": IMAGE,
    "frames": [],
    "timestamps": [],
    "regions": [[{"frame": 0, "rle": RLE}]],
    "messages": [
        {"role": "user", "content": "<image>\nWhat is <region>?"},
        {"role": "assistant", "content": "A box."},
    ],
}


@pytest.fixture(scope="module")
def processor():
    return tiny_model_and_processor("pixelrefer", seed=4)[1]


anything = st.one_of(
    st.none(), st.integers(-3, 3), st.text(max_size=4), st.floats(), st.booleans(), st.just([]), st.just({})
)
roles = st.one_of(st.sampled_from(["user", "assistant", "system"]), anything)
contents = st.one_of(
    st.sampled_from(["<image>\nWhat is <region>?", "What is <region>?", "An answer.", "<region>", "<video>", ""]),
    anything,
)
messages = st.one_of(
    st.lists(st.one_of(st.fixed_dictionaries({"role": roles, "content": contents}), anything), max_size=4),
    anything,
)
rles = st.one_of(
    st.just(RLE),
    st.fixed_dictionaries(
        {
            "size": st.one_of(st.just([HEIGHT, WIDTH]), anything),
            "counts": st.one_of(st.text(max_size=6), st.just(RLE["counts"]), anything),
        }
    ),
    anything,
)
entries = st.one_of(
    st.fixed_dictionaries({"frame": st.one_of(st.just(0), anything), "rle": rles}),
    st.fixed_dictionaries({"rle": rles}),
    anything,
)
row_regions = st.one_of(st.lists(st.one_of(st.lists(entries, max_size=2), anything), max_size=2), anything)
rows = st.fixed_dictionaries(
    {},
    optional={
        "id": st.one_of(st.text(max_size=3), st.integers()),
        "image": st.one_of(st.just(IMAGE), anything, st.just({"bytes": b"not an image"}), st.just("missing.png")),
        "frames": st.one_of(st.just([IMAGE, IMAGE]), anything, st.just([IMAGE, None])),
        "timestamps": st.one_of(st.just([0.0, 1.0]), anything, st.lists(anything, max_size=2)),
        "regions": row_regions,
        "messages": messages,
    },
)


@fixed(150)
@given(row=st.one_of(rows, anything))
def test_malformed_rows_are_batched_or_named_and_the_good_row_survives(processor, row):
    collator = PixelReferDataCollator(processor, skip_bad_samples=True)
    good = PixelReferDataCollator(processor)([GOOD_ROW])
    batch = collator([GOOD_ROW, row])
    assert batch["input_ids"].shape[0] in (1, 2)
    if batch["input_ids"].shape[0] == 1:
        # The bad row is dropped; the good one is encoded as alone.
        for key, value in good.items():
            assert torch.equal(value, batch[key]), key
    strict = PixelReferDataCollator(processor)
    try:
        strict([row])
    except ValueError as error:
        assert str(error).startswith(("dataset sample", "batch sample")), error


official_masks = st.one_of(
    st.lists(
        st.one_of(
            st.just(RLE),
            st.just([[1, 1, 10, 1, 10, 10]]),
            anything,
            st.dictionaries(st.one_of(st.text(max_size=2), st.integers(-1, 3)), st.just(RLE), max_size=2),
        ),
        max_size=2,
    ),
    anything,
)
turns = st.one_of(
    st.fixed_dictionaries(
        {"from": st.one_of(st.sampled_from(["human", "gpt", "system"]), anything), "value": contents}
    ),
    anything,
)
official_samples = st.fixed_dictionaries(
    {},
    optional={
        "id": st.one_of(st.text(max_size=3), st.integers(), st.none()),
        "image": st.one_of(st.just("img.png"), st.just(["img.png"]), st.just(["a.png", "b.png"]), anything),
        "video": st.one_of(st.just(["f0.png", "f1.png"]), st.just(["clip.mp4"]), anything),
        "timestamps": st.one_of(st.just([0.0, 1.0]), anything, st.lists(anything, max_size=2)),
        "masks": official_masks,
        "height": st.one_of(st.just(HEIGHT), anything),
        "width": st.one_of(st.just(WIDTH), anything),
        "conversations": st.one_of(st.lists(turns, max_size=4), anything),
    },
)


VALID_OFFICIAL = {
    "image": {
        "id": "a",
        "image": "img.png",
        "masks": [RLE, [[1, 1, 10, 1, 10, 10]]],
        "height": HEIGHT,
        "width": WIDTH,
        "conversations": [
            {"from": "human", "value": "<image>\n<region> and <region>?"},
            {"from": "gpt", "value": "Two."},
        ],
    },
    "frames": {
        "video": ["f0.png", "f1.png"],
        "timestamps": [0.0, 1.0],
        "masks": [{"0": RLE, "1": RLE}],
        "conversations": [{"from": "human", "value": "<video>\nWhere is <region>?"}, {"from": "gpt", "value": "Here."}],
    },
}


@st.composite
def mutated_official_samples(draw):
    """A valid sample with one or two fields replaced, removed or broken (the hostile rows that get far)."""
    sample = dict(VALID_OFFICIAL[draw(st.sampled_from(sorted(VALID_OFFICIAL)))])
    for _ in range(draw(st.integers(1, 2))):
        key = draw(st.sampled_from(sorted(sample) + ["height", "width", "timestamps"]))
        choice = draw(st.integers(0, 3))
        if choice == 0:
            sample.pop(key, None)
        elif choice == 1:
            sample[key] = draw(anything)
        elif key == "masks":
            sample[key] = [
                draw(
                    st.one_of(
                        rles,
                        st.dictionaries(
                            st.one_of(st.text(max_size=2), st.integers(-1, 3), st.floats(0, 2)), rles, max_size=2
                        ),
                        st.lists(st.lists(st.one_of(st.integers(-3, 30), st.floats()), max_size=8), max_size=2),
                    )
                )
                for _ in range(draw(st.integers(0, 2)))
            ]
        elif key == "conversations":
            sample[key] = draw(st.lists(turns, max_size=4))
        else:
            sample[key] = draw(st.one_of(st.lists(anything, max_size=2), st.floats(), st.text(max_size=3)))
    return sample


@fixed(300)
@given(sample=st.one_of(mutated_official_samples(), official_samples, anything))
def test_malformed_official_annotations_convert_or_name_the_annotation(tmp_path_factory, sample):
    root = tmp_path_factory.getbasetemp() / "official-media"
    if not root.exists():
        root.mkdir()
        for name in ("img.png", "f0.png", "f1.png"):
            IMAGE.save(root / name)
    try:
        row = convert_official_sample(sample, 7, root)
    except ValueError as error:
        assert str(error).startswith("annotation 7"), error
    else:
        assert isinstance(row["messages"], list) and row["messages"]
        assert any(message["role"] == "assistant" for message in row["messages"])


@pytest.mark.parametrize(
    ("roles", "message"),
    [
        (["assistant", "user"], "turn 0 is a 'assistant' turn where a 'user' turn belongs"),
        (["user", "user", "assistant"], "turn 1 is a 'user' turn where a 'assistant' turn belongs"),
        (["user", "assistant", "assistant"], "turn 2 is a 'assistant' turn where a 'user' turn belongs"),
        (["user", "system", "assistant"], "turn 1 is a 'system' turn where a 'assistant' turn belongs"),
    ],
)
def test_conversations_that_do_not_alternate_are_named_errors(processor, roles, message):
    turns = [{"role": role, "content": "What is <region>?" if k == 0 else "An answer."} for k, role in enumerate(roles)]
    row = make_region_chat_row(turns, image=IMAGE, regions=[[2, 2, 20, 20]], id="odd")
    with pytest.raises(ValueError, match=message):
        PixelReferDataCollator(processor)([row])
    fine = make_region_chat_row(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is <region>?"},
            {"role": "assistant", "content": "A box."},
        ],
        image=IMAGE,
        regions=[[2, 2, 20, 20]],
        id="fine",
    )
    assert PixelReferDataCollator(processor)([fine])["input_ids"].shape[0] == 1
