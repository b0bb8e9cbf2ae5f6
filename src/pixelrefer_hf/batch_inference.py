"""Offline batch inference with Ray Data: `pixelrefer batch --model M --data DATASET --out DIR`.

    pixelrefer batch --model path/to/checkpoint --data regions.parquet --out runs/answers --num-workers 4
    pixelrefer batch --model M --data lvis_val_1k_category.json --benchmark lvis --image-root coco --out runs/lvis

The data is either

* a region-chat dataset (the schema of `pixelrefer_hf.data`: `id`, `image` / `frames` + `timestamps`, `regions`,
  `messages`), as parquet (a file or a folder of files, read in parallel by Ray) or a `datasets` `save_to_disk`
  folder. Every user turn is one question; its `<region>` placeholders take the row's regions in order (as the
  training collator reads them), and the next assistant turn, if any, is kept as the reference. A row with one user
  turn gives the item id `ROW_ID`, a row with several `ROW_ID#0`, `ROW_ID#1`, ... (each turn is asked on its own,
  without the earlier turns);
* an evaluation annotation file (`--benchmark NAME`, any `pixelrefer eval` benchmark), read by its benchmark class,
  with its official prompts and generation settings; item ids are the benchmark's.

Actors each hold one model (`--num-workers` of them; one GPU each when the cluster has GPUs) and answer batches of
`--batch-size` items with the region-qa pipeline, so the answers are the single-process pipeline's. Results are
JSON-lines (or parquet) shards `answers_*.jsonl` under OUT with the fields `id`, `answer`, `error`, `question`,
`reference` and `meta` (JSON text, evaluation items only). A rerun reads the ids already in OUT's shards and skips
them, so an interrupted job resumes (a torn last line of a shard is dropped and its item asked again; an item that
failed is recorded with its `error` and counts as done). `batch.json` in OUT records the model, the data and the runs.

Not remote code. Needs the `serve` extra (Ray Data).
"""

from __future__ import annotations

import datetime
import json
import os
import re
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from transformers.utils import logging

from .ray_utils import actor_resources, require_ray

logger = logging.get_logger(__name__)

SUMMARY_FILE = "batch.json"
SHARD_PREFIX = "answers"
OUTPUT_FORMATS = ("jsonl", "parquet")
OUTPUT_FIELDS = ("id", "answer", "error", "question", "reference", "meta")
DEFAULT_MAX_NEW_TOKENS = 128
_MEDIA_TAGS = re.compile(r"<image>|<video>")


def _output_schema():
    import pyarrow as pa

    return pa.schema([(name, pa.string()) for name in OUTPUT_FIELDS])


# ---------------------------------------------------------------------------------------------------------------------
# Items: region-chat rows and evaluation items -> pipeline items with ids
# ---------------------------------------------------------------------------------------------------------------------


def _user_turns(row: dict) -> list[tuple[int, dict]]:
    messages = row.get("messages") or []
    return [(k, message) for k, message in enumerate(messages) if message.get("role") == "user"]


def row_item_ids(row: dict) -> list[str]:
    """The item ids of a region-chat row: its id for one user turn, `id#k` for the k-th of several."""
    turns = _user_turns(row)
    row_id = str(row.get("id"))
    if len(turns) <= 1:
        return [row_id]
    return [f"{row_id}#{k}" for k in range(len(turns))]


def _media_source(media: Any, media_root: str | None) -> Any:
    """A stored image (`{"bytes", "path"}` or a path) with a relative path resolved against `media_root`."""
    if isinstance(media, dict) and media.get("bytes") is None and media.get("path"):
        path = media["path"]
        if media_root is not None and not os.path.isabs(path):
            path = os.path.join(media_root, path)
        return {"bytes": None, "path": path}
    return media


def region_chat_items(row: dict, media_root: str | None = None) -> list[dict]:
    """A region-chat row -> one entry per user turn: `{"id", "question", "reference", "item" | "error"}`, where
    `item` is a region-qa pipeline item and `error` says why the turn cannot be asked."""
    from .data import row_regions
    from .processing_pixelrefer import check_region_placeholders

    ids = row_item_ids(row)
    where = f"row {row.get('id')!r}"
    turns = _user_turns(row)
    if not turns:
        return [{"id": ids[0], "question": None, "reference": None, "error": f"{where}: no user turn to answer"}]
    messages = row.get("messages") or []
    questions = [_MEDIA_TAGS.sub("", message.get("content") or "").strip() for _, message in turns]
    references = []
    for k, _ in turns:
        following = messages[k + 1] if k + 1 < len(messages) else None
        references.append(following.get("content") if following and following.get("role") == "assistant" else None)
    entries = [{"id": i, "question": q, "reference": r} for i, q, r in zip(ids, questions, references, strict=True)]
    try:
        regions = row_regions(row)
        check_region_placeholders(where, questions, len(regions))
        wanted = [question.count("<region>") for question in questions]
    except ValueError as error:
        message = str(error) if str(error).startswith(where) else f"{where}: {error}"
        return [{**entry, "error": message} for entry in entries]
    frames = row.get("frames") or []
    if frames:
        timestamps = row.get("timestamps") or None
        media = {"video": [_media_source(frame, media_root) for frame in frames], "video_timestamps": timestamps}
    else:
        media = {"image": _media_source(row.get("image"), media_root)}
    start = 0
    for entry, question, count in zip(entries, questions, wanted, strict=True):
        entry["item"] = {**media, "question": question, "regions": regions[start : start + count]}
        start += count
    return entries


def _encode_int_keys(value: Any) -> Any:
    """JSON keeps only string keys; a video region's `{frame_index: region}` is tagged so it comes back with ints."""
    if isinstance(value, dict):
        if value and all(isinstance(key, int) and not isinstance(key, bool) for key in value):
            return {"__frames__": [[key, _encode_int_keys(item)] for key, item in value.items()]}
        return {key: _encode_int_keys(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode_int_keys(item) for item in value]
    return value


def _decode_int_keys(value: dict) -> Any:
    if set(value) == {"__frames__"}:
        return {int(key): item for key, item in value["__frames__"]}
    return value


def eval_item_to_json(item) -> str:
    return json.dumps(_encode_int_keys(asdict(item)))


def eval_item_from_json(text: str):
    from .evaluation.base import EvalItem

    return EvalItem(**json.loads(text, object_hook=_decode_int_keys))


# ---------------------------------------------------------------------------------------------------------------------
# The actor
# ---------------------------------------------------------------------------------------------------------------------


class RegionQAWorker:
    """A Ray Data actor: one region-qa pipeline; each call answers one batch of rows (region-chat rows, or
    evaluation items as JSON) and returns one output record per item, ids already in `done` left out."""

    def __init__(
        self,
        model: str,
        generate_kwargs: dict[str, Any],
        done: Iterable[str] = (),
        benchmark: str | None = None,
        fps: float | None = None,
        max_frames: int | None = None,
        media_root: str | None = None,
        device: str | None = None,
        dtype: str = "auto",
    ):
        from .cli import load_region_qa_pipeline

        self.pipe = load_region_qa_pipeline(model, device, dtype)
        self.generate_kwargs = dict(generate_kwargs)
        self.done = set(done)
        self.media_root = media_root
        self.benchmark = None
        if benchmark is not None:
            from .evaluation.benchmarks import get_benchmark
            from .evaluation.runner import EvalOptions

            self.benchmark = get_benchmark(benchmark)
            self.eval_options = EvalOptions(model=model, data="", out="", fps=fps, max_frames=max_frames)

    def __call__(self, batch):
        import pyarrow as pa

        rows = batch.to_pylist()
        records = self._eval_records(rows) if self.benchmark is not None else self._region_chat_records(rows)
        return pa.Table.from_pylist(records, schema=_output_schema())

    def _region_chat_records(self, rows: list[dict]) -> list[dict]:
        entries = [
            entry for row in rows for entry in region_chat_items(row, self.media_root) if entry["id"] not in self.done
        ]
        asked = [entry for entry in entries if "error" not in entry]
        outputs = iter(
            self.pipe(
                [entry["item"] for entry in asked], batch_size=len(asked), skip_bad_items=True, **self.generate_kwargs
            )
            if asked
            else []
        )
        records = []
        for entry in entries:
            answer, error = None, entry.get("error")
            if error is None:
                output = next(outputs)
                answer, error = output.get("answer"), output.get("error")
                if error is not None:
                    error = re.sub(r"^item \d+: ", f"row item {entry['id']!r}: ", error)
            records.append(
                {
                    "id": entry["id"],
                    "answer": answer,
                    "error": error,
                    "question": entry["question"],
                    "reference": entry["reference"],
                    "meta": None,
                }
            )
        return records

    def _eval_records(self, rows: list[dict]) -> list[dict]:
        from .evaluation.runner import answer_batch

        items = [eval_item_from_json(row["item"]) for row in rows if row["id"] not in self.done]
        if not items:
            return []
        # The evaluation runner's own batch step: video sampling, the official prompts, per-item errors.
        records, _ = answer_batch(self.pipe, items, self.benchmark, self.eval_options, self.generate_kwargs)
        return [
            {
                "id": record["id"],
                "answer": record["prediction"],
                "error": record["error"],
                "question": record["question"],
                "reference": json.dumps(record["reference"], ensure_ascii=False),
                "meta": json.dumps(record["meta"], ensure_ascii=False),
            }
            for record in records
        ]


# ---------------------------------------------------------------------------------------------------------------------
# Output folder: finished ids, summary
# ---------------------------------------------------------------------------------------------------------------------


def shard_paths(out: str | Path) -> list[Path]:
    out = Path(out)
    if not out.is_dir():
        return []
    return sorted(path for path in out.iterdir() if path.name.startswith(SHARD_PREFIX) and path.is_file())


def read_output_records(out: str | Path) -> list[dict[str, Any]]:
    """Every record of OUT's shards (the first of each id). A JSON-lines shard's torn last line (a write cut short)
    is dropped; a parquet shard that cannot be read (cut short too) is renamed `*.torn` and its items redone."""
    from .evaluation.runner import read_records

    seen, records = set(), []
    for path in shard_paths(out):
        if path.suffix == ".jsonl":
            shard_records = read_records(path)
        elif path.suffix == ".parquet":
            import pyarrow.parquet as pq

            try:
                shard_records = pq.read_table(path).to_pylist()
            except Exception as error:  # a parquet file without its footer: pyarrow raises ArrowInvalid or OSError
                logger.warning(f"{path}: unreadable parquet shard ({error}); renamed to .torn, its items are redone")
                path.rename(path.with_name(path.name + ".torn"))
                continue
        else:
            continue
        for record in shard_records:
            if record["id"] not in seen:
                seen.add(record["id"])
                records.append(record)
    return records


# ---------------------------------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------------------------------


def _is_save_to_disk_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists())


def _region_chat_dataset(data: Path):
    """Ray dataset of the region-chat rows in `data` (parquet file / folder, or a `save_to_disk` folder)."""
    import ray.data

    if _is_save_to_disk_folder(data):
        import datasets

        loaded = datasets.load_from_disk(str(data))
        if isinstance(loaded, datasets.DatasetDict):
            raise ValueError(f"--data {data}: a DatasetDict; give the folder of one split ({', '.join(loaded)})")
        return ray.data.from_huggingface(loaded)
    return ray.data.read_parquet([str(path) for path in _parquet_files(data)])


def _parquet_files(data: Path) -> list[Path]:
    if data.is_file():
        return [data] if data.suffix == ".parquet" else []
    return sorted(data.rglob("*.parquet")) if data.is_dir() else []


def run_batch(
    model: str,
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    benchmark: str | None = None,
    image_root: str | None = None,
    num_workers: int = 1,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    num_cpus_per_worker: float | None = None,
    num_gpus_per_worker: float | None = None,
    output_format: str = "jsonl",
    limit: int | None = None,
    fps: float | None = None,
    max_frames: int | None = None,
    device: str | None = None,
    dtype: str = "auto",
    address: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Answer every item of `data` not yet in `out` with `num_workers` Ray actors; returns the summary written to
    `out/batch.json` (items answered by this run, records and errors in `out` altogether).

    `benchmark`: read `data` as that `pixelrefer eval` benchmark's annotation file (`image_root` as `--image-root`);
    without it `data` is a region-chat dataset whose relative image paths start at `image_root` (default: its
    folder). Resources per actor: `num_gpus_per_worker` (default 1 when the cluster has GPUs) and
    `num_cpus_per_worker` (default 1 without GPUs). Connects to the Ray cluster at `address` (or starts a local one)
    unless Ray is already initialised."""
    require_ray("pixelrefer batch", ("ray", "ray.data"))
    import ray
    import ray.data

    from .evaluation.runner import read_matching_record, repair_tail

    for name, value in (("num_workers", num_workers), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be at least 1, got {limit}")
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"--format must be one of {OUTPUT_FORMATS}, got {output_format!r}")
    data_path = Path(data).resolve()
    if not data_path.exists():
        raise ValueError(f"--data {data}: no such file or folder")
    if benchmark is None and not (_is_save_to_disk_folder(data_path) or _parquet_files(data_path)):
        raise ValueError(
            f"--data {data}: not a region-chat dataset (parquet files or a `save_to_disk` folder); for an evaluation "
            "annotation file give --benchmark NAME"
        )
    out_path = Path(out)
    expected = {"model": model, "data": str(data_path), "benchmark": benchmark}
    previous = read_matching_record(out_path / SUMMARY_FILE, expected, out_path)
    for path in shard_paths(out_path):
        if path.suffix == ".jsonl":
            # A torn last line (a write cut short) is cut off, so that every shard stays valid JSON lines.
            repair_tail(path)

    if not ray.is_initialized():
        ray.init(address=address)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = progress
    context.enable_operator_progress_bars = progress

    done = {record["id"] for record in read_output_records(out_path)}
    generate_kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens or DEFAULT_MAX_NEW_TOKENS}
    if benchmark is not None:
        from .evaluation.benchmarks import get_benchmark
        from .evaluation.runner import group_by_media

        bench = get_benchmark(benchmark)
        if image_root is not None:
            bench.image_root = Path(image_root)
        items = bench.load(data_path)
        if limit is not None:
            items = items[:limit]
        generate_kwargs = {**bench.generation_kwargs, **({"max_new_tokens": max_new_tokens} if max_new_tokens else {})}
        # Questions about one image next to each other, so that a batch shares its encoding.
        rows = [
            {"id": item.id, "item": eval_item_to_json(item)} for item in group_by_media(items) if item.id not in done
        ]
        dataset = ray.data.from_items(rows) if rows else None
        media_root = None
    else:
        dataset = _region_chat_dataset(data_path)
        if limit is not None:
            dataset = dataset.limit(limit)
        missing = {"id", "messages", "regions"} - set(dataset.schema().names)
        if missing:
            raise ValueError(f"--data {data}: not a region-chat dataset, no column(s) {sorted(missing)}")
        if done:
            dataset = dataset.filter(_NotFinished(done))
        media_root = image_root or str(data_path if data_path.is_dir() else data_path.parent)

    resources = actor_resources(num_cpus_per_worker, num_gpus_per_worker)

    out_path.mkdir(parents=True, exist_ok=True)
    summary = {
        "model": model,
        "data": str(data_path),
        "benchmark": benchmark,
        "started": (previous or {}).get("started") or datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "runs": (previous or {}).get("runs", 0) + 1,
        "options": {
            "num_workers": num_workers,
            "batch_size": batch_size,
            "generate": generate_kwargs,
            "output_format": output_format,
            **resources,
        },
    }
    (out_path / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    if dataset is not None:
        answers = dataset.map_batches(
            RegionQAWorker,
            fn_constructor_kwargs={
                "model": model,
                "generate_kwargs": generate_kwargs,
                "done": sorted(done),
                "benchmark": benchmark,
                "fps": fps,
                "max_frames": max_frames,
                "media_root": media_root,
                "device": device,
                "dtype": dtype,
            },
            batch_size=batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=num_workers),
            **resources,
        )
        from ray.data.datasource import FilenameProvider

        names = FilenameProvider(dataset_uuid=SHARD_PREFIX, file_format=output_format)
        if output_format == "jsonl":
            answers.write_json(str(out_path), filename_provider=names, force_ascii=False)
        else:
            answers.write_parquet(str(out_path), filename_provider=names)

    records = read_output_records(out_path)
    summary.update(
        finished=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        answered_this_run=len(records) - len(done),
        records=len(records),
        errors=sum(1 for record in records if record.get("error")),
    )
    (out_path / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


class _NotFinished:
    """Row filter: keep a region-chat row while any of its items has no record yet."""

    def __init__(self, done: set[str]):
        self.done = done

    def __call__(self, row: dict) -> bool:
        return not all(item_id in self.done for item_id in row_item_ids(row))


__all__ = ["RegionQAWorker", "read_output_records", "region_chat_items", "row_item_ids", "run_batch"]
