"""The metrics of `pixelrefer eval` against values worked out by hand: SIoU exactly, SSim with the real
all-MiniLM-L6-v2, COCO caption metrics on toy captions, option letters of tricky replies, error accounting."""

import math

import numpy as np
import pytest

from pixelrefer_hf.evaluation.base import ScoreOptions
from pixelrefer_hf.evaluation.benchmarks import LVISCategory, VideoReferQ, sentence_model
from pixelrefer_hf.evaluation.metrics import (
    caption_scores,
    category_scores,
    extract_option_letter,
    normalize_category,
    option_letters,
    semantic_iou,
    truncate_caption,
)


def test_category_normalisation_and_siou_by_hand():
    assert normalize_category(" Dog:Leg ") == "dog leg"
    assert normalize_category("traffic_light.") == "traffic light"
    assert normalize_category("(red) circle, big") == "red  circle  big"
    # {a, red, circle} vs {red, circle}: 2 shared of 3.
    assert semantic_iou("a red circle", "red circle") == pytest.approx(2 / 3, abs=0)
    assert semantic_iou("red red circle", "circle red") == 1.0
    assert semantic_iou("blue", "red circle") == 0.0
    assert semantic_iou("", "") == 0.0
    # PACO: "category:subcategory" against the spaced answer; {dog, leg} vs {dog, leg, front}.
    assert semantic_iou(normalize_category("dog:leg"), normalize_category("dog leg front")) == pytest.approx(2 / 3)


@pytest.fixture(scope="module")
def minilm():
    return sentence_model(ScoreOptions())


def test_ssim_model_is_the_published_all_minilm_l6_v2(minilm):
    """The packaged model, loaded offline: BERT with 6 layers, 384-dim mean-pooled, normalised embeddings."""
    bert = minilm[0].auto_model
    assert bert.config.num_hidden_layers == 6 and bert.config.hidden_size == 384
    assert minilm.get_embedding_dimension() == 384
    modules = [type(module).__name__ for module in minilm]
    assert modules == ["Transformer", "Pooling", "Normalize"], modules
    assert minilm[1].get_config_dict()["pooling_mode"] == "mean"
    embeddings = minilm.encode(["a dog runs on the beach", "a puppy running along the shore", "quarterly tax law"])
    assert embeddings.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    paraphrase, unrelated = float(embeddings[0] @ embeddings[1]), float(embeddings[0] @ embeddings[2])
    assert paraphrase > 0.6 and unrelated < 0.2 and paraphrase - unrelated > 0.5, (paraphrase, unrelated)


def test_ssim_and_siou_of_category_scores_match_the_definition(minilm):
    predictions, answers = ["Dog.", "a red circle", "traffic_light"], ["dog", "red circle", "car"]
    scores = category_scores(predictions, answers, minilm)
    # SSim by hand: the cosine of the raw (unnormalised-by-us) embeddings of the normalised strings.
    raw = minilm.encode(
        ["dog", "a red circle", "traffic light", "dog", "red circle", "car"], normalize_embeddings=False
    )
    cosines = [float(raw[i] @ raw[i + 3] / (np.linalg.norm(raw[i]) * np.linalg.norm(raw[i + 3]))) for i in range(3)]
    assert cosines[0] == pytest.approx(1.0, abs=1e-5)  # "Dog." normalises to the answer itself
    assert scores["ssim"] == pytest.approx(100 * sum(cosines) / 3, abs=1e-4)
    assert scores["siou"] == pytest.approx(100 * (1 + 2 / 3 + 0) / 3, abs=1e-9)
    assert scores["avg"] == pytest.approx((scores["ssim"] + scores["siou"]) / 2)


def test_caption_metrics_on_a_toy_case():
    """BLEU-1 and ROUGE-L by hand; CIDEr-D of exact copies; METEOR of a copy."""
    # One item, "a red circle" for "a blue circle": unigram precision 2/3 (no brevity penalty, equal lengths);
    # the longest common subsequence "a circle" gives ROUGE-L precision = recall = 2/3, so F = 2/3.
    scores = caption_scores({"x": "a red circle"}, {"x": ["a blue circle"]})
    assert scores["bleu_1"] == pytest.approx(200 / 3, abs=1e-5)
    assert scores["rouge_l"] == pytest.approx(200 / 3, abs=1e-9)
    assert scores["bleu_4"] < 1e-3 and scores["cider"] == 0.0  # no shared 2-gram; one image: every idf is log(1) = 0
    assert 0 < scores["meteor"] < 100
    assert "spice" not in scores and "off by default" in scores["spice_not_computed"]
    # Two exact copies with no word in common between the items: every n-gram has document frequency 1, so every
    # tf-idf vector matches its reference exactly: cosine 1 for n = 1..4, times CIDEr-D's factor 10, x100.
    copies = {"a": "a man rides a horse", "b": "two cats sleep on sofas"}
    scores = caption_scores(copies, {key: [value] for key, value in copies.items()})
    assert scores["cider"] == pytest.approx(1000.0, abs=1e-6)
    assert scores["bleu_4"] == pytest.approx(100.0, abs=1e-4)
    assert scores["meteor"] == pytest.approx(100.0, abs=1e-6)
    assert scores["rouge_l"] == pytest.approx(100.0)


def test_predictions_are_cut_to_100_words_as_the_official_conversion_does():
    assert truncate_caption(" ".join(map(str, range(150)))) == " ".join(map(str, range(100)))
    assert truncate_caption("a  b") == "a  b"  # split on single spaces, as the official script


def test_spice_is_reported_not_computed_and_never_downloads(monkeypatch):
    import pycocoevalcap.spice.spice as spice_module

    def no_download():
        raise AssertionError("SPICE tried to download the Stanford CoreNLP models")

    monkeypatch.setattr(spice_module, "get_stanford_models", no_download)
    scores = caption_scores({"x": "a red circle"}, {"x": ["a red circle"]}, spice=True)
    assert "spice" not in scores
    assert "Stanford CoreNLP jars are missing" in scores["spice_not_computed"], scores["spice_not_computed"]


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("(B)", "B"),
        ("(B) A hat", "B"),
        ("B.", "B"),
        ("B", "B"),
        ("b.", "B"),
        ("B) a hat", "B"),
        ("B: a hat", "B"),
        ("The answer is B", "B"),
        ("The answer is (C).", "C"),
        ("I think it is D.", "D"),
        ("A helmet", "A"),  # the official rule: the first character
        ("", None),
        (None, None),
        ("none of them", None),
        ("The answer is E", None),  # not one of the options
    ],
)
def test_option_letter_extraction_on_tricky_answers(reply, expected):
    assert extract_option_letter(reply, "ABCD") == expected


def test_option_letters_of_the_options():
    assert option_letters(["(A) a helmet", "(B) a hat", "(C) sunglasses"]) == "ABC"
    assert option_letters(["left", "right"]) == "AB"


def record(item_id, prediction, reference, error=None, **meta):
    return {"id": item_id, "prediction": prediction, "reference": reference, "meta": meta, "error": error}


def test_videorefer_q_accuracy_per_type_by_hand_and_errors_left_out():
    letters = "ABCD"
    records = [
        record("1", "(A)", "(A) a helmet", type="Basic Questions", letters=letters),
        record("2", "B", "(A) a helmet", type="Basic Questions", letters=letters),
        record("3", "The answer is C", "(C) left", type="Sequential Questions", letters=letters),
        record("4", "no idea", "(D) up", type="Sequential Questions", letters=letters),
        record("5", "(D)", "(D) up", type="Future Predictions", letters=letters),
        record("6", None, "(A) a hat", error="file x, item 6: no such file", type="Basic Questions", letters=letters),
    ]
    scores = VideoReferQ().score(records, ScoreOptions())
    assert scores["basic_questions"] == 50.0 and scores["sequential_questions"] == 50.0
    assert scores["future_predictions"] == 100.0
    assert scores["accuracy"] == pytest.approx(100 * 3 / 5)
    assert (scores["items"], scores["errors"], scores["scored"], scores["no_option_letter"]) == (6, 1, 5, 1)


def test_category_scoring_counts_errors_and_leaves_them_out(minilm):
    records = [
        record("0-0", "red circle", "red circle"),
        record("0-1", None, "blue square", error="file a.png, item 0-1: the mask does not decode"),
    ]
    scores = LVISCategory().score(records, ScoreOptions())
    assert (scores["items"], scores["errors"], scores["scored"]) == (2, 1, 1)
    assert scores["siou"] == 100.0 and scores["ssim"] == pytest.approx(100.0, abs=1e-4)
    only_errors = LVISCategory().score(records[1:], ScoreOptions())
    assert only_errors == {"items": 1, "errors": 1, "scored": 0}
    assert not any(isinstance(v, float) and math.isnan(v) for v in scores.values())
