"""The web demo's event functions without a browser: regions in, overlays and streamed answers out, errors as messages.

The bundled demo checkpoint answers (it really reads regions of `examples/assets/shapes.png`), so the answers can be
checked; tiny random SAM and SAM2 checkpoints (built by the SAM tests' fixtures) stand in for clicks and propagation.
The page itself, in a real browser, is tested in test_web_demo_browser.py.
"""

import threading

import av
import numpy as np
import pytest
from PIL import Image

# Tiny random SAM / SAM2 checkpoints and the pictures they were checked on, shared with the SAM tests.
from test_sam2_propagation import sam2_dir  # noqa: F401  (a fixture)
from test_sam2_propagation import video as random_video
from test_video_sam import image as random_picture
from test_video_sam import sam_dir  # noqa: F401  (a fixture)

from pixelrefer_hf import RegionQAPipeline, web_demo
from pixelrefer_hf.demo import demo_checkpoint
from pixelrefer_hf.sam_utils import SamMaskPredictor
from pixelrefer_hf.testing import tiny_model_and_processor
from pixelrefer_hf.web_demo import (
    CLICK_BOX,
    CLICK_SAM,
    NEW_REGION,
    DemoInputError,
    DemoModels,
    ImageSession,
    VideoSession,
)

RED_SQUARE = "40,40,90,90"
YELLOW_TRIANGLE = "140,30,184,74"
GREEDY = {"max_new_tokens": 16, "do_sample": False}


@pytest.fixture(scope="module")
def demo_models():
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = demo_checkpoint("pixelrefer")
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    pipe = RegionQAPipeline(model=model, processor=AutoProcessor.from_pretrained(path), task="region-qa")
    return DemoModels.from_pipeline(pipe, name="demo", is_toy=True)


@pytest.fixture(scope="module")
def tiny_pipe():
    model, processor = tiny_model_and_processor("pixelrefer", seed=4)
    return RegionQAPipeline(model=model, processor=processor, task="region-qa")


def example_session() -> ImageSession:
    return ImageSession(image=web_demo.example_image())


def scaled(point: tuple[int, int], size) -> tuple[int, int]:
    """Where picture pixel `point` lies on the enlarged picture the page shows."""
    scale = web_demo.display_scale(size)
    return point[0] * scale + scale // 2, point[1] * scale + scale // 2


# ---------------------------------------------------------------------------------------------------------------------
# Image tab
# ---------------------------------------------------------------------------------------------------------------------


def test_example_image_is_the_readme_picture():
    picture = np.asarray(Image.open("examples/assets/shapes.png").convert("RGB"))
    np.testing.assert_array_equal(web_demo.example_image(), picture)


def test_box_region_is_drawn_and_answered_as_it_streams(demo_models):
    session = web_demo.add_image_box(example_session(), RED_SQUARE)
    (region,) = session.regions
    assert region.prompt == [40, 40, 90, 90] and region.mask.sum() == 50 * 50 and region.mask[40:90, 40:90].all()

    view = web_demo.image_view(session)
    picture = session.image
    scale = web_demo.display_scale(picture.shape)
    assert scale == 2 and view.shape == (448, 448, 3)
    # Inside the box the picture is tinted towards region 1's colour; far outside it is the picture, enlarged.
    inside, outside = view[2 * 65, 2 * 65].astype(int), view[2 * 200, 2 * 10]
    tint = np.array(web_demo.region_color(1))
    assert np.abs(inside - tint).sum() < np.abs(picture[65, 65].astype(int) - tint).sum()
    np.testing.assert_array_equal(outside, picture[200, 10])
    assert "region 1" in web_demo.image_region_list(session) and "box 40,40,90,90" in web_demo.image_region_list(
        session
    )

    answers = list(web_demo.ask_image(demo_models, session, "What is <region>?", GREEDY))
    assert answers[-1] == "a red square"
    # Streamed: the text grows token by token before the final answer.
    assert len(answers) >= 3 and all(answers[-1].startswith(partial) for partial in answers)
    direct = demo_models.pipe(image=picture, regions=[[40, 40, 90, 90]], question="What is <region>?", **GREEDY)
    assert answers[-1] == direct["answer"]


def test_two_clicks_make_a_box_and_regions_fill_placeholders_in_order(demo_models):
    session = example_session()
    size = session.image.shape
    session, message = web_demo.add_image_click(demo_models, session, CLICK_BOX, 140, 30)
    assert session.corner == (140, 30) and not session.regions and "opposite corner" in message
    session, _ = web_demo.add_image_click(demo_models, session, CLICK_BOX, 183, 73)  # either order of corners
    assert session.corner is None and session.regions[0].prompt == [140, 30, 184, 74]
    session = web_demo.add_image_box(session, RED_SQUARE)
    answers = list(web_demo.ask_image(demo_models, session, "What is <region>? And <region>?", GREEDY))
    direct = demo_models.pipe(
        image=session.image, regions=[[140, 30, 184, 74], [40, 40, 90, 90]], question="What is <region>? And <region>?"
    )
    assert answers[-1] == direct["answer"]
    # The page maps clicks on the enlarged picture back to picture pixels.
    assert web_demo.to_picture_pixel(size, *scaled((140, 30), size)) == (140, 30)
    assert web_demo.to_picture_pixel(size, 10_000, 10_000) == (223, 223)


def test_brushed_mask_becomes_a_region(demo_models):
    session = example_session()
    layer = np.zeros((224, 224, 4), dtype=np.uint8)
    layer[50:80, 50:80] = (255, 0, 255, 255)  # a stroke inside the red square
    session = web_demo.add_image_brush(demo_models, session, {"background": session.image, "layers": [layer]})
    (region,) = session.regions
    assert region.mask.sum() == 30 * 30 and region.mask[50:80, 50:80].all()
    assert list(web_demo.ask_image(demo_models, session, "What color is <region>?", GREEDY))[-1] == "red"
    # A canvas at another scale is mapped onto the picture.
    half = np.zeros((112, 112, 4), dtype=np.uint8)
    half[25:40, 25:40, 3] = 255
    mask = web_demo.brushed_mask({"layers": [half]}, (224, 224))
    assert mask.sum() == 30 * 30 and mask[50:80, 50:80].all()
    with pytest.raises(DemoInputError, match="nothing is brushed"):
        web_demo.add_image_brush(demo_models, example_session(), {"layers": [np.zeros((224, 224, 4), np.uint8)]})
    with pytest.raises(DemoInputError, match="needs a SAM model"):
        web_demo.add_image_brush(demo_models, example_session(), {"layers": [layer]}, refine_with_sam=True)


def test_regions_are_removed_and_renumbered():
    session = web_demo.add_image_box(web_demo.add_image_box(example_session(), RED_SQUARE), YELLOW_TRIANGLE)
    remaining = web_demo.remove_image_region(session, "1")
    assert [r.prompt for r in remaining.regions] == [[140, 30, 184, 74]]
    assert "region 1" in web_demo.image_region_list(remaining) and "region 2" not in web_demo.image_region_list(
        remaining
    )
    assert len(session.regions) == 2  # the old session value is untouched (gr.State keeps it if an event fails)
    with pytest.raises(DemoInputError, match="there is no region 3"):
        web_demo.remove_image_region(session, 3)
    with pytest.raises(DemoInputError, match="choose the region"):
        web_demo.remove_image_region(session, None)


@pytest.mark.parametrize(
    "question, boxes, message",
    [
        ("What is <region>?", [], "add a region first"),
        ("What is <region> and <region>?", [RED_SQUARE], "2 <region> placeholder.* there are 1 region"),
        ("What is this?", [RED_SQUARE], "0 <region> placeholder"),
        ("  ", [RED_SQUARE], "type a question"),
    ],
)
def test_question_errors_are_messages(demo_models, question, boxes, message):
    session = example_session()
    for box in boxes:
        session = web_demo.add_image_box(session, box)
    with pytest.raises(DemoInputError, match=message):
        list(web_demo.ask_image(demo_models, session, question, GREEDY))


def test_pipeline_errors_end_the_stream_as_messages(demo_models):
    """An error raised inside the pipeline thread before `generate` starts must not leave the page waiting."""
    session = web_demo.add_image_box(example_session(), RED_SQUARE)
    with pytest.raises(DemoInputError, match="must not contain <image>"):
        list(web_demo.ask_image(demo_models, session, "<image> What is <region>?", GREEDY))


@pytest.mark.parametrize(
    "text, message",
    [
        ("40,40,90", "four numbers"),
        ("a,b,c,d", "four numbers"),
        ("90,40,40,90", "x1 must exceed x0"),
        ("300,300,400,400", "entirely outside"),
    ],
)
def test_bad_boxes(text, message):
    with pytest.raises(DemoInputError, match=message):
        web_demo.add_image_box(example_session(), text)


def test_insert_placeholder_and_generation_settings():
    assert web_demo.insert_placeholder("") == "<region>"
    assert web_demo.insert_placeholder("Is <region> larger than") == "Is <region> larger than <region>"
    assert web_demo.generation_options(32, False, 0.7, 0.9) == {"max_new_tokens": 32, "do_sample": False}
    assert web_demo.generation_options(8, True, 0.5, 0.8) == {
        "max_new_tokens": 8,
        "do_sample": True,
        "temperature": 0.5,
        "top_p": 0.8,
    }
    with pytest.raises(DemoInputError, match="1-1024"):
        web_demo.generation_options(0, False, 0.7, 0.9)


def test_uploads(tmp_path):
    good = tmp_path / "scene.png"
    Image.fromarray(web_demo.example_image()).save(good)
    np.testing.assert_array_equal(web_demo.read_image_upload(str(good)), web_demo.example_image())
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a picture")
    with pytest.raises(DemoInputError, match="broken.png: cannot read image 'broken.png'"):
        web_demo.read_image_upload(str(broken))
    with pytest.raises(DemoInputError, match=r"scene.png: image 'scene.png' is 224x224 = 50176 pixels, more than"):
        web_demo.read_image_upload(str(good), max_pixels=10_000)
    with pytest.raises(DemoInputError, match="no file was uploaded"):
        web_demo.read_image_upload(None)


def write_video(path, frames: list[np.ndarray], fps: int = 1, codec: str = "mpeg4") -> None:
    height, width = frames[0].shape[:2] if frames else (32, 32)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        container.start_encoding()
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_video_uploads(tmp_path):
    frames, _ = web_demo.example_video()
    clip = tmp_path / "shapes.mp4"
    write_video(clip, frames)
    decoded, timestamps = web_demo.read_video_upload(str(clip), fps=1, max_frames=16)
    assert len(decoded) == 8 and timestamps == [float(t) for t in range(8)] and decoded[0].shape == (224, 224, 3)
    empty = tmp_path / "empty.avi"
    write_video(empty, [])
    with pytest.raises(DemoInputError, match="'empty.avi': it holds no decodable frame") as error:
        web_demo.read_video_upload(str(empty), fps=1, max_frames=16)
    assert str(tmp_path) not in str(error.value)  # the visitor's file name, not the server's temporary path
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"definitely not a video")
    with pytest.raises(DemoInputError, match="cannot read video 'junk.mp4'"):
        web_demo.read_video_upload(str(junk), fps=1, max_frames=16)
    with pytest.raises(DemoInputError, match="more than max_image_pixels=1000"):
        web_demo.read_video_upload(str(clip), fps=1, max_frames=16, max_pixels=1000)


# ---------------------------------------------------------------------------------------------------------------------
# Video tab
# ---------------------------------------------------------------------------------------------------------------------


def test_video_regions_on_several_frames_are_answered(demo_models):
    frames, timestamps = web_demo.example_video()
    session = web_demo.load_video(VideoSession(), frames, timestamps, "example")
    session = web_demo.add_video_box(session, 0, NEW_REGION, "134,88,154,108")
    session = web_demo.add_video_box(session, 3, "region 1", "110,88,130,108")
    session = web_demo.add_video_box(session, 2, NEW_REGION, "62,181,79,198")
    assert [sorted(region) for region in session.regions] == [[0, 3], [2]]
    # Frame 3 shows region 1 only; frame 1 shows no region.
    assert not np.array_equal(web_demo.video_view(session, 3), web_demo.video_view(session, 1))
    np.testing.assert_array_equal(
        web_demo.video_view(session, 1), np.asarray(Image.fromarray(frames[1]).resize((448, 448), Image.NEAREST))
    )
    question = "Which way does <region> move? And <region>?"
    answers = list(web_demo.ask_video(demo_models, session, question, False, GREEDY))
    item = {
        "video": frames,
        "video_timestamps": timestamps,
        "regions": [{0: [134, 88, 154, 108], 3: [110, 88, 130, 108]}, {2: [62, 181, 79, 198]}],
        "question": question,
    }
    assert answers[-1] == demo_models.pipe(item, **GREEDY)["answer"] and len(answers) >= 2
    with pytest.raises(DemoInputError, match="needs a SAM2 model"):
        list(web_demo.ask_video(demo_models, session, question, True, GREEDY))
    with pytest.raises(DemoInputError, match="frame 8 is outside the video"):
        web_demo.add_video_box(session, 8, NEW_REGION, "1,1,5,5")
    with pytest.raises(DemoInputError, match="upload a video"):
        web_demo.add_video_box(VideoSession(), 0, NEW_REGION, "1,1,5,5")
    with pytest.raises(DemoInputError, match="has no frames"):
        web_demo.load_video(VideoSession(), [], [], "empty.mp4")
    assert len(web_demo.remove_video_region(session, 1).regions) == 1


def test_two_clicks_on_a_frame_make_a_video_box(demo_models):
    frames, timestamps = web_demo.example_video()
    session = web_demo.load_video(VideoSession(), frames, timestamps, "example")
    session, _ = web_demo.add_video_click(demo_models, session, 2, NEW_REGION, CLICK_BOX, 10, 20)
    assert session.corner == (2, 10, 20)
    session, _ = web_demo.add_video_click(demo_models, session, 2, NEW_REGION, CLICK_BOX, 30, 40)
    assert session.regions[0][2].prompt == [10, 20, 31, 41] and session.corner is None


# ---------------------------------------------------------------------------------------------------------------------
# SAM and SAM2
# ---------------------------------------------------------------------------------------------------------------------


def test_sam_click_and_brushed_stroke_become_sam_masks(tiny_pipe, sam_dir):  # noqa: F811
    models = DemoModels.from_pipeline(tiny_pipe, sam_model=sam_dir)
    picture = random_picture(1)
    session, _ = web_demo.add_image_click(models, ImageSession(image=picture), CLICK_SAM, 20, 30)
    expected = SamMaskPredictor(sam_dir).predict(picture, points=[[20, 30]], labels=[1])
    np.testing.assert_array_equal(session.regions[0].mask, expected)
    answers = list(web_demo.ask_image(models, session, "What is <region>?", GREEDY))
    assert answers[-1] == tiny_pipe(image=picture, regions=[expected], question="What is <region>?", **GREEDY)["answer"]

    layer = np.zeros((*picture.shape[:2], 4), dtype=np.uint8)
    layer[20:40, 10:30, 3] = 255
    session = web_demo.add_image_brush(models, ImageSession(image=picture), {"layers": [layer]}, refine_with_sam=True)
    # The prompt is the stroke's box and its most central painted pixel.
    expected = SamMaskPredictor(sam_dir).predict(picture, points=[[20, 30]], labels=[1], box=[10, 20, 30, 40])
    np.testing.assert_array_equal(session.regions[0].mask, expected)

    # Without SAM a click can only be a box corner.
    plain = DemoModels.from_pipeline(tiny_pipe)
    with pytest.raises(DemoInputError, match="needs a SAM model"):
        web_demo.add_image_click(plain, ImageSession(image=picture), CLICK_SAM, 20, 30)


def test_sam2_propagation_is_shown_and_is_what_the_model_sees(tiny_pipe, sam2_dir):  # noqa: F811
    models = DemoModels.from_pipeline(tiny_pipe, sam2_model=sam2_dir)
    frames = random_video()
    session = web_demo.load_video(VideoSession(), frames, [0.0, 1.0, 2.0, 3.0], "random")
    session = web_demo.add_video_box(session, 1, NEW_REGION, "10,8,40,30")
    carried = web_demo.propagate_video(models, session)
    item = web_demo.video_item(session, "What is <region>?")
    seen = tiny_pipe.preprocess(item, propagate_regions=True, sam2_model=sam2_dir)["regions"]
    assert sorted(carried.propagated[0]) == sorted(seen[0]) and len(seen[0]) > 1
    for frame, mask in seen[0].items():
        np.testing.assert_array_equal(carried.propagated[0][frame], mask)
    # A frame the region was not drawn on shows SAM2's mask (lightly); before propagation it showed the bare frame.
    other = next(t for t in carried.propagated[0] if t != 1)
    assert not np.array_equal(web_demo.video_view(carried, other), web_demo.video_view(session, other))
    assert "SAM2: on" in web_demo.video_region_list(carried)
    answers = list(web_demo.ask_video(models, session, "What is <region>?", True, GREEDY))
    expected = tiny_pipe(item, propagate_regions=True, sam2_model=sam2_dir, **GREEDY)["answer"]
    assert answers[-1] == expected


# ---------------------------------------------------------------------------------------------------------------------
# Serving
# ---------------------------------------------------------------------------------------------------------------------


def test_concurrent_sessions_keep_their_own_regions_and_answers(demo_models):
    """Two visitors ask at the same moment through the one shared pipeline; neither sees the other's answer."""
    sessions = {
        "a red square": web_demo.add_image_box(example_session(), RED_SQUARE),
        "a yellow triangle": web_demo.add_image_box(example_session(), YELLOW_TRIANGLE),
    }
    start = threading.Barrier(len(sessions))
    streams: dict[str, list[str]] = {}

    def visit(expected: str) -> None:
        start.wait()
        streams[expected] = list(web_demo.ask_image(demo_models, sessions[expected], "What is <region>?", GREEDY))

    threads = [threading.Thread(target=visit, args=(expected,)) for expected in sessions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert {expected: stream[-1] for expected, stream in streams.items()} == {e: e for e in sessions}
    # Every partial answer of a stream belongs to that stream's final answer.
    for expected, stream in streams.items():
        assert all(expected.startswith(partial) for partial in stream)
