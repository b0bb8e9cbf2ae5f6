"""The Ray Serve deployment (`pixelrefer_hf.serving`) on a local 2-CPU Ray cluster, with the bundled demo checkpoint:
answers equal the pipeline's, concurrent requests are batched into fewer `generate` calls without mixing answers, a
bad request fails alone, and a killed replica is replaced while clients retry."""

import base64
import io
import json
import threading
import time

import numpy as np
import pytest
import ray
import requests
from PIL import Image
from ray_cluster import free_port, local_cluster

from pixelrefer_hf import cli
from pixelrefer_hf.cli import load_region_qa_pipeline

SHAPES = "examples/assets/shapes.png"
# Boxes of examples/assets/shapes.png (README "Run"), and the questions the demo model knows.
BOXES = [[40, 40, 90, 90], [30, 120, 90, 180], [140, 30, 184, 74], [100, 170, 136, 206]]
QUESTIONS = ["What is <region>?", "What color is <region>?", "What shape is <region>?"]
# Bounded waits: generous, so that a busy 2-core machine never fails a test; never asserted as timings.
REQUEST_TIMEOUT_S = 120
RETRY_DEADLINE_S = 180


@pytest.fixture(scope="module")
def image_bytes() -> bytes:
    with open(SHAPES, "rb") as file:
        return file.read()


@pytest.fixture(scope="module")
def pipe():
    return load_region_qa_pipeline("demo")


@pytest.fixture(scope="module")
def url():
    from ray import serve

    from pixelrefer_hf.serving import build_app

    with local_cluster():
        port = free_port()
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            # One replica, so that its counters see every request; half a CPU, so that the cluster keeps room.
            application = build_app(
                "demo", replicas=1, num_cpus=0.5, max_batch_size=8, batch_wait_timeout=0.2, health_check_period_s=1
            )
            serve.run(application, name="pixelrefer-test", route_prefix="/")
            yield f"http://127.0.0.1:{port}"
        finally:
            serve.shutdown()


def body(image_bytes: bytes, box_or_regions, question: str, **extra) -> dict:
    # A bare box [x0, y0, x1, y1] is the one region; anything else is the list of regions.
    is_box = len(box_or_regions) == 4 and all(isinstance(v, int) for v in box_or_regions)
    regions = [box_or_regions] if is_box else box_or_regions
    return {"image": base64.b64encode(image_bytes).decode(), "regions": regions, "question": question, **extra}


def post(url: str, payload: dict) -> requests.Response:
    return requests.post(f"{url}/v1/region-qa", json=payload, timeout=REQUEST_TIMEOUT_S)


def expected(pipe, box, question: str) -> str:
    return pipe(image=SHAPES, regions=[box], question=question, max_new_tokens=128)["answer"]


def metrics(url: str) -> dict:
    response = requests.get(f"{url}/metrics", timeout=REQUEST_TIMEOUT_S)
    assert response.status_code == 200, response.text
    return response.json()


def test_health_and_readiness(url):
    assert requests.get(f"{url}/healthz", timeout=REQUEST_TIMEOUT_S).json() == {"status": "ok"}
    ready = requests.get(f"{url}/readyz", timeout=REQUEST_TIMEOUT_S).json()
    assert ready == {"ready": True, "model": "demo", "variant": "pixelrefer"}


def test_single_requests_answer_like_the_pipeline(url, pipe, image_bytes):
    for box, question in [(BOXES[0], QUESTIONS[0]), (BOXES[2], QUESTIONS[1]), (BOXES[3], QUESTIONS[2])]:
        response = post(url, body(image_bytes, box, question))
        assert response.status_code == 200, response.text
        assert response.json() == {"answer": expected(pipe, box, question)}
    # The README's example answer, through the HTTP API.
    assert post(url, body(image_bytes, BOXES[0], QUESTIONS[0])).json() == {"answer": "a red square"}
    # Two regions in one question, and a polygon region.
    pair = pipe(image=SHAPES, regions=BOXES[:2], question="Is <region> larger than <region>?")["answer"]
    assert post(url, body(image_bytes, BOXES[:2], "Is <region> larger than <region>?")).json() == {"answer": pair}
    polygon = {"polygons": [[40, 40, 90, 40, 90, 90, 40, 90]]}
    polygon_answer = pipe(image=SHAPES, regions=[polygon], question=QUESTIONS[0])["answer"]
    assert post(url, body(image_bytes, [polygon], QUESTIONS[0])).json() == {"answer": polygon_answer}
    # A data URL, a shorter answer, and a multipart upload.
    data_url = "data:image/png;base64," + base64.b64encode(image_bytes).decode()
    short = pipe(image=SHAPES, regions=[BOXES[0]], question=QUESTIONS[0], max_new_tokens=1)["answer"]
    answer = post(url, {**body(image_bytes, BOXES[0], QUESTIONS[0]), "image": data_url, "max_new_tokens": 1})
    assert answer.json() == {"answer": short}
    form = requests.post(
        f"{url}/v1/region-qa",
        files={"image": ("shapes.png", image_bytes, "image/png")},
        data={"regions": json.dumps([BOXES[1]]), "question": QUESTIONS[0]},
        timeout=REQUEST_TIMEOUT_S,
    )
    assert form.status_code == 200, form.text
    assert form.json() == {"answer": expected(pipe, BOXES[1], QUESTIONS[0])}
    # A JPEG, whose base64 starts like a path ("/9j/"): read as the bytes it is.
    jpeg = io.BytesIO()
    Image.open(SHAPES).convert("RGB").save(jpeg, format="JPEG", quality=95)
    assert base64.b64encode(jpeg.getvalue()).startswith(b"/9j/")
    jpeg_answer = pipe(image=Image.open(io.BytesIO(jpeg.getvalue())), regions=[BOXES[0]], question=QUESTIONS[0])
    assert post(url, body(jpeg.getvalue(), BOXES[0], QUESTIONS[0])).json() == {"answer": jpeg_answer["answer"]}


def test_streaming_sends_the_answer_as_server_sent_events(url, pipe, image_bytes):
    response = requests.post(
        f"{url}/v1/region-qa",
        json=body(image_bytes, BOXES[0], QUESTIONS[0], stream=True),
        stream=True,
        timeout=REQUEST_TIMEOUT_S,
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = []
    for block in response.text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((lines["event"], json.loads(lines["data"])))
    kinds = [kind for kind, _ in events]
    assert kinds[-1] == "answer" and set(kinds[:-1]) == {"token"} and len(kinds) > 2
    answer = expected(pipe, BOXES[0], QUESTIONS[0])
    assert events[-1][1] == {"answer": answer}
    assert "".join(data["text"] for _, data in events[:-1]).strip() == answer


def test_concurrent_requests_are_batched_and_never_mixed(url, pipe, image_bytes):
    cases = [(box, question) for box in BOXES for question in QUESTIONS]
    answers = {
        (k, q): expected(pipe, box, question) for k, box in enumerate(BOXES) for q, question in enumerate(QUESTIONS)
    }
    before = metrics(url)
    threads, requests_per_thread = 8, 4
    start = threading.Barrier(threads)
    results: dict[tuple[int, int], tuple[tuple[int, int], requests.Response]] = {}

    def client(thread: int) -> None:
        start.wait()
        for r in range(requests_per_thread):
            # Every request its own (box, question), so that an answer handed to the wrong request shows.
            case = (thread * requests_per_thread + r) % len(cases)
            k, q = divmod(case, len(QUESTIONS))
            results[(thread, r)] = ((k, q), post(url, body(image_bytes, BOXES[k], QUESTIONS[q])))

    workers = [threading.Thread(target=client, args=(t,)) for t in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=RETRY_DEADLINE_S)
    assert len(results) == threads * requests_per_thread, "some client requests did not finish"
    for (k, q), response in results.values():
        assert response.status_code == 200, response.text
        assert response.json() == {"answer": answers[(k, q)]}
    after = metrics(url)
    assert after["replica"] == before["replica"]
    batched = after["batches"] - before["batches"]
    calls = (after["generate_calls"] + after["generate_sharing_image_calls"]) - (
        before["generate_calls"] + before["generate_sharing_image_calls"]
    )
    sizes = {int(size): count - before["batch_sizes"].get(size, 0) for size, count in after["batch_sizes"].items()}
    assert sum(size * count for size, count in sizes.items()) == 32
    # Requests that arrived together went into one pipeline call: fewer batches and generate calls than requests.
    assert batched < 32 and calls < 32, (batched, calls, sizes)
    assert max(size for size, count in sizes.items() if count > 0) > 1
    # Questions about the one picture of a batch share it (`generate_sharing_image`).
    assert after["generate_sharing_image_calls"] > before["generate_sharing_image_calls"]


def _pipeline_error(pipe, item: dict) -> str:
    """The pipeline's message for a bad item of a list (`skip_bad_items`), without its "item 0: " prefix: a request
    is one item."""
    (result,) = pipe([item], skip_bad_items=True)
    assert result["error"].startswith("item 0: ")
    return result["error"].removeprefix("item 0: ")


def test_a_bad_request_fails_alone_with_the_pipelines_message(url, pipe, image_bytes):
    good = body(image_bytes, BOXES[0], QUESTIONS[0])
    thin = io.BytesIO()
    Image.fromarray(np.full((1, 300, 3), 128, dtype=np.uint8)).save(thin, format="PNG")
    bad_cases = {
        # Refused while the request is checked, before batching:
        "placeholders": (body(image_bytes, BOXES[0], "What is this?"), {"question": "What is this?"}),
        "outside": (body(image_bytes, [500, 500, 600, 600], QUESTIONS[0]), {"regions": [[500, 500, 600, 600]]}),
        # Refused by the processor inside the batch (an aspect ratio the vision tower cannot take):
        "thin": (
            body(thin.getvalue(), [0, 0, 300, 1], QUESTIONS[0]),
            {"image": np.full((1, 300, 3), 128, dtype=np.uint8), "regions": [[0, 0, 300, 1]]},
        ),
    }
    messages = {}
    for name, (_, item) in bad_cases.items():
        messages[name] = _pipeline_error(
            pipe, {"image": SHAPES, "regions": [BOXES[0]], "question": QUESTIONS[0], **item}
        )
    assert "placeholder" in messages["placeholders"] and "region 0" in messages["outside"]
    assert "aspect ratio" in messages["thin"]

    payloads = (
        [("good", good)] * 3 + [(name, payload) for name, (payload, _) in bad_cases.items()] + [("good", good)] * 3
    )
    responses: dict[int, requests.Response] = {}
    start = threading.Barrier(len(payloads))

    def client(index: int, payload: dict) -> None:
        start.wait()
        responses[index] = post(url, payload)

    workers = [threading.Thread(target=client, args=(i, payload)) for i, (_, payload) in enumerate(payloads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=RETRY_DEADLINE_S)
    assert len(responses) == len(payloads)
    for index, (name, _) in enumerate(payloads):
        response = responses[index]
        if name == "good":
            assert response.status_code == 200, response.text
            assert response.json() == {"answer": "a red square"}
        else:
            assert response.status_code == 400, response.text
            assert response.json() == {"error": messages[name]}


@pytest.mark.parametrize(
    "change, status, words",
    [
        ({"image": "/etc/passwd"}, 400, "server-side paths and URLs are refused"),
        ({"image": "http://127.0.0.1/picture.png"}, 400, "server-side paths and URLs are refused"),
        ({"image": "file:picture.png"}, 400, "server-side paths and URLs are refused"),
        ({"image": "not base64!"}, 400, "field 'image' is not valid base64"),
        ({"image": base64.b64encode(b"not an image").decode()}, 400, "image: cannot read image"),
        ({"image": 7}, 400, "field 'image' must be the image file's bytes"),
        ({"image": None}, 400, "field 'image' is required"),
        ({"colour": "red"}, 400, "unknown fields ['colour']"),
        ({"max_new_tokens": 0}, 400, "field 'max_new_tokens' must be between 1 and"),
        ({"stream": "yes"}, 400, "field 'stream' must be true or false"),
        ({"regions": "[1, 2]"}, 400, "'regions' must be a list"),
    ],
)
def test_request_errors_name_the_field(url, image_bytes, change, status, words):
    response = post(url, {**body(image_bytes, BOXES[0], QUESTIONS[0]), **change})
    assert response.status_code == status, response.text
    assert words in response.json()["error"]


def test_bodies_that_are_not_requests(url):
    not_json = requests.post(f"{url}/v1/region-qa", data=b"{", headers={"content-type": "application/json"})
    assert not_json.status_code == 400 and "not JSON" in not_json.json()["error"]
    text = requests.post(f"{url}/v1/region-qa", data=b"hello", headers={"content-type": "text/plain"})
    assert text.status_code == 415
    fields = {"image": (None, "/etc/passwd"), "question": (None, "What is <region>?")}
    form = requests.post(f"{url}/v1/region-qa", files=fields)  # multipart, the image a text field: refused
    assert form.status_code == 400 and "uploaded file" in form.json()["error"]
    urlencoded = requests.post(f"{url}/v1/region-qa", data={"image": "/etc/passwd", "question": "What is <region>?"})
    assert urlencoded.status_code == 415


def test_a_killed_replica_is_replaced_and_retrying_clients_get_their_own_answers(url, pipe, image_bytes):
    cases = [(k, q) for k in range(len(BOXES)) for q in range(len(QUESTIONS))]
    answers = {(k, q): expected(pipe, BOXES[k], QUESTIONS[q]) for k, q in cases}
    victim = metrics(url)["replica"]
    answered_some, killed = threading.Event(), threading.Event()
    results: dict[tuple[int, int], tuple[tuple[int, int], dict]] = {}
    retries = []

    def client(thread: int) -> None:
        for r in range(4):
            k, q = cases[(thread * 4 + r) % len(cases)]
            deadline = time.monotonic() + RETRY_DEADLINE_S
            while True:
                try:
                    response = post(url, body(image_bytes, BOXES[k], QUESTIONS[q]))
                    if response.status_code == 200:
                        break
                    # 5xx while the replica is gone; 4xx would be a bug and fails below.
                    if response.status_code < 500:
                        break
                except requests.RequestException:
                    pass
                retries.append(thread)
                assert time.monotonic() < deadline, "no replica answered within the retry deadline"
                time.sleep(0.5)
            results[(thread, r)] = ((k, q), response)
            answered_some.set()
            if thread % 2 == 0:
                # Half the clients send the rest of their requests only once the replica is dead.
                assert killed.wait(RETRY_DEADLINE_S), "the replica was never killed"

    workers = [threading.Thread(target=client, args=(t,)) for t in range(8)]
    for worker in workers:
        worker.start()
    assert answered_some.wait(RETRY_DEADLINE_S), "no answer before the kill"
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    killed.set()
    for worker in workers:
        worker.join(timeout=2 * RETRY_DEADLINE_S)
    assert len(results) == 32, "some clients did not finish"
    for (k, q), response in results.values():
        assert response.status_code == 200, response.text
        assert response.json() == {"answer": answers[(k, q)]}
    # Serve started another replica in the killed one's place.
    assert metrics(url)["replica"] != victim


def test_build_app_checks_its_arguments():
    from pixelrefer_hf.serving import build_app

    with pytest.raises(ValueError, match="replicas must be a positive integer"):
        build_app("demo", replicas=0)
    with pytest.raises(ValueError, match="batch_wait_timeout"):
        build_app("demo", batch_wait_timeout=-1)


def test_serve_command_help_and_missing_extra(monkeypatch, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["serve", "--help"])
    assert done.value.code == 0
    help_text = capsys.readouterr().out
    for option in ("--replicas", "--max-batch-size", "--batch-wait-timeout", "--host", "--port", "--model"):
        assert option in help_text
    # Without Ray the commands name the extra to install (the rest of the package never imports Ray).
    monkeypatch.setitem(__import__("sys").modules, "ray", None)
    assert cli.main(["serve", "--model", "demo"]) == 2
    assert 'pip install "pixelrefer-hf[serve]"' in capsys.readouterr().err
    assert cli.main(["batch", "--data", "x", "--out", "y"]) == 2
    assert 'pip install "pixelrefer-hf[serve]"' in capsys.readouterr().err
