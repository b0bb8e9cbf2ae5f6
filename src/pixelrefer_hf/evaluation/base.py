"""What every benchmark of `pixelrefer eval` is made of.

A benchmark turns its official annotation files into `EvalItem`s (one question about one image or video), and turns
the lines of `predictions.jsonl` back into metrics. The runner in between owns everything else: batching through the
region-qa pipeline, resuming, sharding over processes, and writing results.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class EvalDataError(ValueError):
    """A benchmark file or item that cannot be used; the message names the file and the item."""

    def __init__(self, message: str, *, file: str | Path | None = None, item: str | None = None):
        where = []
        if file is not None:
            where.append(f"file {file}")
        if item is not None:
            where.append(f"item {item}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)
        self.file = None if file is None else str(file)
        self.item = item


# The published numbers of every benchmark, with their sources: data, not code (`published_numbers`).
PAPER_NUMBERS_FILE = Path(__file__).with_name("paper_numbers.json")


def published_numbers(benchmark: str) -> dict[str, dict[str, float]]:
    """The numbers published for `benchmark` (a `pixelrefer eval` name): {model: {metric: value}}, empty if none."""
    entries = json.loads(PAPER_NUMBERS_FILE.read_text())["benchmarks"]
    return entries.get(benchmark, {}).get("numbers", {})


@dataclass
class EvalItem:
    """One question of a benchmark, ready for the region-qa pipeline."""

    # Unique within the benchmark; the key of predictions.jsonl, so resuming and merging shards rely on it.
    id: str
    # The prompt, with one `<region>` placeholder per entry of `regions`, in order.
    question: str
    # Pipeline region values: boxes [x0, y0, x1, y1], COCO RLE dicts, {"polygons": ...}, or {frame_index: region}
    # for videos. Kept as loaded (JSON-like), decoded by the pipeline. A video region's frame index counts the frames of
    # the source (of the file, or of the sorted frame list): the runner samples the video and always keeps those
    # frames, as the official scripts' `frame_ids` do.
    regions: list[Any]
    # Local path of the image, or None for a video item.
    image: str | None = None
    # Local path of the video file, or a list of frame image paths, or None for an image item.
    video: str | list[str] | None = None
    # What scoring compares against (an answer string, a caption list, an option letter ...); JSON-serialisable.
    reference: Any = None
    # Anything else scoring or reporting needs (question type, category, options); JSON-serialisable.
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class ScoreOptions:
    """What scoring may need beyond the predictions themselves."""

    # The run folder; a judge keeps its reply cache under `run_dir / "judge_cache"`.
    run_dir: Path | None = None
    # Sentence-transformers model (local folder or name) for SSim; None means the packaged all-MiniLM-L6-v2.
    ssim_model: str | None = None
    # OpenAI-compatible judge endpoint, model name, and the environment variable that holds the key.
    judge_base_url: str | None = None
    judge_model: str | None = None
    judge_api_key_env: str = "OPENAI_API_KEY"
    # Seconds per judge request, and how many attempts before a request counts as failed.
    judge_timeout: float = 60.0
    judge_max_attempts: int = 3
    # Caption benchmarks: also compute SPICE (only where its Stanford CoreNLP jars are already installed).
    spice: bool = False


class Benchmark:
    """One benchmark: how to read its files, how to ask, how to score.

    A prediction record (one line of predictions.jsonl) is a dict with at least `id`, `prediction` (the answer text,
    or None), `reference` and `meta` copied from the item, and `error` (None, or the message of an item that failed
    with --skip-bad-items). `score` must count error records and leave them out of the averages, never score them 0.
    """

    # The name on the command line: `pixelrefer eval NAME`.
    name: str = ""
    # One line for `pixelrefer eval --help`.
    description: str = ""
    # Keyword arguments for generate (max_new_tokens, do_sample, ...), the official settings for this benchmark.
    generation_kwargs: dict[str, Any] = {}
    # Whether scoring needs an LLM judge (then ScoreOptions.judge_base_url and judge_model are required).
    needs_judge: bool = False
    # The metric `pixelrefer eval-compare` puts first and charts (None: the first metric of a run).
    headline_metric: str | None = None
    # Folder the annotation file's relative image / video paths start from; set by the runner before `load`
    # (`--image-root`; None: the annotation file's folder).
    image_root: Path | None = None
    # Video items: frames sampled per second of the source and at most this many (the official fps=1, 768).
    video_fps: float = 1.0
    max_frames: int = 768

    def load(self, data: Path) -> list[EvalItem]:
        """Read the benchmark's annotation file (or folder) into items; raise EvalDataError naming file and item."""
        raise NotImplementedError

    def score(self, records: list[dict[str, Any]], options: ScoreOptions) -> dict[str, Any]:
        """Metrics from prediction records: a flat dict of metric name to number, plus counts."""
        raise NotImplementedError
