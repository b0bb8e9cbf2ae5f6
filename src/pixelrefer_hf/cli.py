"""The `pixelrefer` command: ask about regions of an image or video, describe a checkpoint, convert weights.

    pixelrefer ask examples/assets/shapes.png --box 40,40,90,90 "What is <region>?"     # bundled demo model
    pixelrefer ask photo.jpg --model path/to/PixelRefer-7B --box 40,30,200,180 "What is <region> doing?"
    pixelrefer ask photo.jpg --point 120,80 --sam-model facebook/sam-vit-base "What is <region>?"
    pixelrefer ask clip.mp4 --fps 2 --max-frames 16 --frame 0 --mask person.png "Where does <region> go?" --json
    pixelrefer ask clip.mp4 --box 10,40,50,80 --propagate --sam2-model facebook/sam2.1-hiera-tiny "Where is <region>?"
    pixelrefer info path/to/checkpoint
    pixelrefer web --port 7860      # interactive page (needs the `web` extra); --sam-model / --sam2-model add clicks
    pixelrefer convert ...          # see `pixelrefer convert --help`
    pixelrefer eval lvis --model path/to/PixelRefer-7B --data lvis_val_1k_category.json --image-root coco --out runs/lvis
    pixelrefer eval-score runs/lvis     # metrics again from the run's predictions, without the model
    pixelrefer eval-compare runs/lvis runs/lvis-lite --chart compare.png
    pixelrefer serve --model path/to/PixelRefer-7B --replicas 2 --port 8000    # HTTP API on Ray Serve (`serve` extra)
    pixelrefer batch --model path/to/PixelRefer-7B --data regions.parquet --out runs/answers --num-workers 4  # Ray Data

Regions (`--box`, `--mask`, `--rle`, `--point`) may be repeated; they fill the question's `<region>` placeholders in
the order they are given. On a video every region is drawn on frame `--frame` of the decoded frames; `--propagate`
carries it to the other frames with a SAM2 video checkpoint (`--sam2-model`).

Without `--model` the bundled demo checkpoint answers (`demo`; `demo-lite` for PixelRefer-Lite): a toy trained on
synthetic coloured shapes (`pixelrefer_hf.demo`). `tiny-random` / `tiny-random-lite` are untrained test models.
"""

import argparse
import json
import os
import sys
from collections.abc import Sequence

import numpy as np
from PIL import Image
from transformers.utils import logging

logger = logging.get_logger(__name__)

# Built-in model names: the bundled demo checkpoints (`pixelrefer_hf.demo`, trained on synthetic shapes) and the tiny
# random models of `pixelrefer_hf.testing`. `ask` and `info` use the demo PixelRefer without `--model`.
DEMO_MODELS = {"demo": "pixelrefer", "demo-lite": "pixelrefer-lite"}
TINY_RANDOM_MODELS = {"tiny-random": "pixelrefer", "tiny-random-lite": "pixelrefer-lite"}
DEFAULT_MODEL = "demo"
MODEL_HELP = f"checkpoint folder or repo id, or demo, demo-lite, tiny-random[-lite] (default {DEFAULT_MODEL!r})"
VIDEO_EXTENSIONS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")


class _AppendRegion(argparse.Action):
    """Collect every region option into one list, in command-line order, as `(kind, text)` pairs."""

    def __call__(self, parser, namespace, values, option_string=None):
        regions = list(getattr(namespace, self.dest) or [])
        regions.append((option_string.lstrip("-"), values))
        setattr(namespace, self.dest, regions)


def _numbers(text: str, count: int, option: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != count:
        raise ValueError(f"--{option} {text!r}: expected {count} comma-separated numbers")
    return values


def parse_region(kind: str, text: str):
    """One region option -> a region the pipeline accepts (box list, mask array, RLE dict or point prompt)."""
    if kind == "box":
        return _numbers(text, 4, "box")
    if kind == "point":
        return {"points": [_numbers(text, 2, "point")], "labels": [1]}
    if kind == "mask":
        try:
            with Image.open(text) as mask:
                # A one-channel copy: 0/255 masks and 0/1 label images both stay binary.
                return np.array(mask.convert("L") if mask.mode not in ("1", "L", "P", "I", "F") else mask)
        except (OSError, SyntaxError, Image.DecompressionBombError) as error:
            raise ValueError(f"--mask {text!r}: cannot read the mask image: {error}") from error
    if kind == "rle":
        try:
            if os.path.isfile(text):
                with open(text, encoding="utf-8") as file:
                    return json.load(file)
            return json.loads(text)
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"--rle: expected a COCO RLE as JSON text or a JSON file: {error}") from error
    raise ValueError(f"unknown region option --{kind}")


def load_model_and_processor(name: str):
    """The model and processor of a checkpoint folder / repo id, of a bundled demo checkpoint (`demo[-lite]`) or of a
    tiny random model (`tiny-random[-lite]`)."""
    if name in DEMO_MODELS:
        from .demo import demo_checkpoint

        logger.warning(
            f"Using {name!r}, the bundled toy model trained on synthetic coloured shapes: it names the colour and shape "
            "of a region and answers which of two is larger and which way one moves with the accuracy its card gives "
            "(the PixelRefer demo's motion answers are at chance), and knows nothing about real photos. Pass --model "
            "with a converted checkpoint for real answers (see `pixelrefer convert --help`)."
        )
        name = demo_checkpoint(DEMO_MODELS[name])
    elif name in TINY_RANDOM_MODELS:
        from .testing import tiny_model_and_processor

        logger.warning(
            f"Using {name!r}, a tiny randomly initialised model: the answers are meaningless. Pass --model with a "
            "converted or trained checkpoint for real answers."
        )
        return tiny_model_and_processor(TINY_RANDOM_MODELS[name])
    from transformers import AutoModelForImageTextToText, AutoProcessor

    _check_model_name(name)
    print(f"Loading {name} ...", file=sys.stderr)
    try:
        model = AutoModelForImageTextToText.from_pretrained(name, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(name, trust_remote_code=True)
    except OSError as error:
        # Hub and file errors (offline, unknown repo, missing files) are OSErrors with a long explanation: its
        # first line says what happened.
        first_line = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise ValueError(f"--model {name!r}: cannot load the checkpoint: {first_line}") from error
    return model, processor


def load_region_qa_pipeline(model: str, device=None, dtype: str = "auto"):
    """The region-qa pipeline of `model` (a checkpoint folder, repo id, `demo[-lite]` or `tiny-random[-lite]`, as
    `pixelrefer ask --model` takes) on `device` (a `torch.device` or its name; default: this process's GPU if it has
    one, else the CPU), in bfloat16 on a GPU and the checkpoint's dtype on the CPU unless `dtype` says otherwise.
    Used by `pixelrefer eval`, the Serve replicas and the Ray Data workers."""
    import torch

    from .pipeline_region_qa import RegionQAPipeline

    # Ray sets CUDA_VISIBLE_DEVICES to the GPUs it assigned to this worker, so "cuda" is the worker's own GPU.
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype != "auto" and dtype not in dtypes:
        raise ValueError(f"dtype must be auto, {', '.join(dtypes)}; got {dtype!r}")
    loaded, processor = load_model_and_processor(model)
    chosen = dtypes.get(dtype) or (torch.bfloat16 if device.type == "cuda" else loaded.dtype)
    loaded = loaded.to(device=device, dtype=chosen).eval()
    return RegionQAPipeline(model=loaded, processor=processor, task="region-qa", device=device)


def _check_model_name(name: str) -> None:
    """A name that can only be a local path (not a hub repo id `org/name`) must be an existing folder."""
    if os.path.isdir(name):
        return
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep in name.replace("/", "")
    if looks_like_path or os.path.exists(name):
        raise ValueError(
            f"--model {name!r}: no such checkpoint folder; give a folder holding config.json and the weights, a hub "
            f"repo id, or one of {', '.join([*DEMO_MODELS, *TINY_RANDOM_MODELS])}"
        )


def _ask(args: argparse.Namespace) -> int:
    from .media_io import load_image, read_video
    from .pipeline_region_qa import RegionQAPipeline

    regions = [parse_region(kind, text) for kind, text in args.regions or []]
    if any(kind == "point" for kind, _ in args.regions or []) and not args.sam_model:
        raise ValueError(
            "--point needs --sam-model (a SAM checkpoint folder or repo id, e.g. facebook/sam-vit-base) to turn the "
            "click into a mask; or give the region with --box, --mask or --rle"
        )
    is_video = args.media.lower().endswith(VIDEO_EXTENSIONS)
    if args.propagate and not is_video:
        raise ValueError(f"--propagate carries regions across video frames, but {args.media!r} is not a video file")
    if args.propagate and not args.sam2_model:
        raise ValueError(
            "--propagate needs --sam2-model (a SAM2 video checkpoint folder or repo id, e.g. "
            "facebook/sam2.1-hiera-tiny)"
        )
    questions = [args.question, *(args.questions or [])]
    if is_video:
        decoded = read_video(args.media, fps=args.fps, max_frames=args.max_frames, show_progress=True)
        media = {"video": decoded.frames, "video_timestamps": decoded.timestamps}
        regions = [{args.frame: region} for region in regions]
    else:
        # Read before the model loads, so that an unreadable file is reported at once.
        media = {"image": load_image(args.media, "image")}
    items = [
        {**media, "question": question, "regions": regions_of}
        for question, regions_of in zip(questions, split_regions(questions, regions), strict=True)
    ]

    model, processor = load_model_and_processor(args.model)
    pipe = RegionQAPipeline(model=model, processor=processor, task="region-qa", device=args.device)
    options = {"max_new_tokens": args.max_new_tokens, "box_to_mask": args.box_to_mask}
    if args.sam_model:
        options["sam_model"] = args.sam_model
    if args.propagate:
        options.update(propagate_regions=True, sam2_model=args.sam2_model)
    # One batch: questions about the same picture share its encoding and prompt prefix.
    results = pipe(items, batch_size=len(items), **options)
    for question, result in zip(questions, results, strict=True):
        if args.json:
            print(json.dumps({"question": question, "answer": result["answer"], "model": args.model}))
        else:
            print(result["answer"])
    return 0


def split_regions(questions: list[str], regions: list) -> list[list]:
    """The region options in order, handed to the questions in order: each takes one per `<region>` it holds."""
    wanted = [question.count("<region>") for question in questions]
    if sum(wanted) != len(regions):
        summed = " + ".join(map(str, wanted)) + f" = {sum(wanted)}"
        held = f"the question holds {wanted[0]}" if len(wanted) == 1 else f"the questions hold {summed}"
        raise ValueError(
            f"{held} <region> placeholder(s) but {len(regions)} region(s) were given; give one --box / --mask / "
            "--rle / --point per <region>, in order"
        )
    starts = [sum(wanted[:k]) for k in range(len(wanted))]
    return [regions[start : start + count] for start, count in zip(starts, wanted, strict=True)]


def describe_model(model, processor) -> dict:
    """Variant, sizes, token budget (the processor's) and attention implementation of a PixelRefer model, as a
    JSON-able dict."""
    config = model.config
    parts = {name: sum(p.numel() for p in module.parameters()) for name, module in model.model.named_children()}
    parts["lm_head"] = 0 if config.tie_word_embeddings else model.lm_head.weight.numel()
    text, vision = config.text_config, config.vision_config
    return {
        "variant": config.variant,
        "parameters": sum(p.numel() for p in model.parameters()),
        "parameters_by_part": parts,
        "dtype": str(model.dtype).removeprefix("torch."),
        "language_model": {
            "layers": text.num_hidden_layers,
            "hidden_size": text.hidden_size,
            "intermediate_size": text.intermediate_size,
            "attention_heads": text.num_attention_heads,
            "key_value_heads": text.num_key_value_heads,
            "vocab_size": text.vocab_size,
        },
        "vision_tower": {
            "layers": vision.num_hidden_layers,
            "hidden_size": vision.hidden_size,
            "intermediate_size": vision.intermediate_size,
            "attention_heads": vision.num_attention_heads,
            "patch_size": vision.patch_size,
        },
        "token_budget": {
            "num_object_tokens": config.num_object_tokens,
            "max_visual_tokens": processor.image_processor.max_visual_tokens,
            "max_object_patches": processor.image_processor.max_object_patches,
        },
        "attn_implementation": config._attn_implementation,
    }


def _info(args: argparse.Namespace) -> int:
    model, processor = load_model_and_processor(args.model)
    info = {"model": args.model, **describe_model(model, processor)}
    if args.json:
        print(json.dumps(info))
        return 0
    lm, tower, budget = info["language_model"], info["vision_tower"], info["token_budget"]
    parts = ", ".join(f"{name} {count:,}" for name, count in info["parameters_by_part"].items())
    print(f"model:        {info['model']}")
    print(f"variant:      {info['variant']}")
    print(f"parameters:   {info['parameters']:,} ({parts}), {info['dtype']}")
    print(
        f"LLM:          {lm['layers']} layers, width {lm['hidden_size']}, MLP {lm['intermediate_size']}, "
        f"{lm['attention_heads']} heads ({lm['key_value_heads']} KV), vocab {lm['vocab_size']:,}"
    )
    print(
        f"vision tower: {tower['layers']} layers, width {tower['hidden_size']}, MLP {tower['intermediate_size']}, "
        f"{tower['attention_heads']} heads, patch {tower['patch_size']}"
    )
    print(
        f"tokens:       {budget['num_object_tokens']} per object, {budget['max_visual_tokens']} visual tokens per "
        f"sample, objects downscaled above {budget['max_object_patches']} patches"
    )
    print(f"attention:    {info['attn_implementation']}")
    return 0


def _web(args: argparse.Namespace) -> int:
    from .web_demo import serve

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port}: a TCP port is 0-65535")
    if args.concurrency < 1:
        raise ValueError(f"--concurrency {args.concurrency}: at least one request must run at a time")
    serve(
        model=args.model,
        sam_model=args.sam_model,
        sam2_model=args.sam2_model,
        host=args.host,
        port=args.port,
        device=args.device,
        concurrency=args.concurrency,
    )
    return 0


def _convert(argv: list[str]) -> int:
    try:
        from . import convert
    except ImportError as error:
        raise ValueError(f"`pixelrefer convert` is not available in this installation ({error})") from error
    status = convert.main(argv)
    return 0 if status is None else int(status)


def _serve(args: argparse.Namespace) -> int:
    from .ray_utils import require_ray

    require_ray("pixelrefer serve", ("ray", "ray.serve", "fastapi"))
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port}: a TCP port is 0-65535")
    import time

    import ray
    from ray import serve

    from .ray_utils import actor_resources
    from .serving import build_app

    ray.init(address=args.address)
    resources = actor_resources(args.num_cpus_per_replica, args.num_gpus_per_replica)
    application = build_app(
        args.model,
        replicas=args.replicas,
        max_batch_size=args.max_batch_size,
        batch_wait_timeout=args.batch_wait_timeout,
        max_new_tokens=args.max_new_tokens,
        sam_model=args.sam_model,
        box_to_mask=args.box_to_mask,
        device=args.device,
        **resources,
    )
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(application, name="pixelrefer", route_prefix="/")
    from .serving import API_PATH

    print(f"Serving {args.model} at http://{args.host}:{args.port}{API_PATH} (Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("Stopping ...", file=sys.stderr)
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


def _batch(args: argparse.Namespace) -> int:
    from .ray_utils import require_ray

    require_ray("pixelrefer batch", ("ray", "ray.data"))
    from .batch_inference import run_batch

    summary = run_batch(
        args.model,
        args.data,
        args.out,
        benchmark=args.benchmark,
        image_root=args.image_root,
        num_workers=args.num_workers,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        num_cpus_per_worker=args.num_cpus_per_worker,
        num_gpus_per_worker=args.num_gpus_per_worker,
        output_format=args.format,
        limit=args.limit,
        device=args.device,
        address=args.address,
        progress=not args.no_progress,
    )
    print(
        f"{summary['answered_this_run']} item(s) answered by this run; {args.out} holds {summary['records']} "
        f"record(s), {summary['errors']} with an error"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .media_io import DEFAULT_FPS, DEFAULT_MAX_FRAMES

    parser = argparse.ArgumentParser(
        prog="pixelrefer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)

    ask = commands.add_parser("ask", help="ask a question about regions of an image or a video file")
    ask.add_argument("media", help="image or video file")
    ask.add_argument("question", help="the question, with one <region> per region option")
    ask.add_argument(
        "--question",
        dest="questions",
        action="append",
        help="another question about the same image or video (repeatable): the region options fill the questions' "
        "<region> placeholders in order; all are answered in one batch that encodes the picture once",
    )
    region_help = "repeatable; regions fill the <region> placeholders in the order given"
    for option, metavar, what in (
        ("--box", "X0,Y0,X1,Y1", "a box in pixels"),
        ("--mask", "FILE", "a binary mask image"),
        ("--rle", "JSON", "a COCO RLE (JSON text or file)"),
        ("--point", "X,Y", "a click on the object (needs --sam-model)"),
    ):
        ask.add_argument(option, dest="regions", action=_AppendRegion, metavar=metavar, help=f"{what}; {region_help}")
    ask.add_argument(
        "--sam-model",
        help="SAM checkpoint (folder or repo id) that turns --point, and boxes with --box-to-mask sam, into masks",
    )
    ask.add_argument(
        "--box-to-mask",
        choices=["box", "sam"],
        default="box",
        help="give boxes to PixelRefer as they are (default), or segment the object inside them with SAM first",
    )
    ask.add_argument(
        "--propagate",
        action="store_true",
        help="video: carry every region from --frame to all decoded frames with SAM2 (needs --sam2-model)",
    )
    ask.add_argument("--sam2-model", help="SAM2 video checkpoint (folder or repo id) used by --propagate")
    ask.add_argument("--frame", type=int, default=0, help="video: decoded frame the regions are drawn on (default 0)")
    ask.add_argument(
        "--fps", type=float, default=DEFAULT_FPS, help=f"video: frames sampled per second (default {DEFAULT_FPS:g})"
    )
    ask.add_argument(
        "--max-frames",
        type=int,
        default=DEFAULT_MAX_FRAMES,
        help=f"video: at most this many frames (default {DEFAULT_MAX_FRAMES})",
    )
    ask.add_argument("--max-new-tokens", type=int, default=128, help="answer length limit (default 128)")
    ask.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    ask.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0 (default cpu)")
    ask.add_argument("--json", action="store_true", help="print a JSON object instead of the bare answer")
    ask.set_defaults(handler=_ask)

    info = commands.add_parser("info", help="describe a checkpoint: variant, sizes, token budget, attention")
    info.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=MODEL_HELP)
    info.add_argument("--json", action="store_true", help="print a JSON object")
    info.set_defaults(handler=_info)

    web = commands.add_parser("web", help="serve an interactive web page (Gradio; needs the `web` extra)")
    web.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    web.add_argument("--sam-model", help="SAM checkpoint (folder or repo id): clicks and brushed strokes become masks")
    web.add_argument("--sam2-model", help="SAM2 video checkpoint (folder or repo id): video regions reach every frame")
    web.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    web.add_argument("--port", type=int, default=7860, help="TCP port (default 7860)")
    web.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0 (default cpu)")
    web.add_argument("--concurrency", type=int, default=1, help="requests answered at the same time (default 1)")
    web.set_defaults(handler=_web)
    serve_parser = commands.add_parser(
        "serve", help="serve the HTTP JSON API on Ray Serve: replicas, dynamic batching (needs the `serve` extra)"
    )
    serve_parser.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    serve_parser.add_argument("--replicas", type=int, default=1, help="replicas, one model each (default 1)")
    serve_parser.add_argument(
        "--max-batch-size", type=int, default=8, help="at most this many requests per generate call (default 8)"
    )
    serve_parser.add_argument(
        "--batch-wait-timeout",
        type=float,
        default=0.05,
        help="seconds a replica waits for more requests once a batch has one (default 0.05)",
    )
    serve_parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve_parser.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    serve_parser.add_argument(
        "--max-new-tokens", type=int, default=128, help="answer length when a request gives none (default 128)"
    )
    serve_parser.add_argument("--sam-model", help="SAM checkpoint (folder or repo id): point regions become masks")
    serve_parser.add_argument("--box-to-mask", choices=["box", "sam"], default="box", help="as for `ask`")
    serve_parser.add_argument("--device", help="torch device of each replica (default: its GPU if any, else cpu)")
    serve_parser.add_argument(
        "--num-gpus-per-replica", type=float, help="GPUs per replica (default 1 when the cluster has GPUs, else 0)"
    )
    serve_parser.add_argument(
        "--num-cpus-per-replica", type=float, help="CPUs per replica (default 1 without GPUs, 0 with)"
    )
    serve_parser.add_argument(
        "--address", help="Ray cluster to join (e.g. auto after `ray start --head`; default: RAY_ADDRESS or a new one)"
    )
    serve_parser.set_defaults(handler=_serve)

    batch = commands.add_parser(
        "batch", help="answer a dataset or annotation file with Ray Data actors, resumable (needs the `serve` extra)"
    )
    batch.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    batch.add_argument(
        "--data",
        required=True,
        help="region-chat dataset (parquet file or folder, or a save_to_disk folder), or with --benchmark an "
        "evaluation annotation file",
    )
    batch.add_argument("--out", required=True, help="folder of the answer shards; a rerun skips finished items")
    batch.add_argument("--benchmark", help="read --data as this `pixelrefer eval` benchmark's annotation file")
    batch.add_argument("--image-root", help="folder relative image paths start from (default: the data file's folder)")
    batch.add_argument("--num-workers", type=int, default=1, help="actors, one model each (default 1)")
    batch.add_argument("--batch-size", type=int, default=8, help="items per generate call (default 8)")
    batch.add_argument("--max-new-tokens", type=int, help="answer length (default 128, or the benchmark's)")
    batch.add_argument(
        "--num-gpus-per-worker", type=float, help="GPUs per actor (default 1 when the cluster has GPUs, else 0)"
    )
    batch.add_argument("--num-cpus-per-worker", type=float, help="CPUs per actor (default 1 without GPUs, 0 with)")
    batch.add_argument("--format", choices=["jsonl", "parquet"], default="jsonl", help="shard format (default jsonl)")
    batch.add_argument("--limit", type=int, help="only the first N rows (dataset) or items (annotation file)")
    batch.add_argument("--device", help="torch device of each actor (default: its GPU if any, else cpu)")
    batch.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS or a new local one)")
    batch.add_argument("--no-progress", action="store_true", help="no progress bars")
    batch.set_defaults(handler=_batch)

    # The evaluation harness (`pixelrefer_hf.evaluation`); its parsers are shared with `python -m
    # pixelrefer_hf.evaluation`, imported here because they are light (the runner loads on use).
    from .evaluation import __main__ as evaluation

    evaluate = commands.add_parser("eval", help="run a benchmark (LVIS, PACO, VG, Ref-L4, HC-STVG, VideoRefer-Q, ...)")
    evaluation.add_eval_arguments(evaluate)
    evaluate.set_defaults(handler=evaluation.run_eval_command)
    score = commands.add_parser("eval-score", help="recompute a run's metrics from its predictions.jsonl")
    evaluation.add_score_arguments(score)
    score.set_defaults(handler=evaluation.run_score_command)
    compare = commands.add_parser("eval-compare", help="runs side by side with the paper's numbers")
    evaluation.add_compare_arguments(compare)
    compare.set_defaults(handler=evaluation.run_compare_command)

    # Listed for `pixelrefer --help` only: `main` hands everything after `convert` to `pixelrefer_hf.convert.main`.
    commands.add_parser("convert", help="convert released PixelRefer weights (see `pixelrefer convert --help`)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line `argv` (default: `sys.argv[1:]`); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["convert"]:
            return _convert(argv[1:])
        args = build_parser().parse_args(argv)
        return args.handler(args)
    except (ValueError, ImportError) as error:
        print(f"pixelrefer {argv[0]}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
