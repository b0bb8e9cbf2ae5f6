"""Can a demo LLM learn `Which way does <region> move?` from the object tokens it is given? A controlled test.

    python benchmarks/direction_learning.py --threads 1            # the bundled Lite checkpoint, ~20 minutes
    python benchmarks/direction_learning.py --model runs/shapes-new --train-scenes 300 --epochs 2 --json out.json

Stage 2 of `examples/train_shapes.py` freezes the object side, so the LLM input of a direction prompt never changes.
This script encodes the direction prompts of `--train-scenes` training videos (seed 0, the stage-2 scenes) and
`--test-scenes` held-out ones (seed 1000) once, as `pipeline("region-qa")` encodes them: the object tokens (and, for
PixelRefer, the global video tokens, with its projector held at the checkpoint's weights) in their slots of the
prompt. It then trains only the LLM on the first answer token, several epochs over those cached inputs, which gives
the LLM many more direction updates than stage 2 does, under these settings:

* `checkpoint LLM`: the checkpoint's own LLM, trained on;
* `fresh LLM`: a freshly initialised LLM of the same configuration;
* `fresh LLM, standardized tokens`: each object-token feature standardized over the training prompts, so that the
  part that changes from frame to frame weighs as much as any other;
* `fresh LLM, standardized, dense read-out`: also a linear read-out of the direction at every `<REGION>` position
  after the first frame, from the states after LLM layer 2 (a causal layer can compare a frame with the frames before
  it without knowing which frame is which);
* `fresh LLM, place added at s of the token norm`: controls, the same prompts with the shape's true centre on each
  frame added to its object tokens along two fixed unit directions, `s * mean token norm * (2 * centre - 1)`: how
  strongly place has to stand out in every token before the LLM picks direction up.

Baselines, logistic regression on the same tokens: the last frame's mean object token minus the first frame's (what
a reader that picks out those two frames can reach), and the mean over all frames (what an even average keeps).
Also printed: how much the mean object token changes from the first to the last frame, relative to its norm, and the
norms of object tokens and text embeddings. Scores: accuracy, chance 0.25.
"""

import argparse
import json
import time

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn
from transformers import pipeline

from pixelrefer_hf.demo import demo_checkpoint
from pixelrefer_hf.modeling_pixelrefer import PixelReferForConditionalGeneration
from pixelrefer_hf.synthetic import (
    DIRECTIONS,
    NUM_VIDEO_FRAMES,
    ShapesEvalItem,
    draw_video_scene,
    mask_centre,
    scene_questions,
)

ANSWERS = list(DIRECTIONS)


def encode_prompts(pipe, num_scenes: int, seed: int) -> list[dict]:
    """One record per direction question of `num_scenes` videos: the LLM input embeddings `(seq, hidden)`, the
    prompt ids `(seq,)`, the answer's index in `ANSWERS` and the id of its first token."""
    model, rng, records = pipe.model, np.random.default_rng(seed), []
    for _ in range(num_scenes):
        scene = draw_video_scene(rng)
        for question in scene_questions(scene, rng):
            inputs = pipe._encode([pipe.preprocess(ShapesEvalItem(scene, question).inputs)])
            with torch.no_grad():
                embeds, _, _ = model.model.embed_multimodal_inputs(
                    **{k: v for k, v in inputs.items() if k != "attention_mask"}
                )
            answer_id = pipe.tokenizer(question.answer, add_special_tokens=False)["input_ids"][0]
            masks = scene.objects[question.object_indices[0]].masks
            # (frames, 2): the shape's centre (x, y) on every frame, as a fraction of the frame.
            centres = [list(mask_centre(mask)) for mask in masks]
            records.append(
                {
                    "embeds": embeds[0],
                    "ids": inputs["input_ids"][0],
                    "label": ANSWERS.index(question.answer),
                    "answer_id": answer_id,
                    "centres": torch.tensor(centres, dtype=torch.float32),
                }
            )
    return records


def frame_means(record: dict, region_token_id: int) -> torch.Tensor:
    """`(frames, hidden)`: the mean object token of each frame of the prompt's one region."""
    tokens = record["embeds"][record["ids"] == region_token_id]
    return tokens.reshape(NUM_VIDEO_FRAMES, -1, tokens.shape[-1]).mean(1)


def baselines(train: list[dict], test: list[dict], region_token_id: int) -> dict[str, float]:
    def fit(features) -> float:
        x_train = np.stack([features(frame_means(r, region_token_id)).numpy() for r in train])
        x_test = np.stack([features(frame_means(r, region_token_id)).numpy() for r in test])
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
        probe.fit(x_train, [r["label"] for r in train])
        return float(probe.score(x_test, [r["label"] for r in test]))

    return {
        "logistic regression, last frame minus first": fit(lambda means: means[-1] - means[0]),
        "logistic regression, mean over frames": fit(lambda means: means.mean(0)),
    }


def token_scales(records: list[dict], region_token_id: int) -> dict[str, float]:
    changes, region_norms, text_norms = [], [], []
    for record in records:
        means = frame_means(record, region_token_id)
        changes.append(float((means[-1] - means[0]).norm() / means[0].norm()))
        is_region = record["ids"] == region_token_id
        region_norms.append(float(record["embeds"][is_region].norm(dim=-1).mean()))
        text_norms.append(float(record["embeds"][~is_region].norm(dim=-1).mean()))
    return {
        "first-to-last change of the mean object token / its norm (median)": float(np.median(changes)),
        "object token norm (mean)": float(np.mean(region_norms)),
        "text embedding norm in the prompt (mean)": float(np.mean(text_norms)),
    }


class CachedDirectionTrainer:
    """Trains an LLM (and its head) on cached direction prompts; the object (and image) slots stay fixed."""

    def __init__(
        self,
        checkpoint,
        fresh: bool,
        standardize: bool,
        dense_layer: int | None,
        train: list[dict],
        added_place: float = 0.0,
    ):
        config = checkpoint.config
        model = PixelReferForConditionalGeneration(config) if fresh else checkpoint
        self.language_model, self.head = model.model.language_model, model.lm_head
        self.region_token_id = config.region_token_id
        self.media_ids = torch.tensor([config.region_token_id, config.image_token_id])
        self.dense_layer = dense_layer
        self.dense_head = nn.Linear(config.text_config.hidden_size, len(ANSWERS)) if dense_layer else None
        self.shift = self.scale = None
        if standardize:
            tokens = torch.cat([r["embeds"][r["ids"] == self.region_token_id] for r in train])
            self.shift, self.scale = tokens.mean(0), tokens.std(0) + 1e-6
        # A control of what the LLM can learn when place is a large, consistent part of every object token: add
        # `added_place * mean token norm * (2 * centre - 1)` along two fixed random unit directions (x, y).
        self.added_place = None
        if added_place:
            norm = float(torch.cat([r["embeds"][r["ids"] == self.region_token_id] for r in train]).norm(dim=-1).mean())
            directions = torch.randn(2, config.text_config.hidden_size, generator=torch.Generator().manual_seed(1))
            self.added_place = added_place * norm * directions / directions.norm(dim=-1, keepdim=True)
        self.parameters = [*self.language_model.parameters(), *self.head.parameters()]
        if self.dense_head is not None:
            self.parameters += list(self.dense_head.parameters())

    def _batch(self, records: list[dict]):
        """Right-padded `(embeds (batch, seq, hidden), ids, attention_mask)`; text slots re-embedded by this LLM."""
        length, hidden = max(len(r["ids"]) for r in records), records[0]["embeds"].shape[-1]
        embeds = torch.zeros(len(records), length, hidden)
        ids = torch.zeros(len(records), length, dtype=torch.long)
        for row, record in enumerate(records):
            embeds[row, : len(record["ids"])], ids[row, : len(record["ids"])] = record["embeds"], record["ids"]
        attention_mask = (torch.arange(length)[None] < torch.tensor([len(r["ids"]) for r in records])[:, None]).long()
        is_region = ids == self.region_token_id
        if self.shift is not None:
            embeds[is_region] = (embeds[is_region] - self.shift) / self.scale
        if self.added_place is not None:
            for row, record in enumerate(records):
                # (frames, 2) centres -> (frames, hidden) -> one copy per object token of each frame.
                place = (2 * record["centres"] - 1) @ self.added_place
                embeds[row, is_region[row]] += place.repeat_interleave(int(is_region[row].sum()) // NUM_VIDEO_FRAMES, 0)
        is_media = torch.isin(ids, self.media_ids)[..., None]
        embeds = torch.where(is_media, embeds, self.language_model.embed_tokens(ids))
        return embeds, ids, attention_mask

    def loss_and_logits(self, records: list[dict]):
        embeds, ids, attention_mask = self._batch(records)
        outputs = self.language_model(
            inputs_embeds=embeds, attention_mask=attention_mask, output_hidden_states=self.dense_head is not None
        )
        last = attention_mask.sum(1) - 1
        logits = self.head(outputs.last_hidden_state[torch.arange(len(records)), last])
        loss = nn.functional.cross_entropy(logits, torch.tensor([r["answer_id"] for r in records]))
        if self.dense_head is not None:
            is_region = ids == self.region_token_id
            after_first_frame = is_region & (is_region.cumsum(1) > is_region.sum(1, keepdim=True) // NUM_VIDEO_FRAMES)
            labels = torch.tensor([r["label"] for r in records])[:, None].expand_as(ids)
            states = outputs.hidden_states[self.dense_layer][after_first_frame]
            loss = loss + nn.functional.cross_entropy(self.dense_head(states), labels[after_first_frame])
        return loss, logits

    @torch.no_grad()
    def accuracy(self, records: list[dict]) -> float:
        self.language_model.eval()
        correct = 0
        for start in range(0, len(records), 64):
            chunk = records[start : start + 64]
            _, logits = self.loss_and_logits(chunk)
            correct += int((logits.argmax(-1) == torch.tensor([r["answer_id"] for r in chunk])).sum())
        self.language_model.train()
        return correct / len(records)

    def fit(self, train: list[dict], test: list[dict], epochs: int, batch_size: int, learning_rate: float):
        optimizer = torch.optim.AdamW(self.parameters, lr=learning_rate, weight_decay=0.01)
        steps_per_epoch = len(train) // batch_size
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=learning_rate, total_steps=epochs * steps_per_epoch, pct_start=0.05
        )
        history = []
        for epoch in range(epochs):
            order, losses = np.random.default_rng(epoch).permutation(len(train)), []
            for step in range(steps_per_epoch):
                loss, _ = self.loss_and_logits([train[k] for k in order[step * batch_size : (step + 1) * batch_size]])
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.parameters, 1.0)
                optimizer.step()
                schedule.step()
                losses.append(loss.item())
            entry = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "train": self.accuracy(train[:300])}
            entry["test"] = self.accuracy(test)
            history.append(entry)
            print(
                f"  epoch {entry['epoch']}: loss {entry['loss']:.3f}, train {entry['train']:.3f}, "
                f"test {entry['test']:.3f}",
                flush=True,
            )
        return history


SETTINGS = {
    "checkpoint LLM": {"fresh": False, "standardize": False, "dense_layer": None},
    "fresh LLM": {"fresh": True, "standardize": False, "dense_layer": None},
    "fresh LLM, standardized tokens": {"fresh": True, "standardize": True, "dense_layer": None},
    "fresh LLM, standardized, dense read-out": {"fresh": True, "standardize": True, "dense_layer": 2},
    "fresh LLM, place added at 0.13 of the token norm": {
        "fresh": True,
        "standardize": False,
        "dense_layer": None,
        "added_place": 0.13,
    },
    "fresh LLM, place added at 0.5 of the token norm": {
        "fresh": True,
        "standardize": False,
        "dense_layer": None,
        "added_place": 0.5,
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint folder (default: the bundled Lite demo checkpoint)")
    parser.add_argument("--train-scenes", type=int, default=500)
    parser.add_argument("--test-scenes", type=int, default=120)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--setting", action="append", choices=list(SETTINGS), help="repeatable; default: all")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = args.model or demo_checkpoint("pixelrefer-lite")
    pipe = pipeline("region-qa", model=path, trust_remote_code=True)
    pipe.model.eval()
    started = time.perf_counter()
    train, test = encode_prompts(pipe, args.train_scenes, seed=0), encode_prompts(pipe, args.test_scenes, seed=1000)
    region_token_id = pipe.model.config.region_token_id
    print(f"{len(train)} training and {len(test)} held-out prompts encoded in {time.perf_counter() - started:.0f} s")
    report = {"model": str(path), "train_prompts": len(train), "test_prompts": len(test), "epochs": args.epochs}
    report["scales"] = token_scales(train, region_token_id)
    report["baselines"] = baselines(train, test, region_token_id)
    report["settings"] = {}
    for name in args.setting or list(SETTINGS):
        print(name, flush=True)
        torch.manual_seed(0)
        checkpoint = PixelReferForConditionalGeneration.from_pretrained(path)  # a fresh copy for every setting
        trainer = CachedDirectionTrainer(checkpoint, train=train, **SETTINGS[name])
        report["settings"][name] = trainer.fit(train, test, args.epochs, args.batch_size, args.learning_rate)

    lines = [f"# Learning direction from cached object tokens (`{path}`)", ""]
    lines += [f"{len(train)} training prompts (seed 0), {len(test)} held-out (seed 1000); accuracy, chance 0.25.", ""]
    lines += [f"* {name}: {value:.3f}" for name, value in report["scales"].items()]
    lines += ["", "| reader | held-out accuracy | training accuracy |", "|---|---|---|"]
    lines += [f"| {name} | {value:.3f} | - |" for name, value in report["baselines"].items()]
    for name, history in report["settings"].items():
        last = history[-1]
        lines.append(
            f"| {name} ({last['epoch']} epochs, last loss {last['loss']:.3f}) | {last['test']:.3f} | "
            f"{last['train']:.3f} |"
        )
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
