"""The `pixelrefer` command, in process through `main([...])` and once as a real subprocess."""

import json
import os
import subprocess
import sys
import types

import av
import numpy as np
import pytest
from PIL import Image

from pixelrefer_hf import RegionQAPipeline, cli
from pixelrefer_hf.region_utils import rle_encode
from pixelrefer_hf.testing import tiny_model_and_processor

HEIGHT, WIDTH = 40, 56


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    picture = np.random.default_rng(0).integers(0, 256, size=(HEIGHT, WIDTH, 3), dtype=np.uint8)
    mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    mask[8:30, 10:40] = 255
    Image.fromarray(picture).save(folder / "picture.png")
    Image.fromarray(mask).save(folder / "mask.png")
    (folder / "rle.json").write_text(json.dumps(rle_encode(mask)))
    with av.open(str(folder / "clip.mp4"), "w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for index in range(8):
            frame = np.full((HEIGHT, WIDTH, 3), 20 * index, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return {"folder": folder, "picture": picture, "mask": mask > 0}


@pytest.fixture(autouse=True)
def tiny_default_model(monkeypatch):
    """These tests compare the command with the tiny random model's pipeline; the default (demo) model has its own
    tests in test_demo_checkpoints.py."""
    monkeypatch.setattr(cli, "DEFAULT_MODEL", "tiny-random")


def run_cli(argv, capsys) -> tuple[int, str, str]:
    status = cli.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_ask_image_with_regions_in_order_matches_the_pipeline(files, capsys, caplog):
    folder = files["folder"]
    question = "Compare <region>, <region> and <region>."
    status, out, err = run_cli(
        [
            "ask",
            folder / "picture.png",
            "--box",
            "4,6,30,20",
            "--mask",
            folder / "mask.png",
            "--rle",
            folder / "rle.json",
            question,
            "--json",
            "--max-new-tokens",
            "5",
        ],
        capsys,
    )
    assert status == 0, err
    assert "meaningless" in caplog.text  # the tiny default model warns
    result = json.loads(out)
    model, processor = tiny_model_and_processor("pixelrefer")
    pipe = RegionQAPipeline(model=model, processor=processor, task="region-qa")
    expected = pipe(
        image=files["picture"],
        regions=[[4, 6, 30, 20], files["mask"], files["mask"]],
        question=question,
        max_new_tokens=5,
    )
    assert result == {"question": question, "answer": expected["answer"], "model": cli.DEFAULT_MODEL}
    swapped = pipe(
        image=files["picture"],
        regions=[files["mask"], [4, 6, 30, 20], files["mask"]],
        question=question,
        max_new_tokens=5,
    )
    status, out, _ = run_cli(
        [
            "ask",
            folder / "picture.png",
            "--mask",
            folder / "mask.png",
            "--box",
            "4,6,30,20",
            "--rle",
            json.dumps(rle_encode(files["mask"])),
            question,
            "--max-new-tokens",
            "5",
        ],
        capsys,
    )
    assert status == 0 and out.strip() == swapped["answer"]


def test_ask_several_questions_hands_the_regions_out_in_order(files, capsys):
    """Repeated --question: the region options fill the questions' placeholders in order, one JSON line each, and
    the answers are those of separate pipeline calls (answered in one batch that shares the picture)."""
    folder = files["folder"]
    questions = ["What is <region>?", "Compare <region> and <region>.", "And the whole picture?"]
    arguments = ["ask", folder / "picture.png", questions[0], "--question", questions[1], "--question", questions[2]]
    arguments += ["--box", "4,6,30,20", "--mask", folder / "mask.png", "--box", "10,10,40,30"]
    status, out, err = run_cli([*arguments, "--json", "--max-new-tokens", "5"], capsys)
    assert status == 0, err
    results = [json.loads(line) for line in out.splitlines()]
    model, processor = tiny_model_and_processor("pixelrefer")
    pipe = RegionQAPipeline(model=model, processor=processor, task="region-qa")
    regions = [[[4, 6, 30, 20]], [files["mask"], [10, 10, 40, 30]], []]
    for result, question, regions_of in zip(results, questions, regions, strict=True):
        expected = pipe(image=files["picture"], regions=regions_of, question=question, max_new_tokens=5)
        assert result == {"question": question, "answer": expected["answer"], "model": cli.DEFAULT_MODEL}
    status, _, err = run_cli([*arguments[:-2], "--max-new-tokens", "5"], capsys)
    assert status == 2 and "the questions hold 1 + 2 + 0 = 3 <region> placeholder(s) but 2 region(s)" in err


def test_ask_video_file(files, capsys):
    status, out, err = run_cli(
        [
            "ask",
            files["folder"] / "clip.mp4",
            "--frame",
            "1",
            "--box",
            "5,5,40,30",
            "Where does <region> go?",
            "--fps",
            "2",
            "--max-frames",
            "3",
            "--json",
            "--max-new-tokens",
            "4",
        ],
        capsys,
    )
    assert status == 0, err
    assert isinstance(json.loads(out)["answer"], str)
    assert "Decoding video" in err
    status, _, err = run_cli(
        [
            "ask",
            files["folder"] / "clip.mp4",
            "--frame",
            "5",
            "--box",
            "5,5,40,30",
            "<region>?",
            "--fps",
            "2",
            "--max-frames",
            "3",
        ],
        capsys,
    )
    assert status == 2 and "frame index 5 is out of range for a video with 3 frames" in err


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--box", "1,2,3", "<region>?"], "--box '1,2,3': expected 4 comma-separated numbers"),
        (["--point", "3,4", "<region>?"], "--point needs --sam-model"),
        (["--box", "1,2,30,30", "<region> and <region>?"], "2 <region> placeholder(s) but 1 region(s)"),
        (["--mask", "/no/mask.png", "<region>?"], "--mask '/no/mask.png': cannot read the mask image"),
        (["--rle", "{not json", "<region>?"], "--rle: expected a COCO RLE"),
    ],
)
def test_ask_errors_exit_with_status_2(files, capsys, arguments, message):
    status, out, err = run_cli(["ask", files["folder"] / "picture.png", *arguments], capsys)
    assert status == 2 and out == ""
    assert message in err


def test_ask_unreadable_media(files, capsys):
    status, _, err = run_cli(["ask", files["folder"] / "missing.png", "--box", "1,1,9,9", "<region>?"], capsys)
    assert status == 2 and "cannot read image" in err
    status, _, err = run_cli(["ask", files["folder"] / "missing.mp4", "--box", "1,1,9,9", "<region>?"], capsys)
    assert status == 2 and "cannot read video" in err


def test_info_reports_variant_sizes_budget_and_attention(tmp_path, capsys):
    model, processor = tiny_model_and_processor("pixelrefer-lite")
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    status, out, err = run_cli(["info", tmp_path, "--json"], capsys)
    assert status == 0, err
    info = json.loads(out)
    assert info["variant"] == "pixelrefer-lite"
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert sum(info["parameters_by_part"].values()) == info["parameters"]
    assert info["language_model"]["layers"] == 2 and info["language_model"]["hidden_size"] == 64
    assert info["vision_tower"]["hidden_size"] == 32 and info["vision_tower"]["patch_size"] == 14
    assert info["token_budget"] == {"num_object_tokens": 8, "max_visual_tokens": 1024, "max_object_patches": 50}
    assert info["attn_implementation"] == "sdpa"
    status, out, _ = run_cli(["info"], capsys)
    assert status == 0
    assert "variant:      pixelrefer\n" in out and "attention:    sdpa" in out and "8 per object" in out


def test_convert_dispatches_to_the_convert_module(monkeypatch, capsys):
    seen = []
    fake = types.ModuleType("pixelrefer_hf.convert")
    fake.main = lambda argv: seen.append(argv) or 3
    monkeypatch.setitem(sys.modules, "pixelrefer_hf.convert", fake)
    monkeypatch.setattr(sys.modules["pixelrefer_hf"], "convert", fake, raising=False)
    assert cli.main(["convert", "--official", "x", "--out", "y"]) == 3
    assert seen == [["--official", "x", "--out", "y"]]

    monkeypatch.setitem(sys.modules, "pixelrefer_hf.convert", None)  # makes `import` fail
    monkeypatch.delattr(sys.modules["pixelrefer_hf"], "convert")
    assert cli.main(["convert", "--help"]) == 2
    assert "`pixelrefer convert` is not available" in capsys.readouterr().err


def test_installed_command_runs_as_a_subprocess(files):
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pixelrefer_hf.cli",
            "ask",
            str(files["folder"] / "picture.png"),
            "--box",
            "4,6,30,20",
            "What is <region>?",
            "--json",
            "--max-new-tokens",
            "3",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert set(json.loads(run.stdout)) == {"question", "answer", "model"}


EXAMPLES = ("region_qa_pipeline.py", "region_qa_video.py", "region_qa_streaming.py")
# One interpreter runs the three examples one after the other (as `python examples/x.py` would, via runpy), which
# saves two interpreter start-ups; a failure in one fails the run and names it.
RUN_EXAMPLES = """
import runpy, sys
for script in sys.argv[1:]:
    print("EXAMPLE " + script, flush=True)
    sys.argv = [script, "--max-new-tokens", "4"]
    runpy.run_path(script, run_name="__main__")
"""


def test_examples_run_on_the_demo_model():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    scripts = [os.path.join(root, "examples", name) for name in EXAMPLES]
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    run = subprocess.run(
        [sys.executable, "-c", RUN_EXAMPLES, *scripts], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    sections = run.stdout.split("EXAMPLE ")[1:]
    assert [section.split("\n", 1)[0] for section in sections] == scripts
    pipeline_out, video_out, streaming_out = sections
    assert pipeline_out.count("{'answer': ") == 5 and "{'error': 'item 4: " in pipeline_out
    assert "decoded 8 frames at [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0] s" in video_out
    assert video_out.count("{'answer': ") == 3
    assert "What is <region>? -> " in streaming_out


def test_web_passes_its_options_to_the_server(monkeypatch, capsys):
    from pixelrefer_hf import web_demo

    calls = []
    monkeypatch.setattr(web_demo, "serve", lambda **options: calls.append(options))
    argv = ["web", "--model", "demo-lite", "--sam-model", "sam", "--sam2-model", "sam2", "--host", "0.0.0.0"]
    status, _, err = run_cli([*argv, "--port", "8123", "--concurrency", "2", "--device", "cuda:1"], capsys)
    assert status == 0, err
    assert run_cli(["web"], capsys)[0] == 0
    assert calls == [
        {
            "model": "demo-lite",
            "sam_model": "sam",
            "sam2_model": "sam2",
            "host": "0.0.0.0",
            "port": 8123,
            "device": "cuda:1",
            "concurrency": 2,
        },
        {
            "model": cli.DEFAULT_MODEL,
            "sam_model": None,
            "sam2_model": None,
            "host": "127.0.0.1",
            "port": 7860,
            "device": "cpu",
            "concurrency": 1,
        },
    ]
    # `python -m pixelrefer_hf.web_demo` is the same command.
    assert web_demo.main(["--port", "8124"]) == 0 and calls[-1]["port"] == 8124


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--port", "70000"], "--port 70000: a TCP port is 0-65535"),
        (["--concurrency", "0"], "--concurrency 0: at least one request"),
    ],
)
def test_web_errors_exit_with_status_2(capsys, arguments, message):
    status, _, err = run_cli(["web", *arguments], capsys)
    assert status == 2 and f"pixelrefer web: error: {message}" in err


def test_web_without_gradio_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` now raises ImportError
    status, _, err = run_cli(["web"], capsys)
    assert status == 2 and 'pip install "pixelrefer-hf[web]"' in err
