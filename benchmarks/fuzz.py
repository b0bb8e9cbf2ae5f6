"""Fuzz the processor and the region-qa pipeline with random hostile inputs and count the outcomes.

Every case must end in an answer or a `ValueError` that names its sample (processor: `sample k...`) or item
(pipeline: `item i: ...`). Anything else is a bug and is listed with its input. In the pipeline part each batch also
holds a fixed good item whose answer must equal its single-call answer (`skip_bad_items=True`).

    python benchmarks/fuzz.py --cases 10000 --seed 0

The inputs come from a seeded numpy generator (not hypothesis), so a run is reproducible and fast: masks of every
dtype, shape and value range, boxes with NaN / inf / huge / reversed coordinates, malformed RLE and polygons, PIL
images in odd modes and sizes, videos with 0 or 1 frame and strange frame keys, text with any number of placeholders,
unicode and the special tokens typed by the user. Prints a markdown table and writes `results/fuzz.{json,md}`.
"""

import argparse
import time
import traceback

import numpy as np
import torch
from bench_utils import add_run_arguments, markdown_table, parse_run_arguments, write_results
from PIL import Image

from pixelrefer_hf import RegionQAPipeline
from pixelrefer_hf.testing import HOSTILE_TEXT_PIECES, tiny_model_and_processor

HEIGHT, WIDTH = 24, 30
OUTCOMES = ("answered", "clear ValueError", "ValueError not naming the sample", "other exception", "batch mismatch")
WORDS = ["What", "is", "the", "colour of", "and", "?", " ", "left of", "Ω", "\t"]
MASK_DTYPES = [np.bool_, np.uint8, np.int8, np.int16, np.int32, np.int64, np.uint16, np.float16, np.float32, np.float64]
PIL_MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16", "F", "CMYK", "YCbCr"]
ODD_IMAGE_SIZES = [(1, 1), (1, 300), (3, 57), (0, 4), (HEIGHT, WIDTH + 1)]


def pick(rng: np.random.Generator, options: list):
    return options[int(rng.integers(len(options)))]


def random_number(rng: np.random.Generator):
    kind = int(rng.integers(8))
    if kind == 0:
        return pick(rng, [float("nan"), float("inf"), -float("inf"), 1e308, -1e308, 10**400, -(10**30), 0])
    if kind <= 2:
        return float(rng.uniform(-10, WIDTH + 10))
    return int(rng.integers(-3, WIDTH + 3))


def random_box(rng: np.random.Generator) -> list:
    if rng.random() < 0.7:
        x0, y0 = int(rng.integers(0, WIDTH - 2)), int(rng.integers(0, HEIGHT - 2))
        return [x0, y0, x0 + int(rng.integers(1, 12)), y0 + int(rng.integers(1, 12))]
    return [random_number(rng) for _ in range(pick(rng, [4, 4, 4, 0, 3, 5]))]


def random_mask(rng: np.random.Generator):
    dtype = np.dtype(pick(rng, MASK_DTYPES))
    shape = pick(
        rng, [(HEIGHT, WIDTH)] * 12 + [(1, HEIGHT, WIDTH), (WIDTH, HEIGHT), (HEIGHT,), (), (0, WIDTH), (2, 2, 2)]
    )
    mask = np.zeros(shape, dtype=dtype)
    if mask.ndim >= 2 and mask.size:
        rows, cols = mask.shape[-2:]
        r0, c0 = int(rng.integers(rows)), int(rng.integers(cols))
        if dtype.kind == "f":
            value = pick(rng, [1.0] * 6 + [0.75, 0.5, np.nan, np.inf, -0.2, 3.0])
        elif dtype.kind == "b":
            value = True
        else:
            value = pick(rng, [1] * 6 + [255, 255, 2, 7, -1])
            value = int(np.clip(value, np.iinfo(dtype).min, np.iinfo(dtype).max))
        mask[..., r0 : r0 + int(rng.integers(1, rows + 1)), c0 : c0 + int(rng.integers(1, cols + 1))] = value
    form = int(rng.integers(3))
    if form == 1 and dtype != np.uint16:
        return torch.from_numpy(mask)
    if form == 2 and mask.ndim == 2 and mask.size and dtype in (np.bool_, np.uint8, np.int32, np.float32):
        return Image.fromarray(mask)
    return mask


def random_rle(rng: np.random.Generator) -> dict:
    size = pick(rng, [[HEIGHT, WIDTH]] * 3 + [[10**6, 10**6], [-1, 5], "ab", [HEIGHT], [HEIGHT, WIDTH, 1]])
    counts = pick(
        rng,
        [
            [10, HEIGHT * WIDTH - 10],
            [HEIGHT * WIDTH],
            [0, 10**12],
            [-5, HEIGHT * WIDTH + 5],
            "".join(chr(int(c)) for c in rng.integers(30, 130, int(rng.integers(0, 12)))),
            bytes(rng.integers(0, 256, int(rng.integers(0, 8)), dtype=np.uint8)),
            None,
            3.5,
            [True, False],
        ],
    )
    rle = {"size": size, "counts": counts}
    if rng.random() < 0.1:
        del rle[pick(rng, ["size", "counts"])]
    return rle


def random_polygons(rng: np.random.Generator) -> dict:
    polygons = []
    for _ in range(int(rng.integers(0, 3))):
        polygons.append([random_number(rng) for _ in range(int(rng.integers(0, 10)))])
    return {"polygons": pick(rng, [polygons, polygons, [[0, 0, 0, 0, 0, 0]], [[1, 1, 5, 5, 9, 9]], 7, "x"])}


def random_region(rng: np.random.Generator):
    kind = int(rng.integers(12))
    if kind < 4:
        return random_box(rng)
    if kind < 8:
        return random_mask(rng)
    if kind == 8:
        return random_rle(rng)
    if kind == 9:
        return random_polygons(rng)
    return pick(
        rng, [None, 5, "box", {"a": 1}, {1, 2, 3, 4}, [[1, 2], [3, 4]], {"image_index": 0, "region": [1, 1, 5, 5]}]
    )


def random_image(rng: np.random.Generator):
    kind = int(rng.integers(12))
    height, width = (HEIGHT, WIDTH) if rng.random() < 0.8 else pick(rng, ODD_IMAGE_SIZES)
    if kind < 6:
        return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    if kind < 9 and height and width:
        return Image.new(pick(rng, PIL_MODES), (width, height))
    if kind == 9:
        dtype = pick(rng, [np.float32, np.int64, np.bool_, np.uint16, np.float64])
        shape = pick(rng, [(height, width, 3), (height, width), (3, height, width), (height, width, 2)])
        return (rng.random(shape) * pick(rng, [1, 255, 300, -1])).astype(dtype)
    if kind == 10:
        return torch.rand(3, max(height, 1), max(width, 1))
    return pick(rng, [None, "missing.png", 3, [None]])


def random_text(rng: np.random.Generator, num_regions: int, tag: str) -> str:
    pieces = [tag + "\n"] if rng.random() < 0.7 else []
    placeholders = num_regions if rng.random() < 0.9 else int(rng.integers(0, 4))
    for k in range(int(rng.integers(0, 8)) + placeholders):
        if k < placeholders:
            pieces.append("<region>")
        pieces.append(pick(rng, WORDS) if rng.random() < 0.95 else pick(rng, HOSTILE_TEXT_PIECES))
    rng.shuffle(pieces[1:] if pieces and pieces[0].startswith("<") else pieces)
    return "".join(pieces)


def random_frame_key(rng: np.random.Generator, num_frames: int):
    if rng.random() < 0.85:
        return int(rng.integers(0, max(num_frames, 1)))
    return pick(rng, [-1, num_frames, 0.0, 1.5, "0", True, None, np.int64(0)])


def random_video_region(rng: np.random.Generator, num_frames: int):
    if rng.random() < 0.1:
        return random_region(rng)
    return {random_frame_key(rng, num_frames): random_region(rng) for _ in range(pick(rng, [1, 1, 1, 2, 0]))}


def random_sample(rng: np.random.Generator) -> dict:
    """One processor sample: text, images or video, regions and timestamps."""
    num_regions = int(rng.integers(0, 3))
    if rng.random() < 0.75:
        image = random_image(rng)
        images = pick(rng, [image] * 6 + [[image], [image, random_image(rng)], []])
        return {
            "text": random_text(rng, num_regions, "<image>"),
            "images": images,
            "regions": [random_region(rng) for _ in range(num_regions)],
        }
    num_frames = pick(rng, [0, 1, 1, 2, 3])
    frames = [
        random_image(rng) if rng.random() < 0.15 else np.full((HEIGHT, WIDTH, 3), 40 * t, np.uint8)
        for t in range(num_frames)
    ]
    timestamps = pick(
        rng, [None] * 4 + [[float(t) for t in range(num_frames)], [0.0], "ab", 5, [float("nan")] * num_frames]
    )
    return {
        "text": random_text(rng, num_regions, "<video>"),
        "video": frames,
        "regions": [random_video_region(rng, num_frames) for _ in range(num_regions)],
        "video_timestamps": timestamps,
    }


def classify(error: BaseException, expected_prefixes: tuple[str, ...]) -> str:
    if isinstance(error, ValueError):
        return "clear ValueError" if str(error).startswith(expected_prefixes) else "ValueError not naming the sample"
    return "other exception"


def fuzz_processor(processor, rng: np.random.Generator, counts: dict, failures: list) -> None:
    """One sample per call, so that each case has its own outcome (batches are the pipeline's part)."""
    batch = [random_sample(rng)]
    kwargs = {
        "text": [sample["text"] for sample in batch],
        "images": [sample.get("images") for sample in batch],
        "regions": [sample["regions"] for sample in batch],
    }
    if any("video" in sample for sample in batch):
        kwargs["videos"] = [sample.get("video") for sample in batch]
        kwargs["video_timestamps"] = [sample.get("video_timestamps") for sample in batch]
    try:
        processor(**kwargs, padding=True, return_tensors="pt", multi_frame_regions=bool(rng.random() < 0.5))
        outcome = "answered"
    except Exception as error:  # noqa: BLE001  (classified: anything but a clear ValueError is a bug)
        outcome = classify(error, tuple(f"sample {k}" for k in range(len(batch))))
        if outcome != "clear ValueError":
            failures.append(
                {
                    "target": "processor",
                    "outcome": outcome,
                    "error": repr(error)[:300],
                    "traceback": traceback.format_exc(limit=3)[-600:],
                }
            )
    counts["processor"][outcome] += len(batch)


def random_item(rng: np.random.Generator):
    sample = random_sample(rng)
    question = sample["text"].replace("<image>\n", "").replace("<video>\n", "")
    if "video" in sample:
        item = {"video": sample["video"], "regions": sample["regions"], "question": question}
        if sample["video_timestamps"] is not None:
            item["video_timestamps"] = sample["video_timestamps"]
    else:
        image = sample["images"]
        item = {
            "image": image[0] if isinstance(image, list) and image else image,
            "regions": sample["regions"],
            "question": question,
        }
    if rng.random() < 0.05:
        return pick(rng, [None, 3, "item", {"image": None}, {**item, "extra": 1}])
    return item


def fuzz_pipeline(pipe, reference: dict, rng: np.random.Generator, counts: dict, failures: list, size: int) -> None:
    good_item, good_answer = reference["item"], reference["answer"]
    items = [random_item(rng) for _ in range(size - 1)]
    position = int(rng.integers(0, size))
    items.insert(position, good_item)
    try:
        results = pipe(items, batch_size=size, skip_bad_items=True)
    except Exception as error:  # noqa: BLE001
        failures.append(
            {
                "target": "pipeline",
                "outcome": "other exception",
                "error": repr(error)[:300],
                "traceback": traceback.format_exc(limit=3)[-600:],
            }
        )
        counts["pipeline"]["other exception"] += size
        return
    for index, result in enumerate(results):
        if index == position:
            outcome = "answered" if result == {"answer": good_answer} else "batch mismatch"
        elif "answer" in result:
            outcome = "answered"
        else:
            named = result.get("error", "").startswith(f"item {index}: ")
            outcome = "clear ValueError" if named else "ValueError not naming the sample"
        if outcome not in ("answered", "clear ValueError"):
            failures.append({"target": "pipeline", "outcome": outcome, "error": str(result)[:300]})
        counts["pipeline"][outcome] += 1


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_000, help="total cases (processor samples + pipeline items)")
    parser.add_argument("--pipeline-share", type=float, default=0.2, help="share of the cases sent to the pipeline")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variant", choices=["pixelrefer", "pixelrefer-lite"], default="pixelrefer")
    parser.add_argument("--smoke", action="store_true", help="300 cases, seconds")
    add_run_arguments(parser, timed_on_cpu=True)
    args = parse_run_arguments(parser, argv)
    cases = 300 if args.smoke else args.cases
    rng = np.random.default_rng(args.seed)
    model, processor = tiny_model_and_processor(args.variant, seed=args.seed)
    pipe = RegionQAPipeline(model=model, processor=processor, task="region-qa", max_new_tokens=2)
    good_item = {
        "image": np.full((HEIGHT, WIDTH, 3), 90, np.uint8),
        "regions": [[3, 4, 15, 17]],
        "question": "<region>?",
    }
    reference = {"item": good_item, "answer": pipe(good_item)["answer"]}

    counts = {target: dict.fromkeys(OUTCOMES, 0) for target in ("processor", "pipeline")}
    failures: list[dict] = []
    pipeline_cases = int(cases * args.pipeline_share)
    start = time.perf_counter()
    while sum(counts["pipeline"].values()) < pipeline_cases:
        fuzz_pipeline(pipe, reference, rng, counts, failures, size=8)
    pipeline_seconds = time.perf_counter() - start
    while sum(counts["processor"].values()) < cases - sum(counts["pipeline"].values()):
        fuzz_processor(processor, rng, counts, failures)
    seconds = time.perf_counter() - start

    rows = [[target, *(counts[target][o] for o in OUTCOMES), sum(counts[target].values())] for target in counts]
    rows.append(
        ["total", *(sum(counts[t][o] for t in counts) for o in OUTCOMES), sum(sum(c.values()) for c in counts.values())]
    )
    table = (
        f"{rows[-1][-1]} fuzz cases ({args.variant}, seed {args.seed}) in {seconds:.1f} s "
        f"(pipeline {pipeline_seconds:.1f} s, processor {seconds - pipeline_seconds:.1f} s)\n\n"
        + markdown_table(["target", *OUTCOMES, "cases"], rows)
    )
    for failure in failures[:20]:
        print(failure)
    payload = {
        "variant": args.variant,
        "seed": args.seed,
        "cases": rows[-1][-1],
        "seconds": seconds,
        "pipeline_seconds": pipeline_seconds,
        "counts": counts,
        "failures": failures[:50],
    }
    write_results("fuzz" if args.variant == "pixelrefer" else "fuzz_lite", payload, table, args.output_dir)
    return payload


if __name__ == "__main__":
    main()
