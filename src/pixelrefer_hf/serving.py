"""Ray Serve deployment of `pipeline("region-qa")`: an HTTP JSON API with replicas and dynamic batching.

    pixelrefer serve --model path/to/checkpoint --replicas 2 --max-batch-size 8 --port 8000

or from Python (`serve run pixelrefer_hf.serving:app_builder model=demo` works too):

    >>> from ray import serve  # doctest: +SKIP
    >>> from pixelrefer_hf.serving import build_app  # doctest: +SKIP
    >>> serve.run(build_app(model="demo", replicas=2), route_prefix="/")  # doctest: +SKIP

Endpoints (see README "Serving and batch jobs"):

* `POST /v1/region-qa`: a JSON body `{"image": base64, "regions": [...], "question": "... <region> ...",
  "max_new_tokens": int, "stream": bool}` or the same fields as a multipart form (`image` a file, `regions` JSON
  text). The image travels as its bytes: strings that look like server paths or URLs are refused, so a client cannot
  make the server read its files or the network. Regions are what the pipeline takes (boxes, COCO RLE, polygons,
  points when the server has a SAM checkpoint). The answer is `{"answer": str}`; with `"stream": true` it comes as
  server-sent events (`token` events, then one `answer` or `error` event). A bad request gets a 4xx with
  `{"error": message}`, the pipeline's own message.
* `GET /healthz` (the replica is up), `GET /readyz` (its model is loaded), `GET /metrics` (this replica's counters:
  requests, batches, generate calls).

Each request is parsed and validated on its own (the pipeline's `preprocess`) before it joins a batch, so a bad one
fails alone. Requests that arrive together are answered by one `@serve.batch` call of the pipeline: questions about
the same picture share its encoding (`generate_sharing_image`), the others go in one left-padded `generate`; each
request gets its own item's answer (the pipeline keeps items apart). Streaming requests skip the batching (one
`generate` with a `TextIteratorStreamer` each).

Not remote code. Importing this module needs the `serve` extra (`pip install "pixelrefer-hf[serve]"`).
"""

import asyncio
import base64
import binascii
import json
import os
import re
import threading
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from .ray_utils import SERVE_EXTRA_HINT

try:
    import ray
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from ray import serve
except ImportError as _error:  # pragma: no cover - exercised by the CLI test without ray
    raise ImportError(f"pixelrefer_hf.serving needs Ray Serve: {SERVE_EXTRA_HINT}") from _error

API_PATH = "/v1/region-qa"
REQUEST_FIELDS = ("image", "regions", "question", "max_new_tokens", "stream")
# What an image string must not look like: a path or a URL (only the image's own bytes are accepted).
_PATH_OR_URL = re.compile(r"^(?:[a-zA-Z][a-zA-Z0-9+.-]*://|file:|/|\./|\.\./|~|[a-zA-Z]:[\\/])")
_DATA_URL = re.compile(r"^data:[\w.+-]+/[\w.+-]+;base64,", re.IGNORECASE)
_ITEM_PREFIX = re.compile(r"^item \d+: ")


class RequestError(ValueError):
    """A request the server refuses; `status` is its HTTP status (4xx)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class ServeOptions:
    """What every replica needs to build its pipeline and check requests."""

    model: str = "demo"
    max_batch_size: int = 8
    batch_wait_timeout: float = 0.05
    # The answer length when a request gives none, and the largest a request may ask for.
    max_new_tokens: int = 128
    max_new_tokens_limit: int = 1024
    sam_model: str | None = None
    box_to_mask: str = "box"
    device: str | None = None
    dtype: str = "auto"
    # Request bodies above this size get a 413 before they are read.
    max_request_bytes: int = 32 * 1024 * 1024

    def preprocess_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"box_to_mask": self.box_to_mask}
        if self.sam_model is not None:
            options["sam_model"] = self.sam_model
        return options


def decode_image_field(value: Any) -> bytes:
    """The bytes of a JSON `image` field: base64 text, optionally as a `data:` URL. Anything that looks like a path
    or a URL is refused: the server only reads what the client sends."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if not isinstance(value, str):
        raise RequestError(f"field 'image' must be the image file's bytes, base64-encoded, got {type(value).__name__}")
    text = value.strip()
    is_data_url = bool(_DATA_URL.match(text))
    if is_data_url:
        text = text[text.index(",") + 1 :]
    try:
        # Decoded before the path check: base64 may itself start like a path (a JPEG's is "/9j/..."). Nothing is
        # ever opened, so text that is both is read as bytes and refused by the image decoder if it is no image.
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        if not is_data_url and _PATH_OR_URL.match(text):
            raise RequestError(
                "field 'image': server-side paths and URLs are refused; send the image file's bytes (base64 in "
                "JSON, or a multipart file)"
            ) from error
        raise RequestError(f"field 'image' is not valid base64 ({error})") from error
    if not data:
        raise RequestError("field 'image' is empty")
    return data


def parse_request_fields(fields: dict[str, Any], options: ServeOptions, max_pixels: int | None) -> tuple[dict, dict]:
    """A request's fields -> `(pipeline item, request options)`. The image is decoded here (`media_io.load_image` on
    its bytes); regions and question are left for the pipeline to check, so that its messages are the API's."""
    from .media_io import load_image

    if not isinstance(fields, dict):
        raise RequestError(f"the body must be a JSON object with fields {list(REQUEST_FIELDS)}")
    unknown = sorted(set(fields) - set(REQUEST_FIELDS))
    if unknown:
        raise RequestError(f"unknown fields {unknown}; a request has {list(REQUEST_FIELDS)}")
    if "video" in fields:
        raise RequestError("videos are not served over HTTP; use `pixelrefer batch` or the pipeline")
    if fields.get("image") is None:
        raise RequestError("field 'image' is required (the image file's bytes, base64-encoded)")
    max_new_tokens = fields.get("max_new_tokens", options.max_new_tokens)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise RequestError(f"field 'max_new_tokens' must be an integer, got {max_new_tokens!r}")
    if not 1 <= max_new_tokens <= options.max_new_tokens_limit:
        raise RequestError(
            f"field 'max_new_tokens' must be between 1 and {options.max_new_tokens_limit}, got {max_new_tokens}"
        )
    stream = fields.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(f"field 'stream' must be true or false, got {stream!r}")
    try:
        image = load_image({"bytes": decode_image_field(fields["image"]), "path": None}, "image", max_pixels)
    except RequestError:
        raise
    except ValueError as error:
        raise RequestError(str(error)) from error
    item = {"image": image, "regions": fields.get("regions", []), "question": fields.get("question")}
    return item, {"max_new_tokens": max_new_tokens, "stream": stream}


async def read_request_fields(request: Request, max_request_bytes: int) -> dict[str, Any]:
    """The fields of a JSON or multipart request body, refusing bodies over `max_request_bytes` (413)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_request_bytes:
        raise RequestError(f"the request body is {int(length)} bytes, more than the limit of {max_request_bytes}", 413)
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        form = await request.form()
        fields: dict[str, Any] = {}
        for key, value in form.multi_items():
            if hasattr(value, "read"):  # an uploaded file
                fields[key] = await value.read()
            else:
                fields[key] = value
        if isinstance(fields.get("image"), str):
            # A form's text field is never the image: only an uploaded file is.
            raise RequestError("field 'image' must be an uploaded file in a multipart request")
        for key in ("regions", "max_new_tokens", "stream"):
            if isinstance(fields.get(key), str):
                try:
                    fields[key] = json.loads(fields[key])
                except json.JSONDecodeError as error:
                    raise RequestError(f"field {key!r} is not JSON ({error.msg})") from error
        return fields
    if content_type not in ("application/json", ""):
        raise RequestError(
            f"content type {content_type!r} is not accepted; send application/json or a multipart form", 415
        )
    body = await request.body()
    if len(body) > max_request_bytes:
        raise RequestError(f"the request body is {len(body)} bytes, more than the limit of {max_request_bytes}", 413)
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RequestError(f"the body is not JSON ({error})") from error


def _sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


@dataclass
class _Request:
    """One validated request on its way into a batch."""

    item: dict
    max_new_tokens: int


@dataclass
class _Counters:
    """A replica's counters (`GET /metrics`)."""

    requests: int = 0
    answered: int = 0
    refused: int = 0
    streams: int = 0
    batches: int = 0
    largest_batch: int = 0
    generate_calls: int = 0
    generate_sharing_image_calls: int = 0
    generated_rows: int = 0
    batch_sizes: Counter = field(default_factory=Counter)


app = FastAPI(title="PixelRefer region QA", description="Answers questions about regions of an image.")


@serve.deployment
@serve.ingress(app)
class RegionQAServer:
    """One replica: a region-qa pipeline, its batch queue and its counters."""

    def __init__(self, options: ServeOptions | dict):
        from .cli import load_region_qa_pipeline

        self.options = ServeOptions(**options) if isinstance(options, dict) else options
        self.pipe = load_region_qa_pipeline(self.options.model, self.options.device, self.options.dtype)
        self.max_pixels = getattr(self.pipe.processor.image_processor, "max_image_pixels", None)
        self.counters = _Counters()
        self._counters_lock = threading.Lock()
        # One model per replica: batches and streams take turns on it.
        self._model_lock = threading.Lock()
        self._count_generate_calls()
        self._answer_batch.set_max_batch_size(self.options.max_batch_size)
        self._answer_batch.set_batch_wait_timeout_s(self.options.batch_wait_timeout)

    def _count_generate_calls(self) -> None:
        """Wrap the model's two generate entry points so that `/metrics` reports how often they really ran."""
        model = self.pipe.model
        for name in ("generate", "generate_sharing_image"):
            original = getattr(model, name)

            def counted(*args, _original=original, _name=name, **kwargs):
                input_ids = kwargs.get("input_ids")
                with self._counters_lock:
                    setattr(self.counters, f"{_name}_calls", getattr(self.counters, f"{_name}_calls") + 1)
                    self.counters.generated_rows += int(input_ids.shape[0]) if input_ids is not None else 1
                return _original(*args, **kwargs)

            # An instance attribute: the pipeline calls `self.model.generate(...)`, which finds it first.
            object.__setattr__(model, name, counted)

    def check_health(self) -> None:
        """Serve's health check: the replica is unhealthy (and replaced) when it has no model."""
        if getattr(self, "pipe", None) is None:
            raise RuntimeError("the region-qa pipeline is not loaded")

    def _count(self, **increments: int) -> None:
        with self._counters_lock:
            for name, value in increments.items():
                setattr(self.counters, name, getattr(self.counters, name) + value)

    @app.get("/healthz")
    def healthz(self) -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz(self):
        if getattr(self, "pipe", None) is None:
            return JSONResponse({"ready": False}, status_code=503)
        return {"ready": True, "model": self.options.model, "variant": self.pipe.model.config.variant}

    @app.get("/metrics")
    def metrics(self) -> dict:
        with self._counters_lock:
            counters = asdict(self.counters)
        counters["batch_sizes"] = {str(size): count for size, count in sorted(self.counters.batch_sizes.items())}
        return {
            **counters,
            "replica": ray.get_runtime_context().get_actor_name(),
            "pid": os.getpid(),
            "max_batch_size": self.options.max_batch_size,
            "batch_wait_timeout": self.options.batch_wait_timeout,
        }

    @app.post(API_PATH)
    async def answer(self, request: Request):
        self._count(requests=1)
        try:
            fields = await read_request_fields(request, self.options.max_request_bytes)
            item, request_options = parse_request_fields(fields, self.options, self.max_pixels)
            # The pipeline's own checks (placeholders, regions, image size), for this request alone.
            await asyncio.to_thread(self._validate, item)
        except RequestError as error:
            self._count(refused=1)
            return JSONResponse({"error": str(error)}, status_code=error.status)
        except ValueError as error:
            self._count(refused=1)
            return JSONResponse({"error": str(error)}, status_code=400)
        if request_options["stream"]:
            self._count(streams=1)
            return StreamingResponse(
                self._stream(item, request_options["max_new_tokens"]), media_type="text/event-stream"
            )
        result = await self._answer_batch(_Request(item, request_options["max_new_tokens"]))
        if "error" in result:
            self._count(refused=1)
            return JSONResponse(result, status_code=400)
        self._count(answered=1)
        return result

    def _validate(self, item: dict) -> None:
        self.pipe.preprocess(item, **self.options.preprocess_options())

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def _answer_batch(self, requests: list[_Request]) -> list[dict]:
        """Answer the requests that arrived together: one pipeline call per answer length (usually one), each
        item answered on its own (a processor error fails only its request)."""
        with self._counters_lock:
            self.counters.batches += 1
            self.counters.largest_batch = max(self.counters.largest_batch, len(requests))
            self.counters.batch_sizes[len(requests)] += 1
        by_length: dict[int, list[int]] = {}
        for index, request in enumerate(requests):
            by_length.setdefault(request.max_new_tokens, []).append(index)
        results: list[dict] = [{} for _ in requests]
        for max_new_tokens, indices in by_length.items():
            items = [requests[index].item for index in indices]
            outputs = await asyncio.to_thread(self._run_pipeline, items, max_new_tokens)
            for index, output in zip(indices, outputs, strict=True):
                if "error" in output:
                    output = {"error": _ITEM_PREFIX.sub("", output["error"])}
                results[index] = output
        return results

    def _run_pipeline(self, items: list[dict], max_new_tokens: int, **generate_kwargs) -> list[dict]:
        with self._model_lock:
            return self.pipe(
                items,
                batch_size=len(items),
                skip_bad_items=True,
                max_new_tokens=max_new_tokens,
                **self.options.preprocess_options(),
                **generate_kwargs,
            )

    async def _stream(self, item: dict, max_new_tokens: int):
        """Server-sent events of one answer: `token` events as the text grows, then `answer` (or `error`)."""
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.pipe.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        outcome: dict[str, Any] = {}

        def run() -> None:
            try:
                outcome.update(self._run_pipeline([item], max_new_tokens, streamer=streamer)[0])
            except Exception as error:  # reported as an error event: the response has already started
                outcome["error"] = f"{type(error).__name__}: {error}"
            finally:
                # An item refused before generate never reaches the streamer's own end.
                streamer.end()

        task = asyncio.ensure_future(asyncio.to_thread(run))
        tokens = iter(streamer)
        while (text := await asyncio.to_thread(next, tokens, None)) is not None:
            if text:
                yield _sse("token", {"text": text})
        await task
        if "error" in outcome:
            self._count(refused=1)
            yield _sse("error", {"error": _ITEM_PREFIX.sub("", outcome["error"])})
        else:
            self._count(answered=1)
            yield _sse("answer", {"answer": outcome["answer"]})


def build_app(
    model: str = "demo",
    *,
    replicas: int = 1,
    max_batch_size: int = 8,
    batch_wait_timeout: float = 0.05,
    max_new_tokens: int = 128,
    sam_model: str | None = None,
    box_to_mask: str = "box",
    device: str | None = None,
    dtype: str = "auto",
    num_cpus: float | None = None,
    num_gpus: float | None = None,
    health_check_period_s: float = 10.0,
    max_request_bytes: int = 32 * 1024 * 1024,
):
    """The Serve application of `model` (what `pixelrefer ask --model` takes), ready for `serve.run`.

    Args:
        replicas: replicas, each holding one model (on one GPU with `num_gpus=1`).
        max_batch_size, batch_wait_timeout: at most this many requests per `generate`, and how long (seconds) a
            replica waits for more after the first one of a batch arrived.
        max_new_tokens: the answer length of a request that gives none (requests may ask for up to 1024).
        sam_model, box_to_mask: as the pipeline takes them (a SAM checkpoint makes point regions work).
        device, dtype: the replica's torch device (default: its GPU if Ray gave it one, else the CPU) and dtype.
        num_cpus, num_gpus: Ray resources per replica (default 1 CPU, no GPU); fractions are allowed.
        health_check_period_s: seconds between Serve's health checks of a replica.
    """
    for name, value in (("replicas", replicas), ("max_batch_size", max_batch_size), ("max_new_tokens", max_new_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not batch_wait_timeout >= 0:
        raise ValueError(f"batch_wait_timeout must be >= 0 seconds, got {batch_wait_timeout!r}")
    options = ServeOptions(
        model=model,
        max_batch_size=max_batch_size,
        batch_wait_timeout=float(batch_wait_timeout),
        max_new_tokens=max_new_tokens,
        max_new_tokens_limit=max(1024, max_new_tokens),
        sam_model=sam_model,
        box_to_mask=box_to_mask,
        device=device,
        dtype=dtype,
        max_request_bytes=max_request_bytes,
    )
    actor_options: dict[str, Any] = {"num_cpus": 1 if num_cpus is None else num_cpus}
    if num_gpus:
        actor_options["num_gpus"] = num_gpus
    return RegionQAServer.options(
        num_replicas=replicas,
        ray_actor_options=actor_options,
        # Room for a full batch being answered while the next one gathers.
        max_ongoing_requests=max(2 * max_batch_size, 8),
        health_check_period_s=health_check_period_s,
    ).bind(asdict(options))


def app_builder(args: dict[str, str]):
    """For `serve run pixelrefer_hf.serving:app_builder model=demo replicas=2 ...` and Serve config files: the
    same arguments as `build_app`, as text."""
    kinds = {
        "replicas": int,
        "max_batch_size": int,
        "max_new_tokens": int,
        "batch_wait_timeout": float,
        "num_cpus": float,
        "num_gpus": float,
        "health_check_period_s": float,
        "max_request_bytes": int,
    }
    values = {key: kinds.get(key, str)(value) for key, value in args.items()}
    return build_app(**values)


__all__ = ["API_PATH", "RegionQAServer", "RequestError", "ServeOptions", "app_builder", "build_app"]
