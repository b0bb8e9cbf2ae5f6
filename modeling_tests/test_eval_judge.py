"""The LLM-judged benchmarks of `pixelrefer eval`, against a local OpenAI-compatible server.

A stdlib HTTP server on 127.0.0.1 answers `POST /v1/chat/completions` with canned judgments chosen from the request
content, and is reached through the real `openai` client. Fixtures are small files in each benchmark's official format
with synthetic images; prediction records are written by hand, so no model runs. Expected scores are worked out by
hand in the comments next to them.
"""

from __future__ import annotations

import json
import re
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from pixelrefer_hf.cli import main as cli_main
from pixelrefer_hf.evaluation.base import EvalDataError, ScoreOptions, published_numbers
from pixelrefer_hf.evaluation.judge import Judge, JudgeError, JudgeRequest, user_message
from pixelrefer_hf.evaluation.judged import (
    CLAIR_PROMPT,
    DLC_QUESTION,
    FERRET_REVIEW_RULE,
    FERRET_SYSTEM_PROMPT,
    JUDGED_BENCHMARKS,
    REF_L4_DETAIL_QUESTION,
    REF_L4_SHORTEN_PROMPT,
    VIDEOREFER_D_QUESTION,
    VIDEOREFER_D_QUESTION_LITE,
    VIDEOREFER_D_SYSTEM_PROMPT,
    DLCBench,
    FerretBenchReasoning,
    RefL4Clair,
    VideoReferBenchD,
    dlc_parse_choice,
    shorten_ref_l4_predictions,
)
from pixelrefer_hf.region_utils import rle_decode, rle_encode
from pixelrefer_hf.synthetic import draw_image_scene, draw_video_scene

# ---------------------------------------------------------------------------------------------------------------------
# A local OpenAI-compatible judge
# ---------------------------------------------------------------------------------------------------------------------

Responder = Callable[[dict], "str | tuple[int, str]"]


class FakeJudgeServer:
    """`POST /v1/chat/completions` answered by `responder(request body)`: a reply text, or (HTTP status, body)."""

    def __init__(self, responder: Responder):
        self.responder = responder
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (the http.server API)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    server.bodies.append(body)
                    server.headers.append(dict(self.headers))
                if self.path != "/v1/chat/completions":
                    return self._send(404, json.dumps({"error": {"message": f"no route {self.path}"}}))
                answer = server.responder(body)
                if isinstance(answer, tuple):
                    return self._send(*answer)
                completion = {
                    "id": f"cmpl-{len(server.bodies)}",
                    "object": "chat.completion",
                    "created": 0,
                    "model": body["model"],
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}
                    ],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                }
                self._send(200, json.dumps(completion))

            def _send(self, status: int, text: str):
                payload = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):  # keep the test output clean
                pass

        lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def close(self):
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def judge_server():
    servers = []

    def start(responder: Responder) -> FakeJudgeServer:
        servers.append(FakeJudgeServer(responder))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def options_for(server_url: str, run_dir: Path, **overrides) -> ScoreOptions:
    settings = {"judge_base_url": server_url, "judge_model": "judge-llm", "judge_timeout": 10, **overrides}
    return ScoreOptions(run_dir=run_dir, **settings)


def user_text(body: dict) -> str:
    return next(m["content"] for m in body["messages"] if m["role"] == "user")


def system_text(body: dict) -> str | None:
    return next((m["content"] for m in body["messages"] if m["role"] == "system"), None)


def record(id: str, prediction: str | None, reference=None, meta=None, error: str | None = None) -> dict:
    return {"id": id, "prediction": prediction, "reference": reference, "meta": meta or {}, "error": error}


def free_port() -> int:
    """A port with nothing listening on it (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def save_scene_image(path: Path, seed: int):
    scene = draw_image_scene(np.random.default_rng(seed))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(scene.frames[0]).save(path)
    return scene


# ---------------------------------------------------------------------------------------------------------------------
# DLC-Bench
# ---------------------------------------------------------------------------------------------------------------------


def colour_question(key: str) -> dict:
    return {
        "question": f"[{key}] Which of the following is applicable to the description?",
        "choices": [
            ["The shape is not mentioned.", 0],
            ["The colour of the shape is not mentioned, but the shape is mentioned.", 0.5],
            ["The colour of the shape is mentioned but is not red.", -1],
            ["The colour of the shape is mentioned and is red.", 1],
        ],
        "type": "positive",
    }


def extra_question(key: str) -> dict:
    return {
        "question": f"[{key}] Which of the following is applicable to the description?",
        "choices": [["A second shape is mentioned.", -1], ["No second shape is mentioned.", 1]],
        "type": "negative",
    }


@pytest.fixture
def dlc_data(tmp_path) -> Path:
    folder = tmp_path / "DLC-bench"
    scene_a = save_scene_image(folder / "images" / "a.png", seed=1)
    scene_b = save_scene_image(folder / "images" / "b.png", seed=2)
    square = [[10.0, 10.0, 40.0, 10.0, 40.0, 40.0, 10.0, 40.0]]
    coco = {
        "images": [
            {"id": 1, "file_name": "a.png", "height": 224, "width": 224},
            {"id": 2, "file_name": "b.png", "height": 224, "width": 224},
        ],
        "categories": [{"id": 1, "name": "object"}],
        "annotations": [
            {"id": 101, "image_id": 1, "category_id": 1, "segmentation": rle_encode(scene_a.objects[0].masks[0])},
            {"id": 102, "image_id": 1, "category_id": 1, "segmentation": square},
            {"id": 103, "image_id": 1, "category_id": 1, "segmentation": square},  # no questions: not asked
            {"id": 104, "image_id": 2, "category_id": 7, "segmentation": square},  # unknown category: not asked
            {"id": 201, "image_id": 2, "category_id": 1, "segmentation": rle_encode(scene_b.objects[0].masks[0])},
        ],
    }
    qa = {
        "101": [colour_question("101-1"), colour_question("101-2"), extra_question("101-3")],
        "102": [colour_question("102-1"), colour_question("102-2"), extra_question("102-3")],
        "201": [colour_question("201-1")],
    }
    (folder / "annotations.json").write_text(json.dumps(coco))
    (folder / "qa.json").write_text(json.dumps(qa))
    (folder / "class_names.json").write_text(json.dumps({"101": "circle", "102": "squares", "201": "apple"}))
    return folder


# The judge's answer to each question, keyed by the question's tag; recognition answers depend on the description.
DLC_REPLIES = {
    "101-1": "D. The colour of the shape is mentioned and is red.",  # 1
    "101-2": "B",  # 0.5
    "101-3": "No second shape is mentioned.",  # 1
    "102-1": "D",  # 1, capped at 0: the description is not of the annotated class
    "102-2": "I would rather not say.",  # unparsed: "not mentioned", 0
    "102-3": "A. A second shape is mentioned.",  # -1
    "201-1": "D",
}


def dlc_responder(body: dict) -> str:
    text = user_text(body)
    question = text.split("with one of the choices:\n", 1)[1]
    tag = re.match(r"\[(.*?)\]", question)
    if tag:
        return DLC_REPLIES[tag.group(1)]
    description = text.split("The description is:\n", 1)[1].split("\n\nFrom the description", 1)[0]
    if "square" in description:
        return "No"  # recognition fails for 102
    if "apple" in description:
        return "Perhaps."  # unreadable recognition for 201
    return "Yes"


def dlc_records(items) -> list[dict]:
    descriptions = {"101": "A red circle.", "102": "Two red squares.", "201": "An apple, I think."}
    records = [record(item.id, descriptions[item.id], item.reference, item.meta) for item in items]
    return [*records, record("999", None, error="CUDA out of memory")]


def test_dlc_bench_load_gives_the_official_prompt_and_regions(dlc_data):
    items = DLCBench().load(dlc_data)
    assert [item.id for item in items] == ["101", "102", "201"]
    assert all(item.question == DLC_QUESTION for item in items)
    coco = json.loads((dlc_data / "annotations.json").read_text())
    assert items[0].regions == [coco["annotations"][0]["segmentation"]]
    assert items[1].regions == [{"polygons": coco["annotations"][1]["segmentation"]}]
    assert items[0].image == str(dlc_data / "images" / "a.png") and items[2].image.endswith("b.png")
    assert items[1].reference["class_name"] == "squares"
    assert items[1].reference["questions"][2]["type"] == "negative"


def test_dlc_bench_scores_as_computed_by_hand(dlc_data, judge_server, tmp_path):
    server = judge_server(dlc_responder)
    items = DLCBench().load(dlc_data)
    result = DLCBench().score(dlc_records(items), options_for(server.url, tmp_path / "run"))
    # 101 recognised: positives 1 and 0.5 -> 0.75, negative 1. 102 not recognised: positives min(0, 1) = 0 and
    # unparsed 0 -> 0, negative -1. 201: unreadable recognition, left out. avg_pos (0.75 + 0) / 2, avg_neg (1 - 1) / 2.
    assert result["avg_pos"] == pytest.approx(37.5)
    assert result["avg_neg"] == pytest.approx(0.0)
    assert result["avg"] == pytest.approx(18.75)
    assert (result["items"], result["scored"], result["errors"]) == (4, 2, 1)
    assert (result["unparsed"], result["unparsed_items"]) == (2, 1)
    assert result["judge"]["base_url"] == server.url and result["judge"]["model"] == "judge-llm"
    # Recognition + 3, recognition + 3, recognition + 1; the error record costs nothing.
    assert len(server.bodies) == 10
    body = server.bodies[0]
    assert body["model"] == "judge-llm" and body["temperature"] == 0 and body["max_tokens"] == 300
    prompts = [user_text(b) for b in server.bodies]
    assert any("is a circle or an object of a similar type" in p for p in prompts)
    assert any("are squares or objects of a similar type" in p for p in prompts)
    assert any("is an apple or an object" in p for p in prompts)
    assert any(p.endswith("A. Yes\nB. No\n") for p in prompts)


def test_second_scoring_is_served_from_the_cache(dlc_data, judge_server, tmp_path):
    server = judge_server(dlc_responder)
    items = DLCBench().load(dlc_data)
    options = options_for(server.url, tmp_path / "run")
    first = DLCBench().score(dlc_records(items), options)
    sent = len(server.bodies)
    second = DLCBench().score(dlc_records(items), options)
    assert len(server.bodies) == sent == 10  # the second run sent nothing
    assert {k: v for k, v in second.items() if k != "judge"} == {k: v for k, v in first.items() if k != "judge"}
    assert second["judge"]["requests_sent"] == 0 and second["judge"]["cache_hits"] == 10
    cache = tmp_path / "run" / "judge_cache"
    assert len(list(cache.glob("*.json"))) == 10 and not list(cache.glob(".*"))  # no temporary file left
    # The key is not part of a request; another judge model is.
    DLCBench().score(dlc_records(items)[:1], options_for(server.url, tmp_path / "run", judge_api_key_env="NONE_SET"))
    assert len(server.bodies) == sent
    other = ScoreOptions(run_dir=tmp_path / "run", judge_base_url=server.url, judge_model="another-judge")
    DLCBench().score(dlc_records(items)[:1], other)
    assert len(server.bodies) == sent + 4


def test_dlc_parse_choice_follows_dams_rules():
    choices = ["The wing is not mentioned.", "The wing is mentioned and is grey.", "The wing is mentioned."]
    assert dlc_parse_choice("b", choices) == 1
    assert dlc_parse_choice("C. The wing is mentioned.", choices) == 2
    # Two choices occur ("...mentioned." inside the grey one): the one starting last, the longest among those.
    assert dlc_parse_choice("so: the wing is mentioned and is grey.", choices) == 1
    assert dlc_parse_choice("A. something else", choices) == 0
    assert dlc_parse_choice("is not mentioned", choices) == 0  # inside a choice
    assert dlc_parse_choice("c\nbecause", choices) == 2
    assert dlc_parse_choice("e.", choices) is None  # a letter beyond the choices
    assert dlc_parse_choice("  ", choices) is None


# ---------------------------------------------------------------------------------------------------------------------
# VideoRefer-Bench-D
# ---------------------------------------------------------------------------------------------------------------------


def write_video(path: Path, frames: list[np.ndarray], fps: int = 4) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


@pytest.fixture
def videorefer_data(tmp_path) -> Path:
    folder = tmp_path / "VideoRefer-Bench-D"
    entries = []
    for index in range(2):
        scene = draw_video_scene(np.random.default_rng(10 + index))
        write_video(folder / "Panda-70M-part" / f"clip{index}.mp4", scene.frames)
        masks = scene.objects[0].masks
        annotation = {str(t): {"segmentation": rle_encode(masks[t])} for t in (0, 2, 4)}
        if index == 1:
            annotation["6"] = {"segmentation": rle_encode(np.zeros_like(masks[6]))}  # empty: Lite drops it
        entries.append(
            {
                "id": index,
                "video": f"clip{index}.mp4",
                "caption": f"Shape {index} moves {scene.objects[0].direction}.",
                "frame_idx": "2",
                "annotation": [annotation],
            }
        )
    (folder / "VideoRefer-Bench-D.json").write_text(json.dumps(entries))
    return folder


def test_videorefer_d_load_gives_the_official_prompt_and_regions(videorefer_data):
    entries = json.loads((videorefer_data / "VideoRefer-Bench-D.json").read_text())
    items = VideoReferBenchD().load(videorefer_data)
    assert [item.id for item in items] == ["0", "1"]
    assert items[0].question == VIDEOREFER_D_QUESTION
    assert items[0].regions == [{2: entries[0]["annotation"][0]["2"]["segmentation"]}]
    assert items[0].meta == {"fps": 1, "max_frames": 768, "region_frames": "source"}
    assert items[0].video == str(videorefer_data / "Panda-70M-part" / "clip0.mp4")
    assert items[1].reference == entries[1]["caption"]

    lite = VideoReferBenchD(lite=True).load(videorefer_data / "VideoRefer-Bench-D.json")
    assert lite[0].question == VIDEOREFER_D_QUESTION_LITE
    assert lite[1].meta == {"source_frames": [0, 2, 4, 6]}
    assert sorted(lite[1].regions[0]) == [0, 1, 2]  # the empty mask on frame 6 is left out
    assert rle_decode(lite[1].regions[0][1]).any()


def videorefer_responder(body: dict) -> str:
    text = user_text(body)
    if "Predicted answer: prediction A" in text:
        return (
            "1. Subject Correspondence: 5\nExplanation: right shape.\n2. Appearance Description: 4\nExplanation: ok\n"
            "3. Temporal Description: 3\nExplanation: ok\n4. Hallucination Detection: 2.5\nExplanation: invents a cat."
        )
    if "Predicted answer: prediction B" in text:  # no temporal score
        return "1. Subject Correspondence: 3\n2. Appearance Description: 2\n4. Hallucination Detection: 4\n"
    return "I cannot judge this description."


def test_videorefer_d_scores_as_computed_by_hand(judge_server, tmp_path):
    server = judge_server(videorefer_responder)
    records = [
        record("0", "prediction A", "The red circle moves left."),
        record("1", "prediction B", "The blue square moves up."),
        record("2", "prediction C", "The green triangle stays."),
        record("3", None, error="video could not be decoded"),
    ]
    result = VideoReferBenchD().score(records, options_for(server.url, tmp_path / "run"))
    # Each dimension over the replies that gave it: SC (5+3)/2, AD (4+2)/2, TD 3/1, HD (2.5+4)/2; mean of the four.
    assert result["subject_correspondence"] == pytest.approx(4.0)
    assert result["appearance_description"] == pytest.approx(3.0)
    assert result["temporal_description"] == pytest.approx(3.0)
    assert result["hallucination_detection"] == pytest.approx(3.25)
    assert result["average"] == pytest.approx(13.25 / 4)
    assert (result["items"], result["scored"], result["errors"]) == (4, 2, 1)
    assert (result["unparsed"], result["incomplete"]) == (1, 1)
    assert len(server.bodies) == 3
    first = next(b for b in server.bodies if "prediction A" in user_text(b))
    assert system_text(first) == VIDEOREFER_D_SYSTEM_PROMPT
    assert user_text(first) == "##Correct answer: The red circle moves left.\n##Predicted answer: prediction A\n"


# ---------------------------------------------------------------------------------------------------------------------
# Ferret-Bench referring reasoning
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def ferret_data(tmp_path) -> Path:
    folder = tmp_path / "ferret-bench"
    questions, side = [], {"question": [], "context": [], "answer": []}
    for qid in (0, 1, 2):
        image = f"{qid:012d}.jpg"
        save_scene_image(folder / "train2017" / image, seed=20 + qid)
        box = [10.0 + qid, 20.0, 30.0, 40.0]
        polygon = [[box[0], box[1], box[0] + box[2], box[1], box[0] + box[2], box[1] + box[3], box[0], box[1] + box[3]]]
        questions.append(
            {
                "question_id": qid,
                "image": image,
                "category": "reason",
                "text": f"What is the purpose of the object <region> number {qid}?",
                "annotation": {"bbox": box, "segmentation": polygon},
            }
        )
        common = {"question_id": qid, "image": image, "category": "refer_reason"}
        side["question"].append({**common, "text": f"What is the purpose of the object [0.1, 0.2, 0.3, 0.4] {qid}?"})
        side["context"].append({**common, "text": f"Objects:\nObject 0 : shape {qid} at [0.1, 0.2, 0.3, 0.4]."})
        side["answer"].append({**common, "text": f"The object [0.100, 0.200, 0.300, 0.400] is shape {qid}."})
    (folder / "box_refer_reason.json").write_text(json.dumps(questions))
    (folder / "refer_reason").mkdir()
    for name, rows in side.items():
        (folder / "refer_reason" / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def test_ferret_load_gives_the_official_prompt_and_regions(ferret_data):
    items = FerretBenchReasoning().load(ferret_data)
    assert [item.id for item in items] == ["0", "1", "2"]
    assert items[1].question == "What is the purpose of the object <region> number 1?"
    assert items[1].regions == [{"polygons": [[11.0, 20.0, 41.0, 20.0, 41.0, 60.0, 11.0, 60.0]]}]
    assert items[1].image == str(ferret_data / "train2017" / "000000000001.jpg")
    assert items[1].reference == "The object is shape 1."  # the box coordinates are cut
    assert items[1].meta["judge_question"] == "What is the purpose of the object [0.1, 0.2, 0.3, 0.4] 1?"
    assert items[1].meta["context"].startswith("Objects:\nObject 0 : shape 1")
    lite = FerretBenchReasoning(lite=True).load(ferret_data)
    assert lite[1].question == "There is 1 region in the image: <region> What is the purpose of the object  number 1?"


def ferret_responder(body: dict) -> str:
    text = user_text(body)
    answer = text.split("[Assistant 1]\n", 1)[1].split("\n", 1)[0]
    return {"answer zero": "8 10\nAssistant 2 is more precise.", "answer one": "6, 8\nclose"}.get(
        answer, "Assistant 1 is good but Assistant 2 is better."
    )


def test_ferret_scores_as_computed_by_hand(ferret_data, judge_server, tmp_path):
    server = judge_server(ferret_responder)
    items = FerretBenchReasoning().load(ferret_data)
    predictions = ["answer zero", "answer one", "answer two"]
    records = [record(i.id, p, i.reference, i.meta) for i, p in zip(items, predictions)]
    records.append(record("3", None, error="bad image"))
    result = FerretBenchReasoning().score(records, options_for(server.url, tmp_path / "run"))
    # Reviews (8, 10) and (6, 8); the third is unreadable. Mean model 7 / mean reference 9 x 100.
    assert result["score"] == pytest.approx(700 / 9)
    assert (result["model_mean"], result["reference_mean"]) == (pytest.approx(7.0), pytest.approx(9.0))
    assert (result["items"], result["scored"], result["errors"], result["unparsed"]) == (4, 2, 1, 1)
    body = next(b for b in server.bodies if "answer zero" in user_text(b))
    assert system_text(body) == FERRET_SYSTEM_PROMPT
    assert user_text(body) == (
        "[Context]\nObjects:\nObject 0 : shape 0 at [0.1, 0.2, 0.3, 0.4].\n\n"
        "[Question]\nWhat is the purpose of the object [0.1, 0.2, 0.3, 0.4] 0?\n\n"
        "[Assistant 1]\nanswer zero\n\n[End of Assistant 1]\n\n"
        "[Assistant 2]\nThe object is shape 0.\n\n[End of Assistant 2]\n\n"
        f"[System]\n{FERRET_REVIEW_RULE}\n\n"
    )


# ---------------------------------------------------------------------------------------------------------------------
# Ref-L4: CLAIR and shortening
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def ref_l4_data(tmp_path) -> Path:
    folder = tmp_path / "Ref-L4"
    rows = []
    for index, file_name in enumerate(["objects365/a.png", "coco/b.png", "objects365/c.png"]):
        save_scene_image(folder / "images" / file_name, seed=30 + index)
        rows.append(
            {
                "id": 500 + index,
                "file_name": file_name,
                "height": 224,
                "width": 224,
                "caption": f"caption {index}: a small shape.",
                "bbox": [10.7, 20.2, 30.9, 40.5],
            }
        )
    (folder / "ref-l4-val.json").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def test_ref_l4_clair_load_gives_the_official_prompt_and_regions(ref_l4_data):
    items = RefL4Clair().load(ref_l4_data)
    assert [item.id for item in items] == ["500", "502"]  # only the Objects365 part
    assert all(item.question == REF_L4_DETAIL_QUESTION for item in items)
    assert items[0].regions == [[10, 20, 40, 60]]  # int(x), int(y), int(x) + int(w), int(y) + int(h)
    assert items[0].image == str(ref_l4_data / "images" / "objects365" / "a.png")
    assert items[1].reference == ["caption 2: a small shape."]


def clair_responder(body: dict) -> str:
    text = user_text(body)
    if "- description one\n" in text:
        return 'Sure. {"score": 80, "reason": "same object"}'
    if "- description two\n" in text:
        return "Score: 0.45 - partly the same."
    return "I cannot tell."


def test_ref_l4_clair_scores_as_computed_by_hand(judge_server, tmp_path):
    server = judge_server(clair_responder)
    records = [
        record("1", "description one", ["a red circle"]),
        record("2", "description two", ["a blue square"]),
        record("3", "description three", ["a green triangle"]),
        record("4", None, ["x"], error="timeout"),
    ]
    result = RefL4Clair().score(records, options_for(server.url, tmp_path / "run"))
    # 80 from the JSON; 0.45 read as a fraction -> 45; the third unreadable. Mean of 0.80 and 0.45, in percent.
    assert result["clair"] == pytest.approx(62.5)
    assert (result["items"], result["scored"], result["errors"], result["unparsed"]) == (4, 2, 1, 1)
    body = next(b for b in server.bodies if "description one" in user_text(b))
    assert user_text(body) == CLAIR_PROMPT.format(candidates="- description one\n", references="- a red circle\n")


def test_ref_l4_shortening_asks_only_for_long_predictions(judge_server, tmp_path):
    server = judge_server(lambda body: "  a big red circle \n")
    records = [
        record("1", "a red circle"),
        record("2", "a very big red circle on a grey background"),
        record("3", None, error="bad box"),
    ]
    shortened, info = shorten_ref_l4_predictions(records, options_for(server.url, tmp_path / "run"))
    assert len(server.bodies) == 1
    assert system_text(server.bodies[0]) == REF_L4_SHORTEN_PROMPT
    assert user_text(server.bodies[0]) == "a very big red circle on a grey background"
    assert [r["prediction"] for r in shortened] == ["a red circle", "a big red circle", None]
    assert shortened[1]["prediction_original"] == records[1]["prediction"] and shortened[1]["shortened"]
    assert not shortened[0]["shortened"] and shortened[2] is records[2]
    assert info["shortened"] == 1 and info["judge"]["model"] == "judge-llm"


# ---------------------------------------------------------------------------------------------------------------------
# The judge client
# ---------------------------------------------------------------------------------------------------------------------


def test_dead_endpoint_is_a_clear_error_naming_the_url(dlc_data, tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1"
    items = DLCBench().load(dlc_data)
    options = options_for(url, tmp_path / "run", judge_max_attempts=1, judge_timeout=2)
    with pytest.raises(JudgeError, match=re.escape(url)) as raised:
        DLCBench().score(dlc_records(items), options)
    assert isinstance(raised.value, ValueError)  # the CLI reports ValueErrors in one line
    judge = Judge(url, "judge-llm", max_attempts=3, backoff=0.01, timeout=2)
    with pytest.raises(JudgeError, match=r"did not answer after 3 attempt\(s\): APIConnectionError"):
        judge.chat(JudgeRequest([user_message("hello")]))
    assert judge.requests_sent == 3


def test_server_errors_are_retried_and_refusals_are_not(judge_server):
    answers = iter([(503, '{"error": {"message": "overloaded"}}'), "fine"])
    server = judge_server(lambda body: next(answers))
    judge = Judge(server.url, "judge-llm", backoff=0.01)
    assert judge.chat(JudgeRequest([user_message("hello")])) == "fine"
    assert len(server.bodies) == 2

    refusing = judge_server(lambda body: (401, '{"error": {"message": "invalid key"}}'))
    judge = Judge(refusing.url, "judge-llm", backoff=0.01)
    with pytest.raises(JudgeError, match=rf"{re.escape(refusing.url)} refused the request \(HTTP 401\)"):
        judge.chat(JudgeRequest([user_message("hello")]))
    assert len(refusing.bodies) == 1


def test_key_comes_from_the_named_variable_or_is_a_placeholder(judge_server, monkeypatch):
    server = judge_server(lambda body: "ok")
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-test")
    Judge(server.url, "judge-llm", api_key_env="MY_JUDGE_KEY").chat(JudgeRequest([user_message("a")]))
    monkeypatch.delenv("MY_JUDGE_KEY")
    Judge(server.url, "judge-llm", api_key_env="MY_JUDGE_KEY").chat(JudgeRequest([user_message("b")]))
    authorization = [{k.lower(): v for k, v in h.items()}["authorization"] for h in server.headers]
    assert authorization == ["Bearer sk-test", "Bearer EMPTY"]


def test_missing_judge_settings_are_named():
    with pytest.raises(JudgeError, match="--judge-base-url"):
        DLCBench().score([], ScoreOptions())
    with pytest.raises(JudgeError, match="'localhost:8000' is not an http"):
        DLCBench().score([], ScoreOptions(judge_base_url="localhost:8000", judge_model="m"))
    with pytest.raises(JudgeError, match="--judge-model"):
        DLCBench().score([], ScoreOptions(judge_base_url="http://127.0.0.1:1/v1"))


# ---------------------------------------------------------------------------------------------------------------------
# Registry and bad files
# ---------------------------------------------------------------------------------------------------------------------


def test_registry_lists_each_judged_benchmark_once():
    names = [benchmark.name for benchmark in JUDGED_BENCHMARKS]
    assert len(set(names)) == len(names) == 6
    assert all(benchmark.needs_judge and benchmark.description for benchmark in JUDGED_BENCHMARKS)
    assert published_numbers("dlc-bench")["PixelRefer-7B"]["avg"] == 68.3
    assert published_numbers("videorefer-d")["PixelRefer-7B"]["average"] == 3.70


@pytest.mark.parametrize(
    "benchmark, fixture, file",
    [
        (DLCBench(), "dlc_data", "qa.json"),
        (VideoReferBenchD(), "videorefer_data", "VideoRefer-Bench-D.json"),
        (FerretBenchReasoning(), "ferret_data", "box_refer_reason.json"),
        (FerretBenchReasoning(), "ferret_data", "refer_reason/context.jsonl"),
        (RefL4Clair(), "ref_l4_data", "ref-l4-val.json"),
    ],
)
def test_malformed_annotation_json_names_the_file(benchmark, fixture, file, request):
    folder = request.getfixturevalue(fixture)
    (folder / file).write_text('{"truncated": [')
    with pytest.raises(EvalDataError, match=re.escape(str(folder / file))):
        benchmark.load(folder)


def test_bad_entries_name_the_file_and_item(dlc_data, videorefer_data):
    qa = json.loads((dlc_data / "qa.json").read_text())
    qa["102"][1]["type"] = "sideways"
    (dlc_data / "qa.json").write_text(json.dumps(qa))
    with pytest.raises(EvalDataError, match=r"qa\.json, item 102 question 1: 'type' must be positive or negative"):
        DLCBench().load(dlc_data)

    entries = json.loads((videorefer_data / "VideoRefer-Bench-D.json").read_text())
    entries[1]["frame_idx"] = "3"
    (videorefer_data / "VideoRefer-Bench-D.json").write_text(json.dumps(entries))
    with pytest.raises(EvalDataError, match=r"item 1: 'frame_idx' '3' is not one of the annotated frames"):
        VideoReferBenchD().load(videorefer_data)
    (videorefer_data / "Panda-70M-part" / "clip0.mp4").unlink()
    with pytest.raises(EvalDataError, match=r"item 0: media not found"):
        VideoReferBenchD(lite=True).load(videorefer_data)


def test_a_record_without_its_reference_names_the_item(judge_server, tmp_path):
    server = judge_server(lambda body: "Yes")
    with pytest.raises(EvalDataError, match=r"item 7: prediction record needs the item's reference"):
        DLCBench().score([record("7", "A red circle.")], options_for(server.url, tmp_path / "run"))
    with pytest.raises(EvalDataError, match=r"item 8: prediction record needs .* 'context'"):
        FerretBenchReasoning().score([record("8", "answer", "reference")], options_for(server.url, tmp_path / "run"))
    assert server.bodies == []  # checked before anything is sent


# ---------------------------------------------------------------------------------------------------------------------
# Through `pixelrefer eval`
# ---------------------------------------------------------------------------------------------------------------------


def test_pixelrefer_eval_runs_a_judged_benchmark_end_to_end(dlc_data, judge_server, tmp_path, capsys):
    """The command answers with the model, asks the judge over HTTP, and records the judge; a rerun resumes from the
    predictions and the judge cache (no new request), and a dead judge is one line naming its URL."""
    server = judge_server(dlc_responder)
    run_dir = tmp_path / "run"
    arguments = ["eval", "dlc-bench", "--model", "tiny-random", "--data", str(dlc_data), "--out", str(run_dir)]
    arguments += ["--max-new-tokens", "3", "--judge-model", "judge-llm", "--judge-timeout", "10"]
    assert cli_main([*arguments, "--judge-base-url", server.url]) == 0
    results = json.loads((run_dir / "results.json").read_text())
    assert results["benchmark"] == "dlc-bench" and results["items"] == 3
    assert {"avg_pos", "avg_neg", "avg"} <= set(results["metrics"])
    judge = results["metrics"]["judge"] if "judge" in results["metrics"] else results["judge"]
    assert judge["base_url"] == server.url and judge["model"] == "judge-llm"
    predictions = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert sorted(record["id"] for record in predictions) == ["101", "102", "201"]
    sent = len(server.bodies)
    assert sent > 0
    assert cli_main([*arguments, "--judge-base-url", server.url]) == 0
    assert len(server.bodies) == sent  # everything came from predictions.jsonl and the judge cache
    capsys.readouterr()
    dead = f"http://127.0.0.1:{free_port()}/v1"
    status = cli_main(["eval-score", str(run_dir), "--judge-base-url", dead, "--judge-model", "other-judge"])
    err = capsys.readouterr().err
    assert status != 0 and dead in err and "Traceback" not in err
