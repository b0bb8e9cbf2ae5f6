# /// script
# dependencies = ["pixelrefer-hf[train]"]
# ///
"""Train a demo PixelRefer / PixelRefer-Lite from scratch on synthetic shapes with TRL's SFTTrainer (CPU friendly).

The bundled demo checkpoints were made with exactly these commands; the defaults are PixelRefer's recipe, run on one
core of a 2-core CPU while the other trained an earlier Lite (26 minutes including data generation). Lite ran alone
on both cores (29 minutes, its stage 2 cut at step 473 by the budget), with stage 1's per-token read-out, stage 1b's
direction warm-up and a stage 2 that keeps direction:

    python examples/train_shapes.py --variant pixelrefer --threads 1 --max_total_minutes 29 \
        --output_dir src/pixelrefer_hf/demo_checkpoints/pixelrefer-shapes
    python examples/train_shapes.py --variant pixelrefer-lite --box_fraction 0 --token_geometry_weight 3 \
        --direction_warmup_videos 384 --direction_warmup_epochs 3 --video_fraction 0.15 --ask_every_moving_shape \
        --direction_loss_weight 3 --max_steps 560 --threads 2 --max_total_minutes 29 \
        --output_dir src/pixelrefer_hf/demo_checkpoints/pixelrefer-lite-shapes

The previous checkpoints' recipe (1 to 4 random questions per scene, 25% videos, masks only) and, with
`--object_crop frame`, the README's ablation (plain mask pooling over the whole frame instead of SAOT's crop):

    python examples/train_shapes.py --variant pixelrefer --video_fraction 0.25 --max_questions_per_row 4 \
        --larger_weight 0 --box_fraction 0 --max_steps 400 --threads 1 --max_minutes 15 --output_dir runs/previous
    python examples/train_shapes.py --variant pixelrefer --object_crop frame --video_fraction 0.25 \
        --max_questions_per_row 4 --larger_weight 0 --box_fraction 0 --max_steps 400 --threads 1 --max_minutes 15 \
        --output_dir runs/shapes-mask-pooling

Issue 16's first retraining attempt (4 to 8 turns per row, `larger` 3x, 40% videos, batch 4), stopped by its 20-minute
budget: PixelRefer's `larger` rose from 59% to 82% but `what` and `shape` fell to 60% / 79%; the README's "Demo
checkpoints" lists every run:

    python examples/train_shapes.py --variant pixelrefer --max_steps 800 --per_device_train_batch_size 4 \
        --warmup_steps 40 --video_fraction 0.4 --max_questions_per_row 8 --larger_weight 3 --max_pairs 6 \
        --box_fraction 0 --threads 1 --max_minutes 20 --output_dir runs/shapes-relations

A quick smoke run (a few steps, a few seconds):

    python examples/train_shapes.py --output_dir runs/smoke --perception_steps 5 --max_steps 3 --num_train_rows 24

Every weight starts random (`pixelrefer_hf.demo.demo_config`: a 3-layer 128-wide vision tower, a 4-layer 256-wide
Qwen2, 8 object tokens). Stage 1 (`--perception_steps`) trains the tower, SAOT and OCI with a small read-out head that
predicts each object's shape, colour, size and place from its tokens (with `--token_geometry_weight`, also size and
place from every single token through unit directions, so that they stand out in each token as the LLM sees it);
stage 1b (`--direction_warmup_videos`) trains the LLM alone on direction prompts encoded once, for several epochs;
stage 2 is TRL's `SFTTrainer` on conversations about `pixelrefer_hf.synthetic` scenes with those frozen (the LLM and
PixelRefer's global projector learn to read the tokens), loss on the answers only (`PixelReferDataCollator`).
`--max_minutes` bounds stage 2's wall time, `--max_total_minutes` the whole run's. Evaluate with
`examples/evaluate_shapes.py`; `benchmarks/probe_region_tokens.py` shows what the tokens and the LLM's states carry.
"""

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer, TrlParser

from pixelrefer_hf.collator import PixelReferDataCollator
from pixelrefer_hf.demo import (
    bundle_checkpoint,
    demo_config_and_processor,
    demo_model_card,
    is_bundled_checkpoint_folder,
)
from pixelrefer_hf.modeling_pixelrefer import PixelReferForConditionalGeneration
from pixelrefer_hf.synthetic import (
    COLORS,
    SHAPES,
    box_of_mask,
    draw_image_scene,
    mask_centre,
    shapes_region_chat_dataset,
)
from pixelrefer_hf.training_utils import end_training


@dataclass
class ShapesArguments:
    variant: str = field(default="pixelrefer", metadata={"help": "'pixelrefer' or 'pixelrefer-lite'."})
    object_crop: str = field(
        default="scale_adaptive",
        metadata={"help": "'scale_adaptive' (SAOT) or 'frame' (ablation: plain mask pooling over the whole frame)."},
    )
    num_train_rows: int | None = field(
        default=None, metadata={"help": "Synthetic conversations to draw (default: enough for every step once)."}
    )
    scene_seed: int = field(default=0, metadata={"help": "Seed of the training scenes."})
    video_fraction: float = field(default=0.1, metadata={"help": "Share of video scenes among the rows."})
    max_questions_per_row: int = field(
        default=6, metadata={"help": "Turns per conversation: at most this many (one scene encoding serves them all)."}
    )
    min_questions_per_row: int = field(
        default=1, metadata={"help": "Turns per conversation: at least this many (fewer when a scene has fewer)."}
    )
    video_shapes: str = field(
        default="2,4", metadata={"help": "Fewest and most moving shapes of a training video (held-out videos: 2 to 4)."}
    )
    ask_every_moving_shape: bool = field(
        default=False,
        metadata={
            "help": "A training video's conversation asks the direction of every shape in it (False: a random number "
            "of turns, as for still scenes; the previous checkpoints' recipe)."
        },
    )
    direction_loss_weight: float = field(
        default=1.0,
        metadata={
            "help": "Stage 2: weight of a video row's answers (all of them `direction` turns) in the loss, against 1 "
            "for a still row's (1: the plain token mean, the previous checkpoints' recipe)."
        },
    )
    larger_weight: float = field(
        default=2.0,
        metadata={
            "help": "How much more often a still scene's turn asks the pair question `larger` than each single-region "
            "kind; 0: turns are a random subset of the scene's questions (the previous checkpoints' recipe)."
        },
    )
    max_pairs: int = field(default=3, metadata={"help": "Pairs per still scene the `larger` turns draw from."})
    box_fraction: float = field(
        default=0.25,
        metadata={
            "help": "Share of regions given as their bounding box instead of their mask, in both stages (users "
            "often draw boxes; a box around a circle or a triangle also holds background)."
        },
    )
    max_minutes: float | None = field(
        default=None, metadata={"help": "Stop (and save) once training has run this long, whatever the step."}
    )
    max_total_minutes: float | None = field(
        default=None,
        metadata={"help": "Stop stage 2 (and save) once the whole run (stage 1, data, stage 2) has taken this long."},
    )
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads (default: torch's choice)."})
    perception_steps: int = field(
        default=500, metadata={"help": "Stage 1: steps of the object-perception warm-up (0 skips it)."}
    )
    perception_batch_size: int = field(default=32, metadata={"help": "Stage 1: objects per step."})
    perception_learning_rate: float = field(default=1e-3, metadata={"help": "Stage 1: learning rate."})
    train_perception_in_sft: bool = field(
        default=False,
        metadata={
            "help": "Stage 2 also trains the tower, SAOT and OCI (default: frozen after stage 1, as the "
            "released recipe freezes the tower)."
        },
    )
    perception_from: str | None = field(
        default=None,
        metadata={
            "help": "Skip stage 1: take the tower, SAOT and OCI weights from this checkpoint folder (one trained by "
            "this script with the same variant and stage-1 settings, e.g. a bundled demo checkpoint, whose stage 2 "
            "left them frozen); everything else starts random."
        },
    )
    token_geometry_weight: float = field(
        default=0.0,
        metadata={
            "help": "Stage 1: weight of the per-token read-out of each object's log-area and centre, through unit "
            "directions of the RMS-normalised token (0: only the pooled read-out, the previous checkpoints' recipe)."
        },
    )
    token_geometry_targets: str = field(
        default="area,x,y",
        metadata={"help": "Stage 1: which of log-area ('area') and centre ('x', 'y') the per-token read-out asks for."},
    )
    token_geometry_scale: float = field(
        default=8.0,
        metadata={
            "help": "Stage 1: how strongly each token must carry that geometry: the target of a value at the end of "
            "its range, in units of the RMS-normalised token (whose norm is sqrt(hidden size), 16 in the demo)."
        },
    )
    direction_warmup_videos: int = field(
        default=0,
        metadata={
            "help": "Stage 1b: training videos (every moving shape asked, one region per prompt) whose prompts are "
            "encoded once and taught to the LLM alone before stage 2 (0 skips it)."
        },
    )
    direction_warmup_epochs: int = field(default=3, metadata={"help": "Stage 1b: passes over the cached prompts."})
    direction_warmup_batch_size: int = field(default=16, metadata={"help": "Stage 1b: prompts per step."})
    position_init_std: float = field(
        default=1.0,
        metadata={"help": "Init std of SAOT's box-position embedding (0 keeps the model's default init)."},
    )


# Log-area (of the frame) of the smallest and largest still shapes, about: centre and half-range, to map it to [-1, 1].
LOG_AREA_CENTER, LOG_AREA_HALF_RANGE = -4.25, 2.65


class ObjectPerceptionHead(nn.Module):
    """Stage 1 read-out: from the mean and max of an object's tokens, its shape and colour (classes) and its
    log-area and centre (regression); and from every single token, the same geometry through a read-out of fixed
    strength (see `token_geometry`). Discarded after the warm-up; only the tower, SAOT and OCI keep what it taught."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.shape = nn.Linear(2 * hidden_size, len(SHAPES))
        self.color = nn.Linear(2 * hidden_size, len(COLORS))
        self.geometry = nn.Linear(2 * hidden_size, 3)  # log area, centre x, centre y (frame-normalised)
        self.token_geometry_direction = nn.Linear(hidden_size, 3)

    def forward(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.shape(pooled), self.color(pooled), self.geometry(pooled)

    def token_geometry(self, tokens: torch.Tensor) -> torch.Tensor:
        """`(num_tokens, hidden)` -> `(num_tokens, 3)`: each token's projection, after the LLM's own scale-free view
        of it (RMS-normalised, so norm sqrt(hidden)), on three unit directions.

        With unit directions the read-out cannot amplify a faint feature: a target of +-s asks the token to put a
        share s / sqrt(hidden) of its norm along each direction. Why: the LLM compares frames (direction) and regions
        (larger) by attention averages of whole tokens, and it learns that quickly only when the compared quantity
        is a large, consistent part of every token (issue 16: a small LLM stays at chance on direction from tokens
        where place is linearly decodable, and reaches 98.6% once the true centre is added to every token at half
        its norm; `benchmarks/results/direction_learning_place.md`).
        """
        normalized = tokens * torch.rsqrt(tokens.pow(2).mean(-1, keepdim=True) + 1e-6)
        weight = self.token_geometry_direction.weight
        directions = weight / weight.norm(dim=-1, keepdim=True)
        return normalized @ directions.T + self.token_geometry_direction.bias


def perception_batch(
    rng: np.random.Generator, size: int, box_rng: np.random.Generator | None = None, box_fraction: float = 0.0
) -> tuple[list, list, torch.Tensor]:
    """About `size` objects from fresh still scenes, grouped by scene (a scene is encoded once per sample): the frames,
    the region of each object (its mask, or with probability `box_fraction` its bounding box, drawn from `box_rng`)
    and per object the targets `(shape, color, log area, centre x, centre y)` of the shape itself."""
    frames, masks, targets = [], [], []
    while len(targets) < size:
        scene = draw_image_scene(rng)
        frames.append(scene.frames[0])
        masks.append(
            [
                box_of_mask(obj.masks[0]) if box_fraction and box_rng.random() < box_fraction else obj.masks[0]
                for obj in scene.objects
            ]
        )
        height, width = scene.frames[0].shape[:2]
        for obj in scene.objects:
            targets.append(
                [
                    SHAPES.index(obj.shape),
                    list(COLORS).index(obj.color),
                    np.log(obj.area / (height * width)),
                    *mask_centre(obj.masks[0]),
                ]
            )
    return frames, masks, torch.tensor(targets, dtype=torch.float32)


def object_perception_warmup(
    model,
    processor,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    box_fraction: float = 0.0,
    token_geometry_weight: float = 0.0,
    token_geometry_scale: float = 8.0,
    token_geometry_targets: tuple[str, ...] = ("area", "x", "y"),
) -> list:
    """Stage 1 (the paper's "object perception" stage, here with a direct read-out): train the vision tower, SAOT and
    (Lite) OCI to put an object's shape, colour, size and place into its tokens before the LLM learns to read them.

    From scratch the LLM first learns what random tokens already show (colour) and only slowly discovers shape, size
    and motion, which the tower in turn learns only once the LLM asks for them; supervising the tokens directly
    breaks that deadlock. Returns the loss of every step.
    """
    backbone = model.model
    head = ObjectPerceptionHead(model.config.text_config.hidden_size)
    modules = [backbone.vision_model, backbone.object_tokenizer, head]
    if backbone.object_infusion is not None:
        modules.append(backbone.object_infusion)
    optimizer = torch.optim.AdamW([p for m in modules for p in m.parameters()], lr=learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=steps, pct_start=0.1)
    rng = np.random.default_rng(10_000 + seed)  # scenes apart from the SFT rows (seed 0) and evaluation (1000+)
    box_rng = np.random.default_rng(20_000 + seed)  # its own stream: box_fraction=0 keeps the scenes as they were
    asked = [("area", "x", "y").index(name) for name in token_geometry_targets]  # columns of the per-token read-out
    losses = []
    model.train()
    for _ in range(steps):
        frames, masks, targets = perception_batch(rng, batch_size, box_rng, box_fraction)
        inputs, layouts = processor.image_processor.preprocess_multimodal(images=frames, regions=masks)
        # (sum of per-object token counts, text hidden); the still images' global tokens are not needed here.
        tokens = backbone.get_region_features(**{k: v for k, v in inputs.items() if k.startswith("region_")})
        counts = [region[0] for layout in layouts for region in layout.region_token_counts]
        pooled = torch.stack([torch.cat([t.mean(0), t.amax(0)]) for t in tokens.split(counts)])
        shape_logits, color_logits, geometry = head(pooled)
        loss = (
            nn.functional.cross_entropy(shape_logits, targets[:, 0].long())
            + nn.functional.cross_entropy(color_logits, targets[:, 1].long())
            + 10 * nn.functional.mse_loss(geometry, targets[:, 2:] * torch.tensor([0.25, 1.0, 1.0]))
        )
        if token_geometry_weight:
            # Every token of an object carries the object's (log-area, centre x, centre y), each mapped to [-1, 1]
            # and asked at strength `token_geometry_scale` (in units of the RMS-normalised token).
            geometry_targets = torch.stack(
                [
                    (targets[:, 2] - LOG_AREA_CENTER) / LOG_AREA_HALF_RANGE,
                    2 * targets[:, 3] - 1,
                    2 * targets[:, 4] - 1,
                ],
                dim=-1,
            ).repeat_interleave(torch.tensor(counts), dim=0)  # (num_tokens, 3)
            per_token = head.token_geometry(tokens)[:, asked] / token_geometry_scale
            loss = loss + token_geometry_weight * nn.functional.mse_loss(per_token, geometry_targets[:, asked])
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for m in modules for p in m.parameters()], 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if len(losses) % 25 == 0:
            print(f"object perception step {len(losses)}/{steps}: loss {np.mean(losses[-25:]):.3f}", flush=True)
    return losses


def direction_prompts(
    model, processor, num_videos: int, seed: int, video_shapes: tuple[int, int]
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Stage 1b's data: one prompt per moving shape of `num_videos` fresh training videos, each naming one region as
    the evaluation (and a user) asks it, encoded once through the frozen object side. Per prompt `(inputs_embeds
    (seq, hidden), input_ids (seq,), labels (seq,))`, the object (and image) slots filled."""
    collator = PixelReferDataCollator(processor)
    rows = shapes_region_chat_dataset(
        num_videos, seed=30_000 + seed, video_fraction=1.0, video_shapes=video_shapes, ask_every_moving_shape=True
    ).to_list()
    prompts = [
        {**row, "messages": row["messages"][2 * turn : 2 * turn + 2], "regions": row["regions"][turn : turn + 1]}
        for row in rows
        for turn in range(len(row["regions"]))
    ]
    cached = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(prompts), 8):
            batch = collator(prompts[start : start + 8])
            inputs = {k: v for k, v in batch.items() if k not in ("attention_mask", "labels")}
            embeds, _, _ = model.model.embed_multimodal_inputs(**inputs)
            for row, length in enumerate(batch["attention_mask"].sum(-1).tolist()):  # right-padded
                cached.append((embeds[row, :length], batch["input_ids"][row, :length], batch["labels"][row, :length]))
    model.train()
    return cached


def direction_warmup(
    model,
    processor,
    num_videos: int,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    video_shapes: tuple[int, int],
) -> dict:
    """Stage 1b: teach the LLM `Which way does <region> move?` alone, from prompts encoded once
    (`direction_prompts`).

    With the object side frozen, a direction prompt's LLM input never changes, so its encoding (the expensive part:
    eight frames through the tower) can serve several epochs. A fresh 4-layer LLM needs a few thousand direction
    updates before it starts comparing a region's first and last frames, more than the videos a 30-minute stage 2
    can encode, and mixed among the still questions it stayed at chance in every earlier run of issue 16; stage 2 then
    keeps what this taught. Trains the LLM and its head on the answer tokens; the last tenth of the prompts is held
    out and scored (first answer token) after each epoch. Returns what was done and those scores.
    """
    cached = direction_prompts(model, processor, num_videos, seed, video_shapes)
    backbone, config = model.model, model.config
    media_ids = torch.tensor([config.region_token_id, config.image_token_id])
    held_out = max(1, len(cached) // 10)
    train, test = cached[:-held_out], cached[-held_out:]

    language_model, head = backbone.language_model, model.lm_head
    parameters = list({id(p): p for m in (language_model, head) for p in m.parameters()}.values())  # tied once

    def logits_and_labels(records):
        """Right-padded batch -> `(logits (batch, seq - 1, vocab), labels (batch, seq - 1))`, labels shifted."""
        length, hidden = max(len(r[1]) for r in records), records[0][0].shape[-1]
        embeds = torch.zeros(len(records), length, hidden)
        ids = torch.zeros(len(records), length, dtype=torch.long)
        labels = torch.full((len(records), length), -100)
        for row, (cached_embeds, cached_ids, cached_labels) in enumerate(records):
            embeds[row, : len(cached_ids)], ids[row, : len(cached_ids)] = cached_embeds, cached_ids
            labels[row, : len(cached_ids)] = cached_labels
        attention_mask = torch.arange(length)[None] < torch.tensor([len(r[1]) for r in records])[:, None]
        # Text slots re-embedded by the (trained) embedding table; object / image slots stay as encoded.
        embeds = torch.where(torch.isin(ids, media_ids)[..., None], embeds, language_model.embed_tokens(ids))
        states = language_model(inputs_embeds=embeds, attention_mask=attention_mask.long()).last_hidden_state
        return head(states[:, :-1]), labels[:, 1:]

    def first_token_accuracy(records) -> float:
        right = 0
        with torch.no_grad():
            for start in range(0, len(records), 32):
                logits, labels = logits_and_labels(records[start : start + 32])
                first = (labels != -100).int().argmax(-1)  # the answer's first token
                rows = torch.arange(len(labels))
                right += int((logits[rows, first].argmax(-1) == labels[rows, first]).sum())
        return right / len(records)

    steps_per_epoch = max(1, len(train) // batch_size)
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=learning_rate, total_steps=epochs * steps_per_epoch, pct_start=0.05
    )
    order_rng = np.random.default_rng(40_000 + seed)
    accuracy = []
    model.train()
    for epoch in range(epochs):
        order, losses = order_rng.permutation(len(train)), []
        for step in range(steps_per_epoch):
            logits, labels = logits_and_labels([train[k] for k in order[step * batch_size : (step + 1) * batch_size]])
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        model.eval()
        accuracy.append(round(first_token_accuracy(test), 3))
        model.train()
        print(
            f"direction warm-up epoch {epoch + 1}/{epochs}: loss {np.mean(losses):.3f}, held-out accuracy "
            f"{accuracy[-1]:.3f}",
            flush=True,
        )
    return {
        "videos": num_videos,
        "prompts": len(cached),
        "held_out_prompts": held_out,
        "epochs": epochs,
        "batch_size": batch_size,
        "held_out_accuracy_per_epoch": accuracy,
    }


PERCEPTION_PREFIXES = ("model.vision_model.", "model.object_tokenizer.", "model.object_infusion.")


def load_perception_weights(model, folder: str) -> None:
    """Copy the stage-1 modules (tower, SAOT, OCI) from the `model.safetensors` of `folder` into `model`; every one
    of their weights must be there with the same shape (a checkpoint of another variant or size is refused)."""
    path = Path(folder, "model.safetensors")
    if not path.is_file():
        raise FileNotFoundError(f"--perception_from {folder}: no model.safetensors there")
    own = {k: v for k, v in model.state_dict().items() if k.startswith(PERCEPTION_PREFIXES)}
    loaded = {k: v for k, v in load_file(path).items() if k.startswith(PERCEPTION_PREFIXES)}
    missing, unexpected = sorted(set(own) - set(loaded)), sorted(set(loaded) - set(own))
    wrong_shape = [k for k in set(own) & set(loaded) if own[k].shape != loaded[k].shape]
    if missing or unexpected or wrong_shape:
        raise ValueError(
            f"--perception_from {folder}: not this model's stage-1 modules (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}, other shapes {wrong_shape[:3]})"
        )
    model.load_state_dict(loaded, strict=False)


class RowWeightedCollator:
    """`PixelReferDataCollator`, plus `loss_weights` (one per sample): `video_weight` for a video row, 1 otherwise."""

    def __init__(self, collator: PixelReferDataCollator, video_weight: float):
        self.collator, self.video_weight = collator, video_weight

    def __call__(self, rows) -> dict:
        batch = self.collator(rows)
        if len(batch["input_ids"]) != len(rows):
            # The collator skipped a bad row, so the weights could no longer be matched to the samples.
            raise ValueError(
                f"RowWeightedCollator: {len(rows) - len(batch['input_ids'])} rows of the batch were skipped"
            )
        batch["loss_weights"] = torch.tensor([self.video_weight if row["frames"] else 1.0 for row in rows])
        return batch


class RowWeightedSFTTrainer(SFTTrainer):
    """`SFTTrainer` whose loss weights every answer token by its sample's `loss_weights` (from `RowWeightedCollator`),
    still divided by the number of answer tokens: direction turns are a small share of the answer tokens (about 12% at
    10% videos), and a fresh LLM needs a few thousand of them before it compares frames at all
    (`benchmarks/results/direction_learning_place.md`); the weight lends them more of each step without costing
    more videos, whose frames are the expensive part of a batch."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        weights = inputs.pop("loss_weights")
        inputs["use_cache"] = False
        outputs = model(**inputs, fused_lm_head=True)  # TRL's fused head: log-probs of the shifted labels
        mask = outputs.label_mask  # (batch, seq - 1)
        num_tokens = mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = -(outputs.log_probs * weights[:, None].to(outputs.log_probs)).sum() / torch.as_tensor(num_tokens).clamp(
            min=1
        )
        if outputs.is_top1 is not None:
            self._metrics["train"]["mean_token_accuracy"].append(
                (outputs.is_top1.sum() / mask.sum().clamp(min=1)).item()
            )
        return (loss, outputs) if return_outputs else loss


class TimeBudget(TrainerCallback):
    """Stop training at `deadline` (`time.monotonic()` seconds; checked after every step)."""

    def __init__(self, deadline: float):
        self.deadline = deadline

    def on_step_end(self, args, state, control, **kwargs):
        if time.monotonic() > self.deadline:
            control.should_training_stop = True


def main(shapes_args: ShapesArguments, training_args: SFTConfig) -> None:
    if shapes_args.threads:
        torch.set_num_threads(shapes_args.threads)
    started = time.monotonic()

    # Model: every weight random, seeded.
    config, processor = demo_config_and_processor(
        shapes_args.variant, image_processor_options={"object_crop": shapes_args.object_crop}
    )
    torch.manual_seed(training_args.seed)
    model = PixelReferForConditionalGeneration(config)
    if shapes_args.position_init_std:
        # The position embedding maps frame coordinates in [0, 1] onto features that leave the tower's final
        # LayerNorm at about unit scale. At the default init (std 0.02) positions are invisible next to them, and
        # size and motion (which only positions tell once SAOT has rescaled an object) are learned very slowly.
        position = model.model.object_tokenizer.position_embedding
        torch.nn.init.normal_(position.weight, std=shapes_args.position_init_std)
        torch.nn.init.zeros_(position.bias)
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id

    # Stage 1: object perception (tower, SAOT, OCI) with a direct read-out, or its result taken from a checkpoint.
    perception_losses = []
    perception_trained = bool(shapes_args.perception_from or shapes_args.perception_steps)
    if shapes_args.perception_from:
        load_perception_weights(model, shapes_args.perception_from)
    elif shapes_args.perception_steps:
        perception_losses = object_perception_warmup(
            model,
            processor,
            shapes_args.perception_steps,
            shapes_args.perception_batch_size,
            shapes_args.perception_learning_rate,
            training_args.seed,
            shapes_args.box_fraction,
            shapes_args.token_geometry_weight,
            shapes_args.token_geometry_scale,
            tuple(shapes_args.token_geometry_targets.split(",")),
        )
    if perception_trained:
        if not shapes_args.train_perception_in_sft:
            # Stage 2 then teaches the LLM (and PixelRefer's global projector) to read the tokens stage 1 shaped;
            # left trainable, the random LLM's early gradients wash those features out again.
            for module in (model.model.vision_model, model.model.object_tokenizer, model.model.object_infusion):
                if module is not None:
                    module.requires_grad_(False)

    video_shapes = tuple(int(n) for n in shapes_args.video_shapes.split(","))  # (fewest, most) moving shapes
    direction_warmup_summary = None
    if shapes_args.direction_warmup_videos:
        direction_warmup_summary = direction_warmup(
            model,
            processor,
            shapes_args.direction_warmup_videos,
            shapes_args.direction_warmup_epochs,
            shapes_args.direction_warmup_batch_size,
            training_args.learning_rate,
            training_args.seed,
            video_shapes,
        )

    # Data: one pass over freshly drawn scenes (no row is seen twice).
    num_rows = shapes_args.num_train_rows or training_args.max_steps * training_args.per_device_train_batch_size
    train_dataset = shapes_region_chat_dataset(
        num_rows,
        seed=shapes_args.scene_seed,
        video_fraction=shapes_args.video_fraction,
        max_questions_per_row=shapes_args.max_questions_per_row,
        min_questions_per_row=shapes_args.min_questions_per_row,
        video_shapes=video_shapes,
        kind_weights={"larger": shapes_args.larger_weight} if shapes_args.larger_weight else None,
        max_pairs=shapes_args.max_pairs,
        box_fraction=shapes_args.box_fraction,
        ask_every_moving_shape=shapes_args.ask_every_moving_shape,
    )
    collator = PixelReferDataCollator(processor)
    trainer_class = SFTTrainer
    if shapes_args.direction_loss_weight != 1.0:
        collator, trainer_class = (
            RowWeightedCollator(collator, shapes_args.direction_loss_weight),
            RowWeightedSFTTrainer,
        )

    deadlines = []
    if shapes_args.max_minutes:
        deadlines.append(time.monotonic() + 60 * shapes_args.max_minutes)
    if shapes_args.max_total_minutes:
        deadlines.append(started + 60 * shapes_args.max_total_minutes)
    deadline = min(deadlines) if deadlines else None
    trainer_kwargs = {
        "model": model,
        "args": training_args,
        "train_dataset": train_dataset,
        "processing_class": processor,
        "callbacks": [TimeBudget(deadline)] if deadline is not None else None,
    }
    trainer = trainer_class(data_collator=collator, **trainer_kwargs)
    result = trainer.train()
    trainer.save_model(training_args.output_dir)
    # The Trainer also pickles its arguments; a published folder holds safetensors and JSON only.
    Path(training_args.output_dir, "training_args.bin").unlink(missing_ok=True)
    if is_bundled_checkpoint_folder(training_args.output_dir):
        bundle_checkpoint(training_args.output_dir)  # shipped inside the package: no remote-code copies
    minutes = (time.monotonic() - started) / 60

    # What was done, next to the weights: the card and the evaluation script read it.
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    summary = {
        "variant": shapes_args.variant,
        "object_crop": shapes_args.object_crop,
        "steps": trainer.state.global_step,
        "rows": len(train_dataset),
        "video_fraction": shapes_args.video_fraction,
        "questions_per_row": [shapes_args.min_questions_per_row, shapes_args.max_questions_per_row],
        "video_shapes": shapes_args.video_shapes,
        "ask_every_moving_shape": shapes_args.ask_every_moving_shape,
        "direction_loss_weight": shapes_args.direction_loss_weight,
        "direction_warmup": direction_warmup_summary,
        "larger_weight": shapes_args.larger_weight,
        "max_pairs": shapes_args.max_pairs,
        "box_fraction": shapes_args.box_fraction,
        "token_geometry": {
            "weight": shapes_args.token_geometry_weight,
            "scale": shapes_args.token_geometry_scale,
            "targets": shapes_args.token_geometry_targets,
        },
        "batch_size": training_args.per_device_train_batch_size,
        "learning_rate": training_args.learning_rate,
        "torch_threads": torch.get_num_threads(),
        "minutes_total": round(minutes, 1),
        "train_runtime_minutes": round(result.metrics["train_runtime"] / 60, 1),
        "perception_steps": 0 if shapes_args.perception_from else shapes_args.perception_steps,
        "perception_from": shapes_args.perception_from,
        "perception_frozen_in_sft": perception_trained and not shapes_args.train_perception_in_sft,
        "perception_loss_first_last": [
            round(float(np.mean(part)), 3) for part in (perception_losses[:10], perception_losses[-10:])
        ]
        if perception_losses
        else None,
        "first_logged_loss": losses[0] if losses else None,
        "last_logged_loss": losses[-1] if losses else None,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    Path(training_args.output_dir, "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    Path(training_args.output_dir, "README.md").write_text(demo_model_card(summary))
    print(json.dumps(summary, indent=2))
    end_training(trainer.accelerator)  # as in finetune_lora.py


def default_training_arguments() -> dict:
    """Settings of the bundled PixelRefer demo checkpoint (about 26 minutes on one CPU core)."""
    return {
        "max_steps": 500,
        "per_device_train_batch_size": 8,
        "learning_rate": 1e-3,
        "weight_decay": 0.01,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 30,
        "max_grad_norm": 1.0,
        "logging_steps": 10,
        "save_strategy": "no",
        "report_to": "none",
        "seed": 0,
        "use_cpu": not torch.cuda.is_available(),
        # SFTConfig turns both on by default; on a CPU bf16 autocast makes the backward pass about 10x slower, and a
        # 4 M parameter model needs no activation checkpointing.
        "bf16": False,
        "gradient_checkpointing": False,
        # The collator builds every model input, so TRL must leave the rows alone.
        "remove_unused_columns": False,
        "dataset_kwargs": {"skip_prepare_dataset": True},
        "max_length": None,
        "dataloader_num_workers": 0,
    }


if __name__ == "__main__":
    parser = TrlParser((ShapesArguments, SFTConfig))
    parser.set_defaults(**default_training_arguments())
    shapes_args, training_args = parser.parse_args_and_config()
    main(shapes_args, training_args)
