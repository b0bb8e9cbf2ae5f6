"""The benchmarks of `pixelrefer eval` that need no LLM judge, and the registry of all of them.

Each reads its official annotation file (formats and prompts as in the official `PixelRefer/evaluation/` scripts):

| name | file | prompt | metrics |
|---|---|---|---|
| `lvis`, `paco` | Osprey's `lvis_val_1k_category.json` / `paco_val_1k_category.json` (COCO images) | the official ones | SSim, SIoU, avg |
| `vg` | `vg_val_5000.json` (VG images) | "Please describe <region> briefly." | BLEU, METEOR, ROUGE-L, CIDEr |
| `refl4` | `ref-l4-val.json` (JSON lines; the Objects365 part, as the official script) | "... in brief." | idem |
| `hc-stvg` | the processed HC-STVG json (videos) | "Please describe the object <region> in brief in the video." | idem |
| `videorefer-q` | `VideoRefer-Bench-Q.json` (frame folders) | question, options, "Answer with the option's letter ..." | accuracy |

The LLM-judge benchmarks come from `judged.py` when it is present (`JUDGED_BENCHMARKS`).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..processing_pixelrefer import check_region_placeholders
from .base import Benchmark, EvalDataError, EvalItem, ScoreOptions
from .metrics import caption_scores, category_scores, extract_option_letter, load_sentence_model, option_letters

# The official inference (`mm_infer`) decodes greedily with up to 2048 new tokens, whatever the benchmark; a model
# that stops early costs nothing more. `--max-new-tokens` lowers it.
OFFICIAL_GENERATION = {"max_new_tokens": 2048, "do_sample": False}

# ---------------------------------------------------------------------------------------------------------------------
# Reading annotation files
# ---------------------------------------------------------------------------------------------------------------------


def read_json(path: Path) -> Any:
    """A JSON file, or an EvalDataError naming it (missing, unreadable or malformed)."""
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except FileNotFoundError as error:
        raise EvalDataError("no such annotation file", file=path) from error
    except (OSError, UnicodeDecodeError) as error:
        raise EvalDataError(f"cannot read the annotation file: {error}", file=path) from error
    except json.JSONDecodeError as error:
        raise EvalDataError(
            f"malformed JSON at line {error.lineno}, column {error.colno}: {error.msg}", file=path
        ) from None


def read_json_lines(path: Path) -> list[tuple[int, Any]]:
    """`(line number, object)` of every non-blank line of a JSON-lines file; errors name the file and the line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError as error:
        raise EvalDataError("no such annotation file", file=path) from error
    except (OSError, UnicodeDecodeError) as error:
        raise EvalDataError(f"cannot read the annotation file: {error}", file=path) from error
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as error:
            raise EvalDataError(f"malformed JSON: {error.msg}", file=path, item=f"line {number}") from error
    return rows


def read_list(path: Path) -> list:
    data = read_json(path)
    if not isinstance(data, list):
        raise EvalDataError(f"expected a JSON list of entries, got {type(data).__name__}", file=path)
    return data


def field(entry: Any, key: str, path: Path, item: str, kind: type | tuple[type, ...] | None = None) -> Any:
    """`entry[key]`, or an EvalDataError naming the file, the item and the missing / mistyped field."""
    if not isinstance(entry, dict):
        raise EvalDataError(f"expected a JSON object, got {type(entry).__name__}", file=path, item=item)
    if key not in entry:
        raise EvalDataError(f"missing field {key!r}", file=path, item=item)
    value = entry[key]
    if kind is not None and not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise EvalDataError(f"field {key!r} must be {names}, got {type(value).__name__}", file=path, item=item)
    return value


def media_path(root: Path, relative: str, subfolders: Iterable[str] = ()) -> str:
    """`root / relative`, or the first of `root / sub / relative` that exists (COCO's train2017 / val2017 split
    folders). When none exists, the plain join: the run then reports that file missing for that item."""
    candidates = [root / relative, *(root / sub / relative for sub in subfolders)]
    return str(next((path for path in candidates if path.exists()), candidates[0]))


def segmentation_region(segmentation: Any, path: Path, item: str) -> Any:
    """A COCO `segmentation` (polygon list, or RLE dict with compressed or uncompressed counts) as a pipeline region.
    Decoding happens in the pipeline, which names the item when the mask does not decode."""
    if isinstance(segmentation, list):
        return {"polygons": segmentation}
    if isinstance(segmentation, dict):
        return segmentation
    raise EvalDataError(
        f"a segmentation must be a polygon list or an RLE dict, got {type(segmentation).__name__}", file=path, item=item
    )


def xywh_box(box: Any, path: Path, item: str) -> list[int]:
    """An `[x, y, w, h]` box -> the `[x0, y0, x1, y1]` box of the official scripts' box mask
    (`mask[y : y + h, x : x + w] = 1` after int(), negative starts clipped to 0)."""
    if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
        raise EvalDataError(f"a box must be [x, y, w, h] (4 numbers), got {box!r}", file=path, item=item)
    x, y, w, h = (int(v) for v in box)
    return [max(0, x), max(0, y), x + w, y + h]


def counts(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The records without errors, and the item / error / scored counts every benchmark reports."""
    good = [record for record in records if not record.get("error")]
    return good, {"items": len(records), "errors": len(records) - len(good), "scored": len(good)}


# ---------------------------------------------------------------------------------------------------------------------
# Category recognition: LVIS and PACO
# ---------------------------------------------------------------------------------------------------------------------

_SENTENCE_MODELS: dict[str, Any] = {}
# Osprey's files name COCO images without their split folder.
COCO_SPLITS = ("train2017", "val2017")


def sentence_model(options: ScoreOptions):
    """One loaded SSim model per process and model path."""
    key = options.ssim_model or ""
    if key not in _SENTENCE_MODELS:
        _SENTENCE_MODELS[key] = load_sentence_model(options.ssim_model)
    return _SENTENCE_MODELS[key]


class AnnotationFileBenchmark(Benchmark):
    """A benchmark read from one annotation file, entry by entry: `entries` lists `(index, entry)`, `entry_items`
    turns one entry into its items. Media paths are relative to `image_root` (default: the file's folder); item ids
    must be unique, since they key predictions.jsonl."""

    def load(self, data: Path) -> list[EvalItem]:
        data = Path(data)
        root = Path(self.image_root) if self.image_root is not None else data.parent
        items = [item for index, entry in self.entries(data) for item in self.entry_items(entry, index, data, root)]
        seen = set()
        for item in items:
            if item.id in seen:
                raise EvalDataError("duplicate id", file=data, item=item.id)
            seen.add(item.id)
        return items

    def entries(self, data: Path) -> Iterable[tuple[int, Any]]:
        return enumerate(read_list(data))

    def entry_items(self, entry: Any, index: int, data: Path, root: Path) -> list[EvalItem]:
        raise NotImplementedError


class CategoryBenchmark(AnnotationFileBenchmark):
    """Osprey's category files: one entry per COCO image, its regions' `categories[i]` and
    `annotations[i]["segmentation"]`; one question per region."""

    question = "What is the category of <region>? Using only one word or phrase."
    generation_kwargs = OFFICIAL_GENERATION
    headline_metric = "avg"

    def entry_items(self, entry: Any, index: int, data: Path, root: Path) -> list[EvalItem]:
        items = []
        where = f"entry {index}"
        file_name = field(entry, "file_name", data, where, str)
        categories = field(entry, "categories", data, where, list)
        annotations = field(entry, "annotations", data, where, list)
        if len(categories) != len(annotations):
            raise EvalDataError(
                f"{len(categories)} categories but {len(annotations)} annotations", file=data, item=where
            )
        image = media_path(root, file_name, COCO_SPLITS)
        for region_index, (category, annotation) in enumerate(zip(categories, annotations)):
            item_id = f"{index}-{region_index}"
            if not isinstance(category, str):
                raise EvalDataError("the category must be a string", file=data, item=item_id)
            segmentation = field(annotation, "segmentation", data, item_id)
            items.append(
                EvalItem(
                    id=item_id,
                    question=self.question,
                    regions=[segmentation_region(segmentation, data, item_id)],
                    image=image,
                    reference=category,
                    meta={"file_name": file_name, "searched": [str(root / s) for s in COCO_SPLITS]},
                )
            )
        return items

    def score(self, records: list[dict[str, Any]], options: ScoreOptions) -> dict[str, Any]:
        good, tally = counts(records)
        if not good:
            return tally
        predictions = [record["prediction"] or "" for record in good]
        answers = [record["reference"] for record in good]
        return {**category_scores(predictions, answers, sentence_model(options)), **tally}


class LVISCategory(CategoryBenchmark):
    name = "lvis"
    description = "LVIS category recognition (Osprey's lvis_val_1k_category.json, COCO images): SSim / SIoU"


class PACOCategory(CategoryBenchmark):
    name = "paco"
    description = "PACO part / category recognition (Osprey's paco_val_1k_category.json, COCO images): SSim / SIoU"
    question = (
        "What is the category of <region>? It maybe a subpart of an object. If it is a subpart, output in the format "
        "of 'category:subcategory', else just output the category."
    )


# ---------------------------------------------------------------------------------------------------------------------
# Brief captions: VG, Ref-L4, HC-STVG
# ---------------------------------------------------------------------------------------------------------------------


class CaptionBenchmark(AnnotationFileBenchmark):
    """A brief caption per region, scored with the COCO caption metrics against the item's reference caption(s)."""

    generation_kwargs = OFFICIAL_GENERATION
    headline_metric = "cider"

    def caption_item(self, item_id: str, region: Any, caption: str, meta: dict, **media: str) -> EvalItem:
        """The one question of an entry: its region, described against its reference caption (`image=` or
        `video=` the media path)."""
        return EvalItem(id=item_id, question=self.question, regions=[region], reference=[caption], meta=meta, **media)

    def prepare_predictions(
        self, records: list[dict[str, Any]], options: ScoreOptions
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The records as scored, and anything to report beside the metrics. A hook: a judge variant of Ref-L4
        shortens long predictions here (`judged.shorten_ref_l4_predictions` has this signature)."""
        return records, {}

    def score(self, records: list[dict[str, Any]], options: ScoreOptions) -> dict[str, Any]:
        good, tally = counts(records)
        if not good:
            return tally
        good, extra = self.prepare_predictions(good, options)
        predictions = {record["id"]: record["prediction"] or "" for record in good}
        references = {
            record["id"]: record["reference"] if isinstance(record["reference"], list) else [record["reference"]]
            for record in good
        }
        return {**caption_scores(predictions, references, spice=options.spice), **extra, **tally}


class VGCaptions(CaptionBenchmark):
    name = "vg"
    description = "Visual Genome brief region captions (vg_val_5000.json): BLEU-4, METEOR, ROUGE-L, CIDEr"
    question = "Please describe <region> briefly."

    def entry_items(self, entry: Any, index: int, data: Path, root: Path) -> list[EvalItem]:
        item_id = str(index)
        images = field(entry, "image", data, item_id, (list, str))
        image = images[0] if isinstance(images, list) and images else images
        if not isinstance(image, str):
            raise EvalDataError("field 'image' must name an image file", file=data, item=item_id)
        caption = field(entry, "caption", data, item_id, str)
        boxes = field(entry, "boxes", data, item_id, list)
        if not boxes:
            raise EvalDataError("field 'boxes' is empty", file=data, item=item_id)
        # The official script asks about the box (as a mask), not about the entry's segmentation.
        return [
            self.caption_item(
                item_id,
                xywh_box(boxes[0], data, item_id),
                caption,
                image=media_path(root, image),
                meta={"file_name": image},
            )
        ]


class RefL4Brief(CaptionBenchmark):
    """Ref-L4 brief captions without the judge step.

    The paper shortens predictions of more than 5 words with a GPT judge and scores against GPT-shortened references
    (`refl4_gt.json`); this variant scores the raw predictions against the question file's captions, so its numbers
    are not the paper's. A judge variant overrides `prepare_predictions` (and the references) to add that step."""

    name = "refl4"
    description = "Ref-L4 brief region captions (ref-l4-val.json, Objects365 part), without the judge shortening"
    question = "Please describe <region> in brief."
    # The official script keeps only the Objects365 images of the file.
    source_filter = "objects365"

    def entries(self, data: Path) -> Iterable[tuple[int, Any]]:
        return read_json_lines(data)  # one JSON object per line, indexed by line number

    def entry_items(self, entry: Any, index: int, data: Path, root: Path) -> list[EvalItem]:
        item_id = f"line{index}"
        file_name = field(entry, "file_name", data, item_id, str)
        if self.source_filter and self.source_filter not in file_name:
            return []
        caption = field(entry, "caption", data, item_id, str)
        box = xywh_box(field(entry, "bbox", data, item_id), data, item_id)
        return [
            self.caption_item(item_id, box, caption, image=media_path(root, file_name), meta={"file_name": file_name})
        ]


def frame_key(value: Any, path: Path, item: str) -> int:
    """A frame index given as an int or a digit string ("57"), as the video benchmarks write them."""
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().isdigit():
        raise EvalDataError(f"a frame index must be a non-negative integer, got {value!r}", file=path, item=item)
    return int(value)


def video_source(root: Path, relative: str) -> str:
    """A video file or frame folder under `root` (the runner tells the two apart when it reads it)."""
    return str(root / relative)


class HCSTVGCaptions(CaptionBenchmark):
    name = "hc-stvg"
    description = "HC-STVG brief video object captions (processed json; videos): BLEU-4, METEOR, ROUGE-L, CIDEr"
    question = "Please describe the object <region> in brief in the video."

    def entry_items(self, entry: Any, index: int, data: Path, root: Path) -> list[EvalItem]:
        item_id = str(index)
        video = field(entry, "video", data, item_id, str)
        frame = frame_key(field(entry, "frame_idx", data, item_id), data, item_id)
        mask = segmentation_region(field(entry, "mask", data, item_id), data, item_id)
        caption = field(entry, "caption", data, item_id, str)
        return [
            self.caption_item(
                item_id,
                {frame: mask},
                caption,
                video=video_source(root, video),
                meta={"video": video, "frame_idx": frame},
            )
        ]


# ---------------------------------------------------------------------------------------------------------------------
# Multiple choice: VideoRefer-Bench-Q
# ---------------------------------------------------------------------------------------------------------------------


def metric_slug(text: str) -> str:
    """A question type as a metric-name suffix: "Future Predictions" -> "future_predictions"."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


class VideoReferQ(AnnotationFileBenchmark):
    """VideoRefer-Bench-Q: a question about one or more objects (`<region>` each), its options, and the mask of every
    object on the frame `frame_idx` (the single-frame mode PixelRefer is evaluated in)."""

    name = "videorefer-q"
    description = "VideoRefer-Bench-Q multiple choice on videos (VideoRefer-Bench-Q.json): accuracy per type"
    instruction = "Answer with the option's letter from the given choices directly."
    generation_kwargs = OFFICIAL_GENERATION
    headline_metric = "accuracy"
    # PixelRefer is evaluated with each object's mask on `frame_idx` only; PixelRefer-Lite with every annotated frame
    # (`VideoRefer-Bench-Q-allframe.json`, the `videorefer-q-allframe` benchmark).
    all_frames = False
    _TYPES = ("basic_questions", "sequential_questions", "relationship_questions", "reasoning_questions")
    _TYPES += ("future_predictions",)

    def entry_items(self, entry: Any, index: int, data: Path, root: Path) -> list[EvalItem]:
        items = []
        item_id = str(entry.get("id", index)) if isinstance(entry, dict) else str(index)
        video = field(entry, "video", data, item_id, str)
        question = field(entry, "Question", data, item_id, str)
        options = field(entry, "options", data, item_id, list)
        if not options or not all(isinstance(option, str) for option in options):
            raise EvalDataError("field 'options' must be a non-empty list of strings", file=data, item=item_id)
        answer = field(entry, "Answer", data, item_id, str)
        question_type = field(entry, "type", data, item_id, str)
        frame = frame_key(field(entry, "frame_idx", data, item_id), data, item_id)
        annotations = field(entry, "annotation", data, item_id, list)
        regions = []
        for object_index, annotation in enumerate(annotations):
            where = f"{item_id}, object {object_index}"
            if not isinstance(annotation, dict):
                raise EvalDataError("an annotation must be {frame: {segmentation}}", file=data, item=where)
            if self.all_frames:
                region = {}
                for key, on_frame in annotation.items():
                    segmentation = field(on_frame, "segmentation", data, f"{where}, frame {key}")
                    if segmentation:  # frames where the object is absent have no mask
                        region[frame_key(key, data, where)] = segmentation_region(segmentation, data, where)
                if not region:
                    raise EvalDataError("the object has no mask on any frame", file=data, item=where)
                regions.append(dict(sorted(region.items())))
                continue
            on_frame = annotation.get(str(frame), annotation.get(frame))
            if on_frame is None:
                raise EvalDataError(f"no mask on frame_idx {frame}", file=data, item=where)
            segmentation = field(on_frame, "segmentation", data, where)
            regions.append({frame: segmentation_region(segmentation, data, where)})
        try:
            check_region_placeholders("", question, len(regions))
        except ValueError as error:
            raise EvalDataError(f"{error} (one per annotated object)", file=data, item=item_id) from error
        items.append(
            EvalItem(
                id=item_id,
                question=f"{question} {' '.join(options)}. {self.instruction}",
                regions=regions,
                video=video_source(root, video),
                reference=answer,
                meta={"type": question_type, "letters": option_letters(options), "video": video},
            )
        )
        return items

    def score(self, records: list[dict[str, Any]], options: ScoreOptions) -> dict[str, Any]:
        good, tally = counts(records)
        if not good:
            return tally
        right: dict[str, int] = {}
        total: dict[str, int] = {}
        unparsed = 0
        for record in good:
            letters = record["meta"].get("letters")
            expected = extract_option_letter(record["reference"], letters) or record["reference"].strip()[:1]
            predicted = extract_option_letter(record["prediction"], letters)
            unparsed += predicted is None
            question_type = metric_slug(record["meta"].get("type", "all"))
            total[question_type] = total.get(question_type, 0) + 1
            right[question_type] = right.get(question_type, 0) + (
                predicted is not None and predicted.lower() == expected.lower()
            )
        metrics: dict[str, Any] = {name: 100 * right[name] / total[name] for name in sorted(total)}
        metrics["accuracy"] = 100 * sum(right.values()) / sum(total.values())
        metrics["no_option_letter"] = unparsed
        return {**metrics, **tally}


class VideoReferQAllFrames(VideoReferQ):
    name = "videorefer-q-allframe"
    description = "VideoRefer-Bench-Q with every annotated frame's mask (PixelRefer-Lite's protocol, *-allframe.json)"
    all_frames = True


# ---------------------------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------------------------


# The LLM-judge benchmarks live in `judged.py`, written separately; without that module there are none. An
# ImportError raised inside it (e.g. a missing dependency) is a real error and propagates.
try:
    from .judged import JUDGED_BENCHMARKS
except ImportError as error:
    if error.name != f"{__package__}.judged":
        raise
    JUDGED_BENCHMARKS: list[Benchmark | type[Benchmark]] = []


BUILTIN_BENCHMARKS: list[type[Benchmark]] = [LVISCategory, PACOCategory, VGCaptions, RefL4Brief, HCSTVGCaptions]
BUILTIN_BENCHMARKS += [VideoReferQ, VideoReferQAllFrames]


def benchmark_classes() -> dict[str, Benchmark | type[Benchmark]]:
    """Every benchmark by its command-line name: a class, or an instance (the judged module registers configured
    instances, e.g. one benchmark class under two names)."""
    classes: dict[str, Benchmark | type[Benchmark]] = {}
    for entry in [*BUILTIN_BENCHMARKS, *JUDGED_BENCHMARKS]:
        if entry.name in classes:
            raise ValueError(f"two benchmarks are named {entry.name!r}")
        classes[entry.name] = entry
    return classes


def get_benchmark(name: str) -> Benchmark:
    """A fresh benchmark object for `name` (the runner sets options such as `image_root` on it); a ValueError
    listing the names for an unknown one."""
    classes = benchmark_classes()
    if name not in classes:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {', '.join(classes)}")
    entry = classes[name]
    return entry() if isinstance(entry, type) else copy.copy(entry)
