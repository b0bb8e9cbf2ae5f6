# /// script
# dependencies = ["pixelrefer-hf[train]"]
# ///
"""Train a demo PixelRefer / PixelRefer-Lite from scratch on synthetic shapes with TRL's SFTTrainer (CPU friendly).

The bundled demo checkpoints were made with exactly these commands (each on one core of a 2-core CPU, both at once):

    python examples/train_shapes.py --variant pixelrefer \
        --output_dir src/pixelrefer_hf/demo_checkpoints/pixelrefer-shapes
    python examples/train_shapes.py --variant pixelrefer-lite \
        --output_dir src/pixelrefer_hf/demo_checkpoints/pixelrefer-lite-shapes

The ablation of the README (plain mask pooling over the whole frame instead of SAOT's scale-adaptive crop):

    python examples/train_shapes.py --variant pixelrefer --object_crop frame --output_dir runs/shapes-mask-pooling

A quick smoke run (a few steps, a few seconds):

    python examples/train_shapes.py --output_dir runs/shapes-smoke --max_steps 3 --num_train_rows 24

Every weight starts random (`pixelrefer_hf.demo.demo_config`: a 3-layer 128-wide vision tower, a 4-layer 256-wide
Qwen2, 8 object tokens); the data are conversations about `pixelrefer_hf.synthetic` scenes; the loss is on the answers
only (`PixelReferDataCollator`). Evaluate with `examples/evaluate_shapes.py`.
"""

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer, TrlParser

from pixelrefer_hf.collator import PixelReferDataCollator
from pixelrefer_hf.demo import demo_config_and_processor, demo_model_card
from pixelrefer_hf.modeling_pixelrefer import PixelReferForConditionalGeneration
from pixelrefer_hf.synthetic import shapes_region_chat_dataset


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
    video_fraction: float = field(default=0.25, metadata={"help": "Share of video scenes among the rows."})
    max_minutes: float | None = field(
        default=None, metadata={"help": "Stop (and save) once training has run this long, whatever the step."}
    )
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads (default: torch's choice)."})


class TimeBudget(TrainerCallback):
    """Stop training once `max_minutes` have passed (checked after every step)."""

    def __init__(self, max_minutes: float):
        self.deadline = time.monotonic() + 60 * max_minutes

    def on_step_end(self, args, state, control, **kwargs):
        if time.monotonic() > self.deadline:
            control.should_training_stop = True


def main(shapes_args: ShapesArguments, training_args: SFTConfig) -> None:
    if shapes_args.threads:
        torch.set_num_threads(shapes_args.threads)
    started = time.monotonic()

    # Model: every weight random, seeded.
    config, processor = demo_config_and_processor(shapes_args.variant, object_crop=shapes_args.object_crop)
    torch.manual_seed(training_args.seed)
    model = PixelReferForConditionalGeneration(config)
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id

    # Data: one pass over freshly drawn scenes (no row is seen twice).
    num_rows = shapes_args.num_train_rows or training_args.max_steps * training_args.per_device_train_batch_size
    train_dataset = shapes_region_chat_dataset(
        num_rows, seed=shapes_args.scene_seed, video_fraction=shapes_args.video_fraction
    )
    collator = PixelReferDataCollator(processor)

    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        data_collator=collator,
        processing_class=processor,
        callbacks=[TimeBudget(shapes_args.max_minutes)] if shapes_args.max_minutes else None,
    )
    result = trainer.train()
    trainer.save_model(training_args.output_dir)
    # The Trainer also pickles its arguments; a published folder holds safetensors and JSON only.
    Path(training_args.output_dir, "training_args.bin").unlink(missing_ok=True)
    minutes = (time.monotonic() - started) / 60

    # What was done, next to the weights: the card and the evaluation script read it.
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    summary = {
        "variant": shapes_args.variant,
        "object_crop": shapes_args.object_crop,
        "steps": trainer.state.global_step,
        "rows": len(train_dataset),
        "video_fraction": shapes_args.video_fraction,
        "batch_size": training_args.per_device_train_batch_size,
        "learning_rate": training_args.learning_rate,
        "torch_threads": torch.get_num_threads(),
        "minutes_total": round(minutes, 1),
        "train_runtime_minutes": round(result.metrics["train_runtime"] / 60, 1),
        "first_logged_loss": losses[0] if losses else None,
        "last_logged_loss": losses[-1] if losses else None,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    Path(training_args.output_dir, "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    Path(training_args.output_dir, "README.md").write_text(demo_model_card(summary))
    print(json.dumps(summary, indent=2))
    trainer.accelerator.end_training()


def default_training_arguments() -> dict:
    """Settings of the bundled demo checkpoints (about 25 minutes per variant on one CPU core)."""
    return {
        "max_steps": 450,
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
