"""Benchmarks scored by an LLM judge: DLC-Bench, VideoRefer-Bench-D, Ferret-Bench reasoning, Ref-L4 CLAIR.

Each benchmark reads the official annotation files, asks the official question, and scores with the official judge
instructions and parsing rules (PixelRefer's `PixelRefer/evaluation/` and DAM's `evaluation/`), re-implemented here.
The judging prompts are kept word for word: with an LLM judge the wording is part of the metric. Where the official
scripts have a bug, the code does what they meant and says so in a comment.

Counting rules shared by all of them:

* a prediction record with `error` set or no prediction is counted in `errors` and left out of every average;
* a judge reply that the official rule cannot read is counted in `unparsed` and left out (DLC-Bench's multiple-choice
  answers are the exception, because the official rule itself defines them: an unreadable answer means "not
  mentioned" and scores 0; they are still counted in `unparsed`);
* the judge that scored is returned under `judge` (base URL, model, temperature, requests sent, cache hits).

Scores are on the paper's scales: DLC-Bench, CLAIR and Ferret in percent, VideoRefer-Bench-D from 0 to 5.
`shorten_ref_l4_predictions` is the judge step that Ref-L4's caption metrics run before scoring.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from ..region_utils import rle_decode
from .base import Benchmark, EvalDataError, EvalItem, ScoreOptions
from .judge import Judge, JudgeRequest, system_message, user_message

# The official inference (`mm_infer`) decodes greedily with up to 2048 new tokens for every benchmark here.
OFFICIAL_GENERATION = {"max_new_tokens": 2048, "do_sample": False}

# ---------------------------------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise EvalDataError("file not found", file=path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise EvalDataError(f"not valid JSON ({error})", file=path) from None


def _read_json_lines(path: Path) -> list[Any]:
    """A JSON Lines file (one object a line), or a JSON array for files that were saved whole."""
    if not path.is_file():
        raise EvalDataError("file not found", file=path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise EvalDataError(f"cannot be read ({error})", file=path) from None
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except ValueError as error:
            raise EvalDataError(f"not valid JSON ({error})", file=path) from None
        return rows
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError as error:
            raise EvalDataError(f"line {number} is not valid JSON ({error})", file=path) from None
    return rows


def _annotation_file(data: Path, name: str) -> Path:
    """`data` is the benchmark folder holding `name`, or the annotation file itself."""
    data = Path(data)
    return data if data.is_file() else data / name


def _expect(condition: bool, message: str, file: Path, item: str | None = None) -> None:
    if not condition:
        raise EvalDataError(message, file=file, item=item)


def _existing_media(candidates: list[Path], file: Path, item: str) -> str:
    for candidate in candidates:
        if candidate.exists():
            return str(candidate)
    raise EvalDataError(f"media not found (looked for {', '.join(str(c) for c in candidates)})", file=file, item=item)


def _mask_region(segmentation: Any, file: Path, item: str) -> Any:
    """A COCO segmentation as a pipeline region: RLE dicts as they are, polygon lists as `{"polygons": ...}`."""
    if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        return segmentation
    if isinstance(segmentation, list) and segmentation and all(isinstance(p, list) for p in segmentation):
        return {"polygons": segmentation}
    raise EvalDataError("segmentation must be a COCO RLE dict or a list of polygons", file=file, item=item)


def _split_records(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """Records that can be judged, and how many failed at inference (counted, never scored)."""
    usable = [r for r in records if r.get("error") is None and isinstance(r.get("prediction"), str)]
    return usable, len(records) - len(usable)


def _require(condition: bool, record: dict[str, Any], message: str) -> None:
    """A prediction record that lacks what its benchmark's items carry (a reference, a meta field) cannot be judged."""
    if not condition:
        raise EvalDataError(f"prediction record {message}", item=str(record.get("id")))


def _counts(records: list, scored: int, errors: int, unparsed: int, judge) -> dict:
    """The counts every judged benchmark reports beside its metrics, and the judge that scored."""
    return {"items": len(records), "scored": scored, "errors": errors, "unparsed": unparsed, "judge": judge.describe()}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


class JudgedBenchmark(Benchmark):
    """A benchmark scored by an LLM judge, answered with the official generation settings."""

    needs_judge = True
    generation_kwargs = OFFICIAL_GENERATION


# ---------------------------------------------------------------------------------------------------------------------
# DLC-Bench
# ---------------------------------------------------------------------------------------------------------------------

DLC_QUESTION = "Please describe the region <region> in the image in detail. Do not describe anything else."
# DAM's `prompt_eval` (evaluation/eval_model_outputs.py), word for word: the judge answers one multiple-choice
# question at a time from the description alone.
DLC_JUDGE_PROMPT = (
    "Answer the multiple-choice question based on the text description of an object in an image. "
    "You need to follow these rules:\n"
    "1. Do not output any reasoning. Do not perform correction. Please output exactly one answer from the choices "
    "for each question. Do not repeat the question.\n"
    "2. There is no need for exact matching. Please choose the closest option based on the description.\n"
    "\n"
    "The description is:\n"
    "{description}\n"
    "\n"
    "From the description above, please answer the following question with one of the choices:\n"
    "{question}\n"
)
DLC_CHOICE_LETTERS = "abcde"
# DAM's judge requests: temperature 0 (the judge's default here) and at most 300 tokens.
DLC_JUDGE_SETTINGS = {"max_tokens": 300}


def _plural_and_article(class_name: str) -> tuple[bool, str]:
    """Whether a class name is plural, and the name with its indefinite article ("an apple"), as DAM decides them."""
    try:
        import inflect
    except ImportError as error:
        raise ImportError('DLC-Bench scoring needs the `inflect` package: pip install "pixelrefer-hf[eval]"') from error
    engine = inflect.engine()
    # DAM special-cases "bus", which inflect would read as the plural of "bu".
    plural = class_name != "bus" and engine.singular_noun(class_name) is not False
    return plural, engine.a(class_name)


def dlc_recognition_question(class_name: str) -> dict[str, Any]:
    """The question DAM asks before the benchmark's own: is the described object of the annotated class?"""
    plural, with_article = _plural_and_article(class_name)
    if plural:
        text = (
            f"Is it likely that the objects in the description are {class_name} or objects of a similar type? "
            "Again, It does not have to be an exact match."
        )
    else:
        text = (
            f"Is it likely that the object in the description is {with_article} or an object of a similar type? "
            "Again, It does not have to be an exact match."
        )
    return {"question": text, "choices": [["Yes", "correct"], ["No", "incorrect"]], "type": "recognition"}


def dlc_judge_prompt(description: str, question: dict[str, Any]) -> str:
    lines = [question["question"]]
    lines += [f"{letter}. {choice}" for letter, (choice, _) in zip(DLC_CHOICE_LETTERS.upper(), question["choices"])]
    return DLC_JUDGE_PROMPT.format(description=description, question="\n".join(lines).strip())


def dlc_parse_choice(reply: str, choices: list[str]) -> int | None:
    """The index of the choice a judge reply picks, by DAM's `parse_pred` rules in their order; None when none fits.

    1. the reply is a choice, "x. choice" or the letter alone; 2. exactly one choice occurs in the reply;
    3. the reply starts with "x."; 4. several choices occur: the one starting last, the longest among those;
    5. the reply occurs inside choices: the longest such choice; 6. a lone letter (or a letter and a line break).
    Letters beyond the number of choices are not answers (DAM would fail on them later).
    """
    text = reply.strip().lower()
    if not text:
        return None
    options = [choice.strip().lower() for choice in choices]
    letters = DLC_CHOICE_LETTERS[: len(options)]
    found = []  # (choice index, where it starts in the reply, its length)
    for index, (letter, option) in enumerate(zip(letters, options)):
        if text in (option, f"{letter}. {option}", letter):
            return index
        if option in text:
            found.append((index, text.index(option), len(option)))
    if len(found) == 1:
        return found[0][0]
    if len(text) > 1 and text[0] in letters and text[1] == ".":
        return letters.index(text[0])
    if found:
        last_start = max(start for _, start, _ in found)
        return max((f for f in found if f[1] == last_start), key=lambda f: f[2])[0]
    containing = [(index, len(option)) for index, option in enumerate(options) if text in option]
    if containing:
        return max(containing, key=lambda c: c[1])[0]
    if text[0] in letters and (len(text) == 1 or text[1] == "\n"):
        return letters.index(text[0])
    return None


def _check_dlc_questions(questions: Any, file: Path, key: str) -> None:
    _expect(isinstance(questions, list), "questions must be a list", file, key)
    for number, question in enumerate(questions):
        where = f"{key} question {number}"
        _expect(isinstance(question, dict), "a question must be an object", file, where)
        _expect(isinstance(question.get("question"), str), "'question' must be a string", file, where)
        _expect(question.get("type") in ("positive", "negative"), "'type' must be positive or negative", file, where)
        choices = question.get("choices")
        _expect(
            isinstance(choices, list) and 0 < len(choices) <= len(DLC_CHOICE_LETTERS),
            f"'choices' must be a list of 1 to {len(DLC_CHOICE_LETTERS)} [text, score] pairs",
            file,
            where,
        )
        for choice in choices:
            _expect(
                isinstance(choice, list)
                and len(choice) == 2
                and isinstance(choice[0], str)
                and isinstance(choice[1], (int, float))
                and not isinstance(choice[1], bool),
                "each choice must be a [text, score] pair",
                file,
                where,
            )


class DLCBench(JudgedBenchmark):
    """DLC-Bench (DAM): detailed region descriptions checked by a judge through per-object multiple-choice questions.

    `data` is the `DLC-bench` folder of `nvidia/DLC-Bench`: `annotations.json` (COCO format, one mask per object),
    `qa.json` (questions per annotation id), `class_names.json` and `images/`.
    """

    name = "dlc-bench"
    description = "DLC-Bench detailed localized captioning, judged by an LLM (DAM's protocol); avg of pos and neg"

    def load(self, data: Path) -> list[EvalItem]:
        data = Path(data)
        annotations_file, qa_file, names_file = data / "annotations.json", data / "qa.json", data / "class_names.json"
        coco, qa, class_names = _read_json(annotations_file), _read_json(qa_file), _read_json(names_file)
        _expect(isinstance(qa, dict), "must map annotation ids to question lists", qa_file)
        _expect(isinstance(class_names, dict), "must map annotation ids to class names", names_file)
        _expect(
            isinstance(coco, dict) and all(isinstance(coco.get(k), list) for k in ("images", "annotations")),
            "must be COCO format with 'images' and 'annotations' lists",
            annotations_file,
        )
        images = {}
        for image in coco["images"]:
            _expect(
                isinstance(image, dict) and "id" in image and isinstance(image.get("file_name"), str),
                "every image needs 'id' and 'file_name'",
                annotations_file,
            )
            images[image["id"]] = image
        known_categories = {c.get("id") for c in coco.get("categories", []) if isinstance(c, dict)}
        # pycocotools' order: images as listed, each image's annotations as listed, only those of a known category.
        per_image: dict[Any, list[dict]] = {image_id: [] for image_id in images}
        for annotation in coco["annotations"]:
            _expect(
                isinstance(annotation, dict) and "id" in annotation and "image_id" in annotation,
                "every annotation needs 'id' and 'image_id'",
                annotations_file,
            )
            key = str(annotation["id"])
            _expect(
                annotation["image_id"] in images, f"image {annotation['image_id']} is not listed", annotations_file, key
            )
            if known_categories and annotation.get("category_id") not in known_categories:
                continue
            per_image[annotation["image_id"]].append(annotation)

        items, seen = [], set()
        for image_id, image_annotations in per_image.items():
            image = images[image_id]
            for annotation in image_annotations:
                key = str(annotation["id"])
                if key not in qa:  # described but never scored by DAM's eval.py: no need to ask
                    continue
                _check_dlc_questions(qa[key], qa_file, key)
                _expect(isinstance(class_names.get(key), str), "no class name", names_file, key)
                path = data / "images" / image["file_name"]
                items.append(
                    EvalItem(
                        id=key,
                        question=DLC_QUESTION,
                        regions=[_mask_region(annotation.get("segmentation"), annotations_file, key)],
                        image=_existing_media([path], annotations_file, key),
                        reference={"class_name": class_names[key], "questions": qa[key]},
                        meta={"image_id": image_id},
                    )
                )
                seen.add(key)
        missing = sorted(set(qa) - seen)
        _expect(not missing, f"questions for annotations that annotations.json lacks: {missing[:5]}", qa_file)
        return items

    def score(self, records: list[dict[str, Any]], options: ScoreOptions) -> dict[str, Any]:
        usable, errors = _split_records(records)
        judge = Judge.from_options(options)
        # Every question of every item in one batch, so that the thread pool stays busy.
        plan = []  # the questions of each record, the recognition question first
        requests = []
        for record in usable:
            reference = record.get("reference")
            _require(
                isinstance(reference, dict)
                and isinstance(reference.get("class_name"), str)
                and isinstance(reference.get("questions"), list),
                record,
                "needs the item's reference {'class_name', 'questions'}",
            )
            questions = [dlc_recognition_question(reference["class_name"]), *reference["questions"]]
            plan.append(questions)
            requests += [
                JudgeRequest([user_message(dlc_judge_prompt(record["prediction"], q))], DLC_JUDGE_SETTINGS)
                for q in questions
            ]
        replies = iter(judge.chat_many(requests))

        positives, negatives = [], []  # per-item averages
        unparsed = unparsed_items = 0
        for questions in plan:
            answers = [dlc_parse_choice(next(replies), [c[0] for c in q["choices"]]) for q in questions]
            unparsed += sum(a is None for a in answers)
            recognition, *rest = answers
            if recognition is None:
                # DAM's eval.py stops on an unreadable recognition answer; the item cannot be scored.
                unparsed_items += 1
                continue
            recognised = questions[0]["choices"][recognition][1] == "correct"
            item_scores = {"positive": [], "negative": []}
            for question, answer in zip(questions[1:], rest):
                value = 0.0 if answer is None else float(question["choices"][answer][1])  # unreadable: not mentioned
                if not recognised:  # a description of the wrong object earns nothing above 0
                    value = min(0.0, value)
                item_scores[question["type"]].append(value)
            if item_scores["positive"]:
                positives.append(_mean(item_scores["positive"]))
            if item_scores["negative"]:  # DAM leaves items without negative questions out of avg_neg
                negatives.append(_mean(item_scores["negative"]))

        avg_pos, avg_neg = _mean(positives), _mean(negatives)
        metrics = {
            "avg_pos": None if avg_pos is None else 100 * avg_pos,
            "avg_neg": None if avg_neg is None else 100 * avg_neg,
            "avg": None if avg_pos is None or avg_neg is None else 100 * (avg_pos + avg_neg) / 2,
        }
        counts = _counts(records, len(plan) - unparsed_items, errors, unparsed, judge)
        return {**metrics, **counts, "unparsed_items": unparsed_items}


# ---------------------------------------------------------------------------------------------------------------------
# VideoRefer-Bench-D
# ---------------------------------------------------------------------------------------------------------------------

VIDEOREFER_D_QUESTION = "Please describe in detail the marked object <region> in the video."
VIDEOREFER_D_QUESTION_LITE = (
    "There is one object in the video: <region>.\nPlease describe in detail the marked object in the video."
)
VIDEOREFER_D_FPS, VIDEOREFER_D_MAX_FRAMES = 1, 768
VIDEOREFER_D_DIMENSIONS = {
    "subject_correspondence": "Subject Correspondence",
    "appearance_description": "Appearance Description",
    "temporal_description": "Temporal Description",
    "hallucination_detection": "Hallucination Detection",
}
# `videorefer_bench_d/system.txt`, word for word.
VIDEOREFER_D_SYSTEM_PROMPT = (
    "You are an advanced intelligent chatbot specialized in evaluating the factual accuracy of generative outputs "
    "related to object-based video descriptions.\n"
    "Your primary task is to meticulously compare the predicted answer with the correct answer and assess their "
    "factual consistency. To accomplish this, you will evaluate the descriptions across four key dimensions:\n"
    "1. Subject Correspondence: Assess whether the subject of the input description accurately matches the subject "
    "indicated in the ground truth description.\n"
    "2. Appearance Description: Evaluate the accuracy of the appearance details, including color, shape, size, "
    "texture, and any other relevant visual attributes.\n"
    "3. Temporal Description: Analyze whether the depiction of the object's motion aligns with the actual movements "
    "described in the correct answer.\n"
    "4. Hallucination Detection: Identify any discrepancies by determining if the description includes facts, "
    "actions, or elements that do not exist in reality, such as imaginative interpretations or incorrect "
    "inferences.\n"
    "Please assign a score for each of these four dimensions, using an integer from 0 to 5, where 5 indicates a "
    "perfect match and 0 signifies no relevance at all. Accompany your assessments with brief explanations to "
    "clarify your scoring rationale.\n"
    "### OUTPUT FORMAT(EXAMPLE)\n"
    "1. Subject Correspondence: 5\\nExplanation: xxx\n"
    "2. Appearance Description: 4\\nExplanation: xxx\n"
    "3. Temporal Description: 5\\nExplanation: xxx\n"
    "4. Hallucination Detection: 3\\nExplanation: xxx"
)
# `2.extract_re.py`: "<number>. <dimension>: <score>".
VIDEOREFER_D_SCORE_PATTERN = re.compile(r"\d+\.\s+(.*?):\s+([\d.]+)")


def videorefer_d_judge_text(reference: str, prediction: str) -> str:
    return f"##Correct answer: {reference}\n##Predicted answer: {prediction}\n"


def videorefer_d_parse(reply: str) -> dict[str, float]:
    """Dimension name -> score for every "<n>. <dimension>: <score>" line of a reply that names one of the four."""
    names = {official: key for key, official in VIDEOREFER_D_DIMENSIONS.items()}
    scores = {}
    for name, value in VIDEOREFER_D_SCORE_PATTERN.findall(reply):
        key = names.get(name.strip())
        if key is None:
            continue
        try:
            scores[key] = float(value)
        except ValueError:  # "5.." and the like: that dimension stays unread
            continue
    return scores


class VideoReferBenchD(JudgedBenchmark):
    """VideoRefer-Bench-D: video object descriptions rated 0-5 on four dimensions by a judge against the reference.

    `data` is the folder with `VideoRefer-Bench-D.json` and `Panda-70M-part/` (the videos), from
    `DAMO-NLP-SG/VideoRefer-Bench`, or the json file itself (videos then in `Panda-70M-part/` beside it).

    PixelRefer protocol (`lite=False`, single-frame mode): the video at 1 fps, at most 768 frames
    (`meta["fps"]`, `meta["max_frames"]`), and the object's mask on the one frame `frame_idx` of the file. That frame
    number counts the frames of the source video (`meta["region_frames"] == "source"`): the official code reads it
    separately, at full resolution, beside the sampled frames. PixelRefer-Lite protocol (`lite=True`, multi-frame
    mode): only the annotated frames are decoded (`meta["source_frames"]`, sorted source frame numbers), and the
    region holds the object's mask on each of them, keyed by position in that list; empty masks are left out.
    """

    def __init__(self, lite: bool = False):
        self.lite = lite
        self.name = "videorefer-d-lite" if lite else "videorefer-d"
        self.description = (
            f"VideoRefer-Bench-D video object descriptions, {'multi' if lite else 'single'}-frame masks "
            f"({'PixelRefer-Lite' if lite else 'PixelRefer'} protocol), judged 0-5 on four dimensions"
        )

    def load(self, data: Path) -> list[EvalItem]:
        file = _annotation_file(data, "VideoRefer-Bench-D.json")
        rows = _read_json(file)
        _expect(isinstance(rows, list), "must be a list of entries", file)
        video_folder = file.parent / "Panda-70M-part"
        items, seen = [], set()
        for number, row in enumerate(rows):
            _expect(isinstance(row, dict), "an entry must be an object", file, f"#{number}")
            key = str(row.get("id", number))
            _expect(key not in seen, "duplicate id", file, key)
            seen.add(key)
            _expect(isinstance(row.get("video"), str), "'video' must be a file name", file, key)
            _expect(isinstance(row.get("caption"), str), "'caption' must be a string", file, key)
            objects = row.get("annotation")
            # One object per entry: the prompt has one <region>.
            _expect(
                isinstance(objects, list) and len(objects) == 1 and isinstance(objects[0], dict) and objects[0],
                "'annotation' must hold exactly one object ({frame: {'segmentation': rle}})",
                file,
                key,
            )
            masks = {}
            for frame, entry in objects[0].items():
                _expect(str(frame).isdigit(), f"frame key {frame!r} is not a frame number", file, key)
                _expect(
                    isinstance(entry, dict) and "segmentation" in entry,
                    f"frame {frame} has no 'segmentation'",
                    file,
                    key,
                )
                masks[int(frame)] = _mask_region(entry["segmentation"], file, key)
            video = _existing_media([video_folder / row["video"]], file, key)
            if self.lite:
                frames = sorted(masks)
                region = {}
                for position, frame in enumerate(frames):
                    try:
                        empty = "counts" in masks[frame] and not rle_decode(masks[frame]).any()
                    except ValueError as error:
                        raise EvalDataError(f"frame {frame}: {error}", file=file, item=key) from None
                    if not empty:  # the official Lite inference drops empty masks
                        region[position] = masks[frame]
                _expect(bool(region), "every mask of the object is empty", file, key)
                meta = {"source_frames": frames}
            else:
                frame_idx = str(row.get("frame_idx", ""))
                _expect(
                    frame_idx.isdigit() and int(frame_idx) in masks,
                    f"'frame_idx' {row.get('frame_idx')!r} is not one of the annotated frames",
                    file,
                    key,
                )
                region = {int(frame_idx): masks[int(frame_idx)]}
                meta = {"fps": VIDEOREFER_D_FPS, "max_frames": VIDEOREFER_D_MAX_FRAMES, "region_frames": "source"}
            items.append(
                EvalItem(
                    id=key,
                    question=VIDEOREFER_D_QUESTION_LITE if self.lite else VIDEOREFER_D_QUESTION,
                    regions=[region],
                    video=video,
                    reference=row["caption"],
                    meta=meta,
                )
            )
        return items

    def score(self, records: list[dict[str, Any]], options: ScoreOptions) -> dict[str, Any]:
        usable, errors = _split_records(records)
        for record in usable:
            _require(isinstance(record.get("reference"), str), record, "needs the item's reference caption")
        judge = Judge.from_options(options)
        requests = [
            JudgeRequest(
                [
                    system_message(VIDEOREFER_D_SYSTEM_PROMPT),
                    user_message(videorefer_d_judge_text(str(r.get("reference")), r["prediction"])),
                ]
            )
            for r in usable
        ]
        per_dimension: dict[str, list[float]] = {key: [] for key in VIDEOREFER_D_DIMENSIONS}
        unparsed = incomplete = 0
        for reply in judge.chat_many(requests):
            scores = videorefer_d_parse(reply)
            if not scores:
                unparsed += 1
            elif len(scores) < len(VIDEOREFER_D_DIMENSIONS):
                incomplete += 1
            for key, value in scores.items():
                per_dimension[key].append(value)
        # As `3.analyze_score.py`: each dimension over the replies that gave it, then the mean of the four.
        averages = {key: _mean(values) for key, values in per_dimension.items()}
        known = [value for value in averages.values() if value is not None]
        average = _mean(known) if len(known) == len(averages) else None
        counts = _counts(records, len(usable) - unparsed, errors, unparsed, judge)
        return {**averages, "average": average, **counts, "incomplete": incomplete}


# ---------------------------------------------------------------------------------------------------------------------
# Ferret-Bench referring reasoning
# ---------------------------------------------------------------------------------------------------------------------

FERRET_SYSTEM_PROMPT = "You are a helpful and precise assistant for checking the quality of the answer."
FERRET_LITE_PREFIX = "There is 1 region in the image: <region> "
# ml-ferret's `ferret/eval/ferret_gpt4_data/rule.json`, rule "refer_reason", word for word.
FERRET_REVIEW_RULE = (
    "We would like to request your feedback on the performance of two AI assistants in response to the user question "
    "displayed above. The user asks the question about specific region of an image. For your reference, the visual "
    "content in the image is represented with five descriptive sentences describing the same image. In addition, "
    "specific object locations within the image are given, along with detailed coordinates. These coordinates are in "
    "the form of bounding boxes, represented as (x1, y1, x2, y2) with floating numbers ranging from 0 to 1. These "
    "values correspond to the top left x, top left y, bottom right x, and bottom right y. Also, the relationships "
    "between pairs of objects are provided, in the format of object -> relationship -> subject, where the "
    "object/subject are indexed by object id from previous object lists as well as the object names. Also, several "
    "region description are given, each describing a box region of image, with detailed coordinates. \n"
    "Please rate the spatial correspondence, helpfulness, relevance, accuracy, level of details of their responses. "
    "Each assistant receives an overall score on a scale of 1 to 10, where a higher score indicates better overall "
    "performance.\n"
    "Please first output a single line containing only two values indicating the scores for Assistant 1 and 2, "
    "respectively. The two scores are separated by a space.\n"
    "In the subsequent line, please provide a comprehensive explanation of your evaluation, avoiding any potential "
    "bias and ensuring that the order in which the responses were presented does not affect your judgment."
)
FERRET_BOX_PATTERN = re.compile(r"\[.*?\]")


def ferret_strip_boxes(answer: str) -> str:
    """The reference answer without its " [x0, y0, x1, y1]" coordinates, as `2.eval_ferret.py` shows it to the judge."""
    for match in FERRET_BOX_PATTERN.findall(answer):
        answer = answer.replace(" " + match, "")
    return answer


def ferret_review_text(context: str, question: str, model_answer: str, reference_answer: str) -> str:
    """The review request. The model is Assistant 1 and the reference Assistant 2, as in PixelRefer's script (whose
    "[Context]" header is followed by a stray backslash instead of the line break it meant)."""
    return (
        f"[Context]\n{context}\n\n"
        f"[Question]\n{question}\n\n"
        f"[Assistant 1]\n{model_answer}\n\n[End of Assistant 1]\n\n"
        f"[Assistant 2]\n{reference_answer}\n\n[End of Assistant 2]\n\n"
        f"[System]\n{FERRET_REVIEW_RULE}\n\n"
    )


def ferret_parse_scores(reply: str) -> tuple[float, float] | None:
    """The two scores on the reply's first line ("8 9" or "8, 9"); None otherwise (the official script's [-1, -1])."""
    first_line = reply.strip().split("\n")[0].replace(",", " ")
    parts = first_line.split()
    if len(parts) != 2:
        return None
    try:
        scores = float(parts[0]), float(parts[1])
    except ValueError:
        return None
    return scores if all(math.isfinite(s) for s in scores) else None


class FerretBenchReasoning(JudgedBenchmark):
    """Ferret-Bench referring reasoning: a judge rates the model's answer against GPT-4's reference, LLaVA style.

    `data` is a folder with Osprey's `box_refer_reason.json` (questions with `<region>` and the COCO mask), ml-ferret's
    `question.jsonl`, `context.jsonl` and `answer.jsonl` from `ferret/eval/ferret_gpt4_data/refer_reason/` (in the
    folder or in its `refer_reason/`), and the COCO images in `train2017/` or `val2017/` (or `images/`).
    Score = mean model score / mean reference score x 100 over the reviews that could be read.
    """

    def __init__(self, lite: bool = False):
        self.lite = lite
        self.name = "ferret-reasoning-lite" if lite else "ferret-reasoning"
        self.description = (
            "Ferret-Bench referring reasoning, judged against the reference answers (score = model / reference x 100)"
            + (", PixelRefer-Lite prompt" if lite else "")
        )

    @staticmethod
    def _ferret_file(data: Path, name: str) -> Path:
        for candidate in (data / name, data / "refer_reason" / name):
            if candidate.is_file():
                return candidate
        return data / name

    def load(self, data: Path) -> list[EvalItem]:
        data = Path(data)
        questions_file = data / "box_refer_reason.json"
        rows = _read_json(questions_file)
        _expect(isinstance(rows, list), "must be a list of questions", questions_file)
        side_files = {name: self._ferret_file(data, f"{name}.jsonl") for name in ("question", "context", "answer")}
        side = {}
        for name, file in side_files.items():
            entries = _read_json_lines(file)
            side[name] = {}
            for number, entry in enumerate(entries):
                _expect(
                    isinstance(entry, dict) and isinstance(entry.get("text"), str),
                    f"line {number + 1} needs a 'text' string",
                    file,
                )
                # Contexts belong to images; questions and answers to question ids.
                side[name][entry.get("image") if name == "context" else entry.get("question_id")] = entry["text"]

        items, seen = [], set()
        for number, row in enumerate(rows):
            _expect(
                isinstance(row, dict) and "question_id" in row, "needs a 'question_id'", questions_file, f"#{number}"
            )
            key = str(row["question_id"])
            _expect(key not in seen, "duplicate question_id", questions_file, key)
            seen.add(key)
            text, image = row.get("text"), row.get("image")
            _expect(
                isinstance(text, str) and text.count("<region>") == 1,
                "'text' must hold one <region>",
                questions_file,
                key,
            )
            _expect(isinstance(image, str), "'image' must be a file name", questions_file, key)
            annotation = row.get("annotation")
            _expect(
                isinstance(annotation, dict) and "segmentation" in annotation,
                "'annotation' needs a 'segmentation'",
                questions_file,
                key,
            )
            for name, table_key in (
                ("question", row["question_id"]),
                ("answer", row["question_id"]),
                ("context", image),
            ):
                _expect(table_key in side[name], f"no entry for {table_key!r}", side_files[name], key)
            if self.lite:
                question = FERRET_LITE_PREFIX + text.replace("<region>", "")
            else:
                question = text
            folders = ("train2017", "val2017", "images", "")
            items.append(
                EvalItem(
                    id=key,
                    question=question,
                    regions=[_mask_region(annotation["segmentation"], questions_file, key)],
                    image=_existing_media([data / folder / image for folder in folders], questions_file, key),
                    reference=ferret_strip_boxes(side["answer"][row["question_id"]]),
                    meta={
                        "category": "refer_reason",
                        "judge_question": side["question"][row["question_id"]],
                        "context": side["context"][image],
                    },
                )
            )
        return items

    def score(self, records: list[dict[str, Any]], options: ScoreOptions) -> dict[str, Any]:
        usable, errors = _split_records(records)
        judge = Judge.from_options(options)
        requests = []
        for record in usable:
            meta = record.get("meta") or {}
            _require(
                isinstance(record.get("reference"), str)
                and isinstance(meta.get("context"), str)
                and isinstance(meta.get("judge_question"), str),
                record,
                "needs the item's reference answer and meta 'context' and 'judge_question'",
            )
            text = ferret_review_text(
                meta["context"], meta["judge_question"], record["prediction"], record["reference"]
            )
            requests.append(JudgeRequest([system_message(FERRET_SYSTEM_PROMPT), user_message(text)]))
        pairs = [ferret_parse_scores(reply) for reply in judge.chat_many(requests)]
        read = [pair for pair in pairs if pair is not None]
        model_mean, reference_mean = _mean([p[0] for p in read]), _mean([p[1] for p in read])
        score = 100 * model_mean / reference_mean if read and reference_mean else None
        counts = _counts(records, len(read), errors, len(pairs) - len(read), judge)
        return {"score": score, "model_mean": model_mean, "reference_mean": reference_mean, **counts}


# ---------------------------------------------------------------------------------------------------------------------
# Ref-L4: CLAIR, and the shortening step of its caption metrics
# ---------------------------------------------------------------------------------------------------------------------

REF_L4_DETAIL_QUESTION = "Please describe <region> in detail."
# `clair/clair.py`'s prompt (from the CLAIR paper), word for word.
CLAIR_PROMPT = (
    "You are trying to tell if a candidate set of captions is describing the same image as a reference set of "
    "captions.\n"
    "Candidate set:\n"
    "{candidates}\n"
    "Reference set:\n"
    "{references}\n"
    "On a precise scale from 0 to 100, how likely is it that the candidate set is describing the same image as the "
    'reference set? (JSON format, with a key "score", value between 0 and 100, and a key "reason" with a string '
    "value.)\n"
)
CLAIR_NUMBER_PATTERN = re.compile(r"\d*\.?\d+")


def clair_prompt(candidates: list[str], references: list[str]) -> str:
    return CLAIR_PROMPT.format(
        candidates="".join(f"- {c}\n" for c in candidates), references="".join(f"- {r}\n" for r in references)
    )


def clair_parse_score(reply: str) -> float | None:
    """CLAIR's 0-100 score from a reply: the "score" of the first JSON object, else the first number in the text
    (read as a fraction and scaled to 100 when below 1); None when there is neither."""
    if "{" in reply:
        body = "{" + reply.split("{", 1)[1].split("}", 1)[0] + "}"
        try:
            value = float(json.loads(body)["score"])
            if math.isfinite(value):
                return value
        except (ValueError, KeyError, TypeError):
            pass
    numbers = CLAIR_NUMBER_PATTERN.findall(reply)
    if not numbers:
        return None
    value = float(numbers[0])
    return value * 100 if value < 1 else value


def _ref_l4_references(caption: Any) -> list[str]:
    # PixelRefer's clair.py passes the caption string itself as the reference list, which splits it into characters;
    # one caption is one reference.
    return [caption] if isinstance(caption, str) else [str(c) for c in caption]


class RefL4Clair(JudgedBenchmark):
    """Ref-L4 detailed captions scored by CLAIR: a judge rates 0-100 how likely the prediction and the reference
    caption describe the same thing; the mean, in percent.

    `data` is the Ref-L4 folder holding PixelRefer's processed `ref-l4-val.json` (JSON Lines of `file_name`,
    `height`, `width`, `caption`, `bbox` as [x, y, w, h]) and the Ref-L4 `images/`. As the official inference, only
    the Objects365 part (`objects365` in `file_name`) is asked; the box is the region (pixel coordinates cut to
    integers as the official box mask does).
    """

    name = "ref-l4-clair"
    description = "Ref-L4 detailed region captions scored by CLAIR (an LLM judge, 0-100)"

    def load(self, data: Path) -> list[EvalItem]:
        file = _annotation_file(data, "ref-l4-val.json")
        rows = _read_json_lines(file)
        items, seen = [], set()
        for number, row in enumerate(rows):
            _expect(isinstance(row, dict), "an entry must be an object", file, f"#{number}")
            file_name = row.get("file_name")
            _expect(isinstance(file_name, str), "'file_name' must be a string", file, f"#{number}")
            if "objects365" not in file_name:
                continue
            key = str(row.get("id", row.get("ann_id", number)))
            _expect(key not in seen, "duplicate id", file, key)
            seen.add(key)
            box = row.get("bbox")
            _expect(
                isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box),
                "'bbox' must be [x, y, w, h]",
                file,
                key,
            )
            caption = row.get("caption")
            _expect(
                isinstance(caption, str) or (isinstance(caption, list) and caption),
                "'caption' must be a string or a list of strings",
                file,
                key,
            )
            x, y, w, h = (int(v) for v in box)
            items.append(
                EvalItem(
                    id=key,
                    question=REF_L4_DETAIL_QUESTION,
                    regions=[[max(0, x), max(0, y), x + w, y + h]],
                    image=_existing_media([file.parent / "images" / file_name], file, key),
                    reference=_ref_l4_references(caption),
                    meta={"file_name": file_name},
                )
            )
        return items

    def score(self, records: list[dict[str, Any]], options: ScoreOptions) -> dict[str, Any]:
        usable, errors = _split_records(records)
        for record in usable:
            reference = record.get("reference")
            _require(isinstance(reference, (str, list)) and reference, record, "needs the item's reference captions")
        judge = Judge.from_options(options)
        requests = [
            JudgeRequest([user_message(clair_prompt([r["prediction"]], _ref_l4_references(r.get("reference"))))])
            for r in usable
        ]
        scores = [clair_parse_score(reply) for reply in judge.chat_many(requests)]
        read = [s / 100 for s in scores if s is not None]
        mean = _mean(read)
        counts = _counts(records, len(read), errors, len(scores) - len(read), judge)
        return {"clair": None if mean is None else 100 * mean, **counts}


# `refl4/gpt.py`'s system prompt, word for word (including its opening line break).
REF_L4_SHORTEN_PROMPT = (
    "\nGive you a description of an object, please condense the sentence into a brief phrase that highlights the "
    "object's category and key characteristics. \n"
    "For example:\n"
    "INPUT: A freestanding, top-loading washing machine with a white exterior. It features a front-loading door with "
    "a recessed handle at the top center for opening and closing. The control panel is located on the upper right "
    "side of the machine, consisting of several buttons and possibly a display screen.\n"
    "OUTPUT: a white washing machine\n"
)
REF_L4_SHORTEN_ABOVE_WORDS = 5


def shorten_ref_l4_predictions(
    records: list[dict[str, Any]], options: ScoreOptions
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Ref-L4's judge step before its caption metrics: predictions longer than 5 words become a short phrase.

    As `refl4/gpt.py`: a prediction of more than 5 space-separated words is sent to the judge with the condensing
    instruction and replaced by the reply; shorter ones are kept. (The ground truth, `refl4_gt.json`, was condensed
    the same way by PixelRefer and is used as published.) Returns new records, each with `prediction` as scored,
    `prediction_original` and `shortened` (bool), with error records passed through untouched; and the judge's
    description plus counts, for results.json. Replies are cached like every judge reply.
    """
    judge = Judge.from_options(options)
    long_indices = [
        index
        for index, record in enumerate(records)
        if record.get("error") is None
        and isinstance(record.get("prediction"), str)
        and len(record["prediction"].split(" ")) > REF_L4_SHORTEN_ABOVE_WORDS
    ]
    requests = [
        JudgeRequest([system_message(REF_L4_SHORTEN_PROMPT), user_message(records[index]["prediction"])])
        for index in long_indices
    ]
    replies = dict(zip(long_indices, judge.chat_many(requests)))
    shortened, empty = [], 0
    for index, record in enumerate(records):
        if record.get("error") is not None or not isinstance(record.get("prediction"), str):
            shortened.append(record)
            continue
        reply = replies.get(index)
        if reply is not None and not reply.strip():
            empty += 1  # an empty reply would score as an empty caption: keep the prediction and count it
            reply = None
        shortened.append(
            {
                **record,
                "prediction": record["prediction"] if reply is None else reply.strip(),
                "prediction_original": record["prediction"],
                "shortened": reply is not None,
            }
        )
    return shortened, {"judge": judge.describe(), "shortened": len(long_indices) - empty, "unparsed": empty}


# What `pixelrefer eval` registers: one instance per command-line name.
JUDGED_BENCHMARKS: list[Benchmark] = [
    DLCBench(),
    VideoReferBenchD(),
    VideoReferBenchD(lite=True),
    FerretBenchReasoning(),
    FerretBenchReasoning(lite=True),
    RefL4Clair(),
]

__all__ = [
    "JUDGED_BENCHMARKS",
    "DLCBench",
    "FerretBenchReasoning",
    "RefL4Clair",
    "VideoReferBenchD",
    "clair_parse_score",
    "dlc_parse_choice",
    "ferret_parse_scores",
    "shorten_ref_l4_predictions",
    "videorefer_d_parse",
]
