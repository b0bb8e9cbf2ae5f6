"""The bundled demo checkpoints: small PixelRefer and PixelRefer-Lite models trained from scratch on synthetic shapes.

They are toys. They name the colour (five) and shape (three) of a region of a synthetic scene
(`pixelrefer_hf.synthetic`) and tell which of two shapes is larger and which way a shape moves in an 8-frame clip, as
often as each card's measured accuracies say (the card also names the targets its checkpoint misses).
They know nothing about real photos; they exist so that the `pixelrefer` command, the examples and the tests run a
model that really reads regions, offline, in seconds. For real weights convert a released
checkpoint (`pixelrefer convert --help`).

    >>> from pixelrefer_hf.demo import demo_checkpoint
    >>> path = demo_checkpoint("pixelrefer")      # a folder: AutoModel / AutoProcessor / pipeline("region-qa")

`examples/train_shapes.py` trains them (under 30 minutes per variant on a 2-core CPU) with [`demo_config`]; its output
folder is what is committed under `pixelrefer_hf/demo_checkpoints/`, without remote code ([`bundle_checkpoint`]): the
folders ship inside the package, whose import registers every class. A copy that must travel without the package is
written by `save_pretrained`, which adds the remote-code modules:

    >>> model = AutoModel.from_pretrained(path); processor = AutoProcessor.from_pretrained(path)
    >>> model.save_pretrained("shapes-demo"); processor.save_pretrained("shapes-demo")   # loads anywhere

This module is not remote code.
"""

import json
from pathlib import Path

from .configuration_pixelrefer import PixelReferConfig
from .testing import config_for_tokenizer, processor_for_config
from .tokenizer_assets import build_tiny_tokenizer

DEMO_CHECKPOINT_ROOT = Path(__file__).parent / "demo_checkpoints"
DEMO_CHECKPOINTS = {"pixelrefer": "pixelrefer-shapes", "pixelrefer-lite": "pixelrefer-lite-shapes"}

# A 3-layer, 128-wide NaViT tower (patch 14, as released) and a 4-layer, 256-wide Qwen2: about 3.5 M parameters.
DEMO_VISION_CONFIG = {
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "patch_size": 14,
}
DEMO_TEXT_CONFIG = {
    "model_type": "qwen2",
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "initializer_range": 0.02,
}
DEMO_DEFAULTS = {
    # 8 object tokens per crop; objects smaller than 8 patches are upscaled until they cover that many.
    "num_object_tokens": 8,
    "oci_num_heads": 4,
    # Trained from scratch: the geometrically correct box encoding.
    "legacy_box_position": False,
}
# The demo checkpoints' preprocessing (image processor options; the rest keep their released defaults).
DEMO_IMAGE_PROCESSOR_OPTIONS = {
    # One patch of context around the tight box (released: two patches on images ~4x larger).
    "context_pixels": 14,
    "max_object_patches": 64,
    # Lite context images at the scale of the 224 px scenes.
    "local_image_size": 112,
    "global_image_size": 224,
    "max_visual_tokens": 1024,
    # Still images pooled 2x2 like video frames: 64 global tokens per 224 px scene instead of 256.
    "merge_size": 2,
    # Trained from scratch: a local crop per object.
    "legacy_local_crop_reuse": False,
}


def demo_config(variant: str = "pixelrefer", tokenizer=None, **overrides) -> PixelReferConfig:
    """The configuration of the demo checkpoints, with token ids from `tokenizer` (the tiny offline one by default)."""
    tokenizer = tokenizer if tokenizer is not None else build_tiny_tokenizer()
    return config_for_tokenizer(
        variant, tokenizer, DEMO_TEXT_CONFIG, DEMO_VISION_CONFIG, **{**DEMO_DEFAULTS, **overrides}
    )


def demo_config_and_processor(variant: str = "pixelrefer", image_processor_options: dict | None = None, **overrides):
    """`(config, processor)` of an untrained demo model: the starting point of `examples/train_shapes.py`.
    `overrides` reach the config, `image_processor_options` the image processor (over the demo's own)."""
    tokenizer = build_tiny_tokenizer()
    config = demo_config(variant, tokenizer, **overrides)
    options = {**DEMO_IMAGE_PROCESSOR_OPTIONS, **(image_processor_options or {})}
    return config, processor_for_config(config, tokenizer, **options)


def demo_checkpoint(variant: str = "pixelrefer") -> str:
    """The folder of the bundled demo checkpoint of `variant` (`"pixelrefer"` or `"pixelrefer-lite"`)."""
    if variant not in DEMO_CHECKPOINTS:
        raise ValueError(f"variant must be one of {sorted(DEMO_CHECKPOINTS)}, got {variant!r}")
    path = DEMO_CHECKPOINT_ROOT / DEMO_CHECKPOINTS[variant]
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"the demo checkpoint {path} is missing from this installation; train it with "
            f"`python examples/train_shapes.py --variant {variant} --output_dir {path}`"
        )
    return str(path)


# What the demo checkpoints are trained to reach on held-out scenes (exact-match accuracy, `examples/evaluate_shapes.py`):
# question kinds of `pixelrefer_hf.synthetic.QUESTION_KINDS` and, over what / colour / shape, objects under 16 px.
DEMO_TARGETS = {"what": 0.95, "color": 0.95, "shape": 0.95, "larger": 0.90, "direction": 0.90, "<16px": 0.90}


def target_report(result: dict) -> str:
    """One sentence on a `score_shapes_answers` result against [`DEMO_TARGETS`]: which targets it meets and which it
    misses (with the measured accuracy). The cards print it under their table, so their claims follow the numbers."""
    met, missed = [], []
    for name, target in DEMO_TARGETS.items():
        entry = result["kinds"].get(name) or result["sizes"].get(name)
        if not entry or not entry["total"]:
            continue
        label = f"{name} (target {100 * target:.0f}%)"
        if entry["accuracy"] >= target:
            met.append(label)
        else:
            missed.append(f"{name}: {100 * entry['accuracy']:.1f}% against a target of {100 * target:.0f}%")
    text = "Meets its targets on " + (", ".join(met) if met else "none") + "."
    if missed:
        text += " Misses " + "; ".join(missed) + "."
    return text


# The evaluation table of a demo card sits between these markers; `examples/evaluate_shapes.py --update-cards` fills it.
CARD_RESULTS_BEGIN = "<!-- evaluate_shapes:begin -->"
CARD_RESULTS_END = "<!-- evaluate_shapes:end -->"
# The `pixelrefer eval` table (official benchmark formats); `examples/eval_demo_shapes.py --update-cards` fills it.
CARD_EVAL_BEGIN = "<!-- pixelrefer_eval:begin -->"
CARD_EVAL_END = "<!-- pixelrefer_eval:end -->"

_CARD_TEMPLATE = """---
license: apache-2.0
library_name: transformers
pipeline_tag: image-text-to-text
tags:
- pixelrefer
- region-understanding
- toy-model
- synthetic-data
---

# {title}: a toy trained on synthetic shapes

**This is not a real PixelRefer model.** It is a {parameters_m:.1f} M parameter {framework} model trained from
scratch in {minutes} minutes on a CPU, on synthetic 224x224 scenes of coloured circles, squares and triangles
(`pixelrefer_hf.synthetic`). It was trained to name the colour and the shape of a region (five colours, three
shapes), to tell which of two shapes is larger and which way a shape moves in an 8-frame clip; the table below says how
often it gets each right on held-out scenes. It knows nothing else: on real photos its answers are meaningless. It
ships with `pixelrefer_hf` so that the `pixelrefer` command, the examples and the tests run a model that really reads
regions, offline.

For real weights, convert a released checkpoint (`Alibaba-DAMO-Academy/PixelRefer-7B`, ...) with
`pixelrefer convert --official SNAPSHOT --out FOLDER`; see the cards in `model_cards/`.

## Questions it answers

| question | answer |
|---|---|
| `What is <region>?` | `a {{color}} {{shape}}` |
| `What color is <region>?` | red, green, blue, yellow or purple |
| `What shape is <region>?` | circle, square or triangle |
| `Is <region> larger than <region>?` | yes or no |
| `Which way does <region> move?` (video) | left, right, up or down |

## Use

```python
from transformers import pipeline
from pixelrefer_hf.demo import demo_checkpoint

pipe = pipeline("region-qa", model=demo_checkpoint("{variant}"), trust_remote_code=True)
pipe(image="examples/assets/shapes.png", regions=[[40, 40, 90, 90]], question="What is <region>?")
```

or `pixelrefer ask examples/assets/shapes.png --model {cli_name} --box 40,40,90,90 "What is <region>?"`. The folder
holds its remote code, so `AutoModel` / `AutoProcessor` / `pipeline("region-qa")` load it with `trust_remote_code=True`
where `pixelrefer_hf` is not installed.

## Training

* Architecture: `pixelrefer_hf.demo.demo_config("{variant}")`: NaViT vision tower 3 x 128 (patch 14), Qwen2 LLM 4 x 256,
  8 object tokens per region, still images and video frames pooled 2x2, every weight random at the start.
* Stage 1, object perception ({perception_steps} steps): the tower, SAOT and OCI learn to put each object's shape,
  colour, size and place into its tokens, through a small read-out head that is then dropped{token_geometry}.{direction_warmup}
* Stage 2, TRL `SFTTrainer` ({steps} steps, batch {batch_size}, AdamW, learning rate {learning_rate}, cosine schedule,
  float32, {stage2_trained}): {rows} synthetic conversations (scene seed 0; {video_percent}% videos), {min_turns} to
  {max_turns} questions each{mixture}, loss on the answers only.
* Time: {minutes} minutes including data generation, {threads_note}. {loss_note}
* Command: see the docstring of `examples/train_shapes.py` for the exact command line.

## Evaluation

Exact-match accuracy on held-out scenes (`python examples/evaluate_shapes.py`, scene seed 1000; size columns score the
what / color / shape questions by the size of the object asked about):

{results_begin}
(not evaluated yet)
{results_end}

The same held-out scenes written in the official benchmark formats and scored by `pixelrefer eval` with the official
prompts and metrics (`python examples/eval_demo_shapes.py`): the toy knows only its five questions, so these numbers
show the harness at work, not a skill.

{eval_begin}
(not evaluated yet)
{eval_end}

## Limits

Where the note under the evaluation table says a target is missed, trust its answers to that kind of question only
as far as the measured accuracy goes (chance is 50% for `larger`, 25% for `direction`). It answers only the five
questions above, in exactly these words, about shapes like those it was trained on; other questions get one of its
five kinds of answers. Regions given as boxes around circles or triangles contain background
pixels the model never saw inside a training mask. License: the code's (Apache-2.0).
"""


def _token_geometry_note(token_geometry: dict | None) -> str:
    """The card's words for stage 1's per-token read-out (`train_shapes.py --token_geometry_*`), if it was used."""
    if not token_geometry or not token_geometry.get("weight"):
        return ""
    names = {"area": "log-area", "x": "centre x", "y": "centre y"}
    asked = ", ".join(names[name] for name in token_geometry["targets"].split(","))
    return (
        f", and every single token is asked for the object's {asked} along fixed-length directions of the "
        f"RMS-normalised token (strength {token_geometry['scale']:g}, weight {token_geometry['weight']:g}), so that "
        "they stand out in each token as the LLM sees it"
    )


def _direction_warmup_note(warmup: dict | None) -> str:
    """The card's stage-1b bullet (`train_shapes.py --direction_warmup_videos`), if the run had one."""
    if not warmup:
        return ""
    scores = ", ".join(f"{100 * score:.0f}%" for score in warmup["held_out_accuracy_per_epoch"])
    return (
        f"\n* Stage 1b, direction warm-up: {warmup['prompts']} direction prompts (one moving shape each, from "
        f"{warmup['videos']} videos) encoded once through the frozen object side, the LLM alone trained on them for "
        f"{warmup['epochs']} epochs (batch {warmup['batch_size']}); held-out accuracy after each epoch {scores} "
        f"({warmup['held_out_prompts']} prompts)."
    )


def demo_model_card(summary: dict) -> str:
    """The model card (README.md) of a demo checkpoint, from the `training_summary.json` of `train_shapes.py`."""
    variant = summary["variant"]
    turns = summary.get("questions_per_row", [1, 4])  # summaries written before the option existed: 1 to 4
    first_loss, last_loss = summary["first_logged_loss"], summary["last_logged_loss"]
    return _CARD_TEMPLATE.format(
        title="PixelRefer-Lite demo" if variant == "pixelrefer-lite" else "PixelRefer demo",
        framework="Object-Only (PixelRefer-Lite)" if variant == "pixelrefer-lite" else "Vision-Object (PixelRefer)",
        cli_name="demo-lite" if variant == "pixelrefer-lite" else "demo",
        variant=variant,
        parameters_m=summary["parameters"] / 1e6,
        minutes=summary["minutes_total"],
        rows=summary["rows"],
        video_percent=round(100 * summary.get("video_fraction", 0.25)),
        min_turns=turns[0],
        max_turns=turns[1],
        mixture="".join(
            [
                f"; a still scene's turn asks `larger` {summary['larger_weight']:g}x as often as each single-region kind"
                if summary.get("larger_weight")
                else "",
                f"; {100 * summary['box_fraction']:g}% of the regions given as their bounding box (both stages)"
                if summary.get("box_fraction")
                else "",
                "; a video's conversation asks the direction of every shape in it"
                if summary.get("ask_every_moving_shape")
                else "",
                f"; a video row's answers weighted {summary['direction_loss_weight']:g}x in the loss"
                if summary.get("direction_loss_weight", 1.0) != 1.0
                else "",
            ]
        ),
        learning_rate=summary["learning_rate"],
        batch_size=summary["batch_size"],
        steps=summary["steps"],
        perception_steps=summary.get("perception_steps", 0),
        token_geometry=_token_geometry_note(summary.get("token_geometry")),
        stage2_trained=(
            "tower, SAOT and OCI frozen" if summary.get("perception_frozen_in_sft") else "every weight trained"
        ),
        direction_warmup=_direction_warmup_note(summary.get("direction_warmup")),
        threads_note=(
            "one CPU thread (two variants trained at once on a 2-core machine)"
            if summary["torch_threads"] == 1
            else f"{summary['torch_threads']} CPU threads (alone on a 2-core machine)"
        ),
        loss_note=(
            f"Logged stage-2 loss {first_loss:.2f} at the start, {last_loss:.2f} at the end."
            if first_loss is not None and last_loss is not None
            else "No stage-2 loss was logged (fewer steps than `logging_steps`)."
        ),
        results_begin=CARD_RESULTS_BEGIN,
        results_end=CARD_RESULTS_END,
        eval_begin=CARD_EVAL_BEGIN,
        eval_end=CARD_EVAL_END,
    )


def replace_card_results(
    card: str, results_markdown: str, begin_marker: str = CARD_RESULTS_BEGIN, end_marker: str = CARD_RESULTS_END
) -> str:
    """`card` with the text between the evaluation markers (by default those of `evaluate_shapes.py`; pass
    `CARD_EVAL_BEGIN` / `CARD_EVAL_END` for the `pixelrefer eval` table) replaced by `results_markdown`."""
    begin, end = card.find(begin_marker), card.find(end_marker)
    if begin < 0 or end < begin:
        raise ValueError("the model card has no evaluation markers to replace")
    return card[: begin + len(begin_marker)] + "\n" + results_markdown.strip() + "\n" + card[end:]


def bundle_checkpoint(folder: str | Path) -> None:
    """Strip from a saved checkpoint what only a folder travelling without this package needs: the remote-code
    modules and the `auto_map` / `custom_pipelines` entries that point at them (with them, `trust_remote_code=True`
    would load the folder's copies instead of the installed package). Weights, configs and tokenizer files stay."""
    folder = Path(folder)
    for module in folder.glob("*.py"):
        module.unlink()
    for name in ("config.json", "processor_config.json", "tokenizer_config.json", "preprocessor_config.json"):
        path = folder / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        for section in (data, data.get("image_processor") or {}):
            section.pop("auto_map", None)
            section.pop("custom_pipelines", None)
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def is_bundled_checkpoint_folder(folder: str | Path) -> bool:
    """Whether `folder` is one of the package's bundled demo checkpoint folders."""
    return Path(folder).resolve().parent == DEMO_CHECKPOINT_ROOT.resolve()


__all__ = [
    "DEMO_CHECKPOINTS",
    "DEMO_TARGETS",
    "bundle_checkpoint",
    "demo_checkpoint",
    "demo_config",
    "demo_config_and_processor",
    "demo_model_card",
    "is_bundled_checkpoint_folder",
    "replace_card_results",
    "target_report",
]
