"""The synthetic shapes benchmark: scenes, questions, training rows and scoring."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pixelrefer_hf.collator import IGNORE_INDEX, PixelReferDataCollator
from pixelrefer_hf.configuration_pixelrefer import PixelReferConfig
from pixelrefer_hf.data import row_regions
from pixelrefer_hf.demo import demo_config_and_processor
from pixelrefer_hf.image_processing_pixelrefer import PixelReferImageProcessor
from pixelrefer_hf.region_utils import region_to_mask, rle_decode
from pixelrefer_hf.synthetic import (
    COLORS,
    DIRECTIONS,
    EXAMPLE_SCENE_OBJECTS,
    QUESTION_KINDS,
    accuracy_table,
    box_of_mask,
    draw_image_scene,
    draw_scene,
    draw_video_scene,
    example_scene,
    mask_centre,
    normalize_answer,
    scene_questions,
    score_shapes_answers,
    shapes_questions,
    shapes_region_chat_dataset,
    size_bucket,
)
from pixelrefer_hf.testing import tiny_model_and_processor

ROOT = Path(__file__).resolve().parents[1]


def _centroid(mask: np.ndarray) -> np.ndarray:
    return np.argwhere(mask).mean(axis=0)


@pytest.mark.parametrize("seed", range(6))
def test_image_scenes_follow_the_spec(seed):
    scene = draw_image_scene(np.random.default_rng(seed))
    frame = scene.frames[0]
    assert frame.shape == (224, 224, 3) and frame.dtype == np.uint8
    assert 3 <= len(scene.objects) <= 6
    union = np.zeros(frame.shape[:2], dtype=int)
    for obj in scene.objects:
        mask = obj.masks[0]
        union += mask
        assert 8 <= obj.size <= 100
        # The shape is painted in its colour exactly where its mask is.
        assert (frame[mask] == COLORS[obj.color]).all()
        rows, cols = np.nonzero(mask)
        box_area = (np.ptp(rows) + 1) * (np.ptp(cols) + 1)
        fill = mask.sum() / box_area
        expected_fill = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}[obj.shape]
        assert abs(fill - expected_fill) < 0.2, (obj.shape, obj.size, fill)
    assert union.max() == 1, "shapes overlap"


@pytest.mark.parametrize("seed", range(4))
def test_video_scenes_move_in_straight_lines(seed):
    scene = draw_video_scene(np.random.default_rng(seed))
    assert scene.is_video and len(scene.frames) == 8 and scene.timestamps == [float(t) for t in range(8)]
    assert 2 <= len(scene.objects) <= 4
    for t in range(8):
        union = sum(obj.masks[t].astype(int) for obj in scene.objects)
        assert union.max() == 1, f"shapes overlap on frame {t}"
    for obj in scene.objects:
        assert len(obj.masks) == 8 and all(mask.any() for mask in obj.masks)
        steps = np.diff([_centroid(mask) for mask in obj.masks], axis=0)  # (7, 2) row / column moves
        expected = np.array(DIRECTIONS[obj.direction])
        assert (steps @ expected > 2).all(), (obj.direction, steps)  # at least 3 px per frame the right way
        assert abs(steps.sum(axis=0) @ expected[::-1]) < 0.5  # and no sideways drift (rasterisation jitter only)
        for t, mask in enumerate(obj.masks):
            assert (scene.frames[t][mask] == COLORS[obj.color]).all()


def test_questions_are_answered_from_the_scene():
    rng = np.random.default_rng(3)
    for _ in range(10):
        scene = draw_image_scene(rng)
        for question in scene_questions(scene, rng):
            objects = [scene.objects[i] for i in question.object_indices]
            assert question.question.count("<region>") == len(objects)
            first = objects[0]
            if question.kind == "what":
                assert question.answer == f"a {first.color} {first.shape}"
            elif question.kind == "color":
                assert question.answer == first.color
            elif question.kind == "shape":
                assert question.answer == first.shape
            else:
                assert question.kind == "larger"
                big, small = sorted((objects[0].area, objects[1].area), reverse=True)
                assert big >= 1.5 * small
                assert question.answer == ("yes" if objects[0].area > objects[1].area else "no")
    video = draw_video_scene(np.random.default_rng(5))
    directions = [q.answer for q in scene_questions(video, np.random.default_rng(0))]
    assert sorted(directions) == sorted(obj.direction for obj in video.objects)


def test_generation_is_deterministic_by_seed():
    first = shapes_region_chat_dataset(6, seed=11)
    again = shapes_region_chat_dataset(6, seed=11)
    other = shapes_region_chat_dataset(6, seed=12)
    assert first.to_list() == again.to_list()
    assert first.to_list() != other.to_list()
    held_out = shapes_questions(5, num_per_kind=3)
    held_out_again = shapes_questions(5, num_per_kind=3)
    assert [(i.question.kind, i.question.answer, i.question.size) for i in held_out] == [
        (i.question.kind, i.question.answer, i.question.size) for i in held_out_again
    ]
    assert all((a.scene.frames[0] == b.scene.frames[0]).all() for a, b in zip(held_out, held_out_again))


def test_held_out_questions_cover_every_kind():
    items = shapes_questions(9, num_per_kind=4)
    kinds = [item.question.kind for item in items]
    assert {kind: kinds.count(kind) for kind in QUESTION_KINDS} == dict.fromkeys(QUESTION_KINDS, 4)
    for item in items:
        inputs = item.inputs
        assert inputs["question"].count("<region>") == len(inputs["regions"])
        assert ("video" in inputs) == (item.question.kind == "direction")
        if "video" in inputs:
            assert all(len(region) == 8 for region in inputs["regions"])  # a mask on every frame


def test_training_rows_collate_with_answer_labels():
    dataset = shapes_region_chat_dataset(8, seed=2, video_fraction=0.5)
    assert len(dataset) == 8 and any(row["frames"] for row in dataset) and any(row["image"] for row in dataset)
    _, processor = tiny_model_and_processor("pixelrefer")
    batch = PixelReferDataCollator(processor)(list(dataset))
    tokenizer = processor.tokenizer
    for row, input_ids, labels in zip(dataset, batch["input_ids"], batch["labels"]):
        answers = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        trained = tokenizer.decode(input_ids[labels != IGNORE_INDEX])
        assert trained == "".join(answer + "<|im_end|>" for answer in answers)
        # Every region of the row is a decodable mask (one per frame for a video).
        regions = row_regions(row)
        assert len(regions) == sum(m["content"].count("<region>") for m in row["messages"])


def test_size_buckets_and_scoring():
    assert [size_bucket(s) for s in (8, 15, 16, 31, 32, 63, 64, 100)] == [
        "<16px",
        "<16px",
        "16-32px",
        "16-32px",
        "32-64px",
        "32-64px",
        ">=64px",
        ">=64px",
    ]
    assert normalize_answer("  A Red Circle. ") == "a red circle"
    items = shapes_questions(4, num_per_kind=2)
    perfect = score_shapes_answers(items, [item.question.answer.upper() + "." for item in items])
    assert all(entry["accuracy"] == 1.0 for entry in perfect["kinds"].values())
    answers = [item.question.answer for item in items]
    answers[0] = "a plaid hexagon"
    scored = score_shapes_answers(items, answers)
    kind = items[0].question.kind
    assert scored["kinds"][kind]["correct"] == scored["kinds"][kind]["total"] - 1
    assert scored["wrong"] == [(kind, items[0].question.answer, "a plaid hexagon")]
    table = accuracy_table({"perfect": perfect, "one wrong": scored})
    assert table.splitlines()[0].startswith("| model | what | color | shape | larger | direction | <16px")
    assert "| perfect | 100.0% (2/2) |" in table
    with pytest.raises(ValueError, match="3 answers for 10 questions"):
        score_shapes_answers(items, answers[:3])


def test_bundled_example_image_is_the_example_scene():
    committed = np.array(Image.open(ROOT / "examples" / "assets" / "shapes.png").convert("RGB"))
    scene = example_scene()
    assert (committed == scene.frames[0]).all()
    for (_shape, _color, size, top, left), obj in zip(EXAMPLE_SCENE_OBJECTS, scene.objects):
        rows, cols = np.nonzero(obj.masks[0])
        # The README's boxes are [left, top, left + size, top + size]: the mask fills them (a triangle's apex row may
        # hold no pixel centre).
        assert rows.min() in (top, top + 1) and (cols.min(), rows.max() + 1, cols.max() + 1) == (
            left,
            top + size,
            left + size,
        )


def test_frame_object_crop_is_plain_mask_pooling_at_native_scale():
    """`object_crop="frame"` (the demo ablation) encodes the whole frame at its own scale; SAOT upscales the object."""
    scene = example_scene()
    frame, tiny = scene.frames[0], scene.objects[3].masks[0]  # the 10 px green circle
    kwargs = {"num_object_tokens": 8, "context_pixels": 14, "max_visual_tokens": 1024}
    adaptive = PixelReferImageProcessor(**kwargs)
    pooled = PixelReferImageProcessor(object_crop="frame", **kwargs)
    out_adaptive, _ = adaptive.preprocess_multimodal(images=[frame], regions=[[tiny]])
    out_pooled, _ = pooled.preprocess_multimodal(images=[frame], regions=[[tiny]])
    assert out_pooled["region_grid_thw"].tolist() == [[1, 16, 16]]  # 224 px / 14 px patches
    assert int(out_pooled["region_patch_masks"].sum()) <= 2  # the object is one or two patches of the frame
    assert int(out_adaptive["region_patch_masks"].sum()) >= 8  # SAOT: enlarged until it covers n patches
    assert out_pooled["region_boxes"].tolist() == out_adaptive["region_boxes"].tolist()  # same object box
    with pytest.raises(ValueError, match="object_crop must be one of"):
        PixelReferImageProcessor(object_crop="tile")


def test_demo_processor_options_drive_the_processor():
    """`merge_size` and `object_crop` are image processor options: the demo's processor follows them, and the
    config (which owns only what the model reads) neither holds nor accepts a copy."""
    config, processor = demo_config_and_processor("pixelrefer", image_processor_options={"object_crop": "frame"})
    image_processor = processor.image_processor
    assert (image_processor.merge_size, image_processor.object_crop) == (2, "frame")
    assert not hasattr(config, "object_crop") and "merge_size" not in config.to_dict()
    scene = example_scene()
    inputs = processor(
        text=["<image>What is <region>?"],
        images=[scene.frames[0]],
        regions=[[scene.objects[0].masks[0]]],
        return_tensors="pt",
    )
    assert int((inputs["input_ids"] == config.image_token_id).sum()) == 64  # 16 x 16 patches pooled 2 x 2
    # A config saved before the move (with processor fields) still loads, without the stale copies.
    assert not hasattr(PixelReferConfig(object_crop="tile", max_visual_tokens=5), "max_visual_tokens")


def test_training_mixture_options_shape_the_conversations():
    """`kind_weights` asks the weighted kind more often, `min_questions_per_row` / `max_questions_per_row` bound the
    turns (fewer only when a scene has fewer questions), `video_shapes` sets the moving shapes per video."""

    def larger_share(rows) -> float:
        answers = [m["content"] for row in rows for m in row["messages"] if m["role"] == "assistant"]
        return sum(answer in ("yes", "no") for answer in answers) / len(answers)

    plain = shapes_region_chat_dataset(40, seed=3, video_fraction=0.0).to_list()
    weighted = shapes_region_chat_dataset(
        40,
        seed=3,
        video_fraction=0.0,
        kind_weights={"larger": 20.0},
        max_pairs=6,
        min_questions_per_row=4,
        max_questions_per_row=6,
    ).to_list()
    assert larger_share(weighted) > 0.5 > larger_share(plain)
    turns = [sum(m["role"] == "user" for m in row["messages"]) for row in weighted]
    assert all(1 <= count <= 6 for count in turns) and sum(count >= 4 for count in turns) >= 35
    videos = shapes_region_chat_dataset(6, seed=4, video_fraction=1.0, video_shapes=(4, 6)).to_list()
    answers = {m["content"] for row in videos for m in row["messages"] if m["role"] == "assistant"}
    assert answers <= set(DIRECTIONS)
    assert all(len(draw_scene(np.random.default_rng(k), True, video_shapes=(4, 6)).objects) >= 4 for k in range(5))


def test_ask_every_moving_shape_asks_each_video_shape_once_and_leaves_still_rows_alone():
    options = {"seed": 6, "video_fraction": 0.5, "max_questions_per_row": 1}
    sampled = shapes_region_chat_dataset(30, **options).to_list()
    every = shapes_region_chat_dataset(30, ask_every_moving_shape=True, **options).to_list()
    assert [row["id"] for row in every] == [row["id"] for row in sampled]
    video_rows = 0
    for plain, asked in zip(sampled, every, strict=True):
        turns = sum(m["role"] == "user" for m in asked["messages"])
        if not asked["frames"]:
            assert asked == plain  # still scenes: the same conversation, the random stream unchanged
            continue
        video_rows += 1
        assert sum(m["role"] == "user" for m in plain["messages"]) == 1
        # One direction question per moving shape: as many turns as regions, each region named once.
        assert turns == len(asked["regions"]) >= 2
        assert len({json.dumps(region, sort_keys=True, default=str) for region in asked["regions"]}) == turns
    assert video_rows >= 8


def test_box_fraction_gives_some_regions_as_their_bounding_boxes_and_keeps_the_default_rows():
    """`box_fraction` turns about that share of the named regions into filled bounding boxes (every frame of a video
    region), leaves the others as masks, and does not touch the rows of the default (`box_fraction=0`)."""
    plain = shapes_region_chat_dataset(30, seed=5, video_fraction=0.3).to_list()
    boxed = shapes_region_chat_dataset(30, seed=5, video_fraction=0.3, box_fraction=0.5).to_list()
    assert shapes_region_chat_dataset(30, seed=5, video_fraction=0.3).to_list() == plain

    def masks_of(region) -> dict:
        per_frame = {0: region} if "counts" in region else region  # an image RLE, or {frame: RLE}
        return {frame: rle_decode(rle).astype(bool) for frame, rle in per_frame.items()}

    as_box = as_mask = 0
    for plain_row, boxed_row in zip(plain, boxed, strict=True):
        assert plain_row["messages"] == boxed_row["messages"]
        for plain_region, boxed_region in zip(row_regions(plain_row), row_regions(boxed_row), strict=True):
            masks, boxes = masks_of(plain_region), masks_of(boxed_region)
            assert list(masks) == list(boxes)
            if all(np.array_equal(masks[t], boxes[t]) for t in masks):
                as_mask += 1
                continue
            as_box += 1
            assert all(np.array_equal(boxes[t], box_of_mask(masks[t])) for t in masks)
    assert as_box > 10 and as_mask > 10, (as_box, as_mask)


def test_held_out_items_give_their_regions_as_tight_boxes_on_request():
    """`pipeline_inputs(boxes=True)` gives `[x0, y0, x1, y1]` boxes (per frame for videos) whose rectangles are the
    masks' bounding boxes, and the default inputs stay masks."""
    items = shapes_questions(seed=11, num_per_kind=2)
    for item in items:
        boxed, masked = item.pipeline_inputs(boxes=True), item.inputs
        assert boxed["question"] == masked["question"]
        for box_region, mask_region in zip(boxed["regions"], masked["regions"], strict=True):
            pairs = (
                [(box_region[t], mask_region[t]) for t in mask_region]
                if item.scene.is_video
                else [(box_region, mask_region)]
            )
            for box, mask in pairs:
                rows, cols = np.nonzero(mask)
                assert box == [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
                assert np.array_equal(region_to_mask(box, mask.shape, "box"), box_of_mask(mask))
    assert any(item.scene.is_video for item in items)


def test_mask_centre_is_the_centre_of_mass_as_fractions_of_the_frame():
    mask = np.zeros((10, 20), dtype=bool)
    mask[2:4, 4:8] = True  # rows 2-3, columns 4-7
    mask[3, 9] = True
    # x: columns 4..7 twice and 9, over the width 20; y: rows 2 (4 pixels) and 3 (5 pixels), over the height 10.
    assert mask_centre(mask) == pytest.approx((53 / 9 / 20, 23 / 9 / 10))
    with pytest.raises(ValueError, match="empty mask"):
        mask_centre(np.zeros((4, 4), dtype=bool))
