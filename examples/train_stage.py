# /// script
# dependencies = ["pixelrefer-hf[train]"]
# ///
"""Full (non-LoRA) stage-1 / stage-2 training of PixelRefer with the paper's per-module learning rates.

Stage 1 ("object perception") trains the object tokenizer (and OCI for Lite) at 1e-3 and the language model and
projector at 1e-5; stage 2 ("instruction tuning") trains all of them at 1e-5. The vision tower is frozen in both
(official recipe: lr 0; here `requires_grad=False`, which also saves its gradients and optimizer state). Official
settings: AdamW, no weight decay, 3 % warm-up, cosine schedule, bf16, gradient checkpointing, global batch 256.

On the CPU, as is (tiny random model, synthetic shapes):

    python examples/train_stage.py --stage 1 --output_dir runs/stage1-tiny --max_steps 4

On 8 GPUs (per-device batch 2 x 8 GPUs x accumulation 16 = 256), stage 1 then stage 2:

    accelerate launch --config_file examples/accelerate/deepspeed_zero2.yaml examples/train_stage.py --stage 1 \
        --model_name_or_path path/to/init --dataset_path data/stage1.json --output_dir runs/stage1 --bf16 \
        --per_device_train_batch_size 2 --gradient_accumulation_steps 16 --save_strategy steps --save_steps 1000
    accelerate launch --config_file examples/accelerate/deepspeed_zero2.yaml examples/train_stage.py --stage 2 \
        --model_name_or_path runs/stage1 --dataset_path data/stage2.json --output_dir runs/stage2 --bf16 \
        --per_device_train_batch_size 2 --gradient_accumulation_steps 16

`--model_name_or_path` is a PixelRefer checkpoint folder (a converted release, or the output of stage 1).
"""

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import AutoModelForImageTextToText, AutoProcessor
from trl import SFTConfig, SFTTrainer, TrlParser

from pixelrefer_hf.collator import PixelReferDataCollator
from pixelrefer_hf.data import load_official_annotations, synthetic_region_chat_dataset
from pixelrefer_hf.testing import tiny_model_and_processor
from pixelrefer_hf.training_utils import end_training

# Learning rate of the object tokenizer (+ OCI) per stage; everything else uses `--learning_rate` (1e-5).
OBJECT_LEARNING_RATES = {1: 1e-3, 2: 1e-5}
# Parameter-name fragments of the modules that get the object learning rate. Matched as substrings so that wrapper
# prefixes (DDP `module.`, FSDP `_fsdp_wrapped_module.`) do not matter.
OBJECT_MODULES = (".object_tokenizer.", ".object_infusion.")


@dataclass
class StageArguments:
    stage: int = field(default=1, metadata={"help": "1 (object perception) or 2 (instruction tuning)."})
    object_learning_rate: float | None = field(
        default=None, metadata={"help": "Override the object tokenizer / OCI learning rate (default: by stage)."}
    )
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Checkpoint folder; without it a tiny random model is built."}
    )
    variant: str = field(default="pixelrefer", metadata={"help": "Tiny model only: 'pixelrefer' or 'pixelrefer-lite'."})
    dataset_path: str | None = field(
        default=None, metadata={"help": "Official annotation .json/.jsonl (default: a synthetic dataset)."}
    )
    media_root: str | None = field(default=None, metadata={"help": "Folder of the annotations' media paths."})
    num_synthetic_samples: int = field(default=32, metadata={"help": "Size of the synthetic dataset."})
    collator_max_length: int | None = field(default=None, metadata={"help": "Truncate longer samples (text only)."})
    skip_bad_samples: bool = field(default=False, metadata={"help": "Skip bad samples with a counted warning."})


class StageTrainer(SFTTrainer):
    """SFTTrainer whose optimizer gives the object tokenizer (and OCI) its own learning rate."""

    def __init__(self, *args, object_learning_rate: float, **kwargs):
        self.object_learning_rate = object_learning_rate
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            model = self.model if model is None else model
            object_params, other_params = [], []
            for name, param in model.named_parameters():
                if param.requires_grad:
                    is_object = any(fragment in f".{name}" for fragment in OBJECT_MODULES)
                    (object_params if is_object else other_params).append(param)
            if not object_params:
                raise ValueError(f"no trainable parameter matches {OBJECT_MODULES}; is this a PixelRefer model?")
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            groups = [
                {"params": other_params, "lr": self.args.learning_rate, "weight_decay": self.args.weight_decay},
                {"params": object_params, "lr": self.object_learning_rate, "weight_decay": self.args.weight_decay},
            ]
            # The scheduler scales each group's own initial lr, so the ratio between groups holds throughout.
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer


def main(stage_args: StageArguments, training_args: SFTConfig) -> None:
    if stage_args.stage not in OBJECT_LEARNING_RATES:
        raise ValueError(f"--stage must be 1 or 2, got {stage_args.stage}")
    object_lr = stage_args.object_learning_rate
    if object_lr is None:
        object_lr = OBJECT_LEARNING_RATES[stage_args.stage]

    # Model
    if stage_args.model_name_or_path is None:
        model, processor = tiny_model_and_processor(stage_args.variant)
    else:
        dtype = torch.bfloat16 if training_args.bf16 else torch.float32
        model = AutoModelForImageTextToText.from_pretrained(
            stage_args.model_name_or_path, trust_remote_code=True, dtype=dtype
        )
        processor = AutoProcessor.from_pretrained(stage_args.model_name_or_path, trust_remote_code=True)
    model.model.vision_model.requires_grad_(False)

    # Dataset
    if stage_args.dataset_path is None:
        train_dataset = synthetic_region_chat_dataset(stage_args.num_synthetic_samples)
    else:
        train_dataset = load_official_annotations(
            stage_args.dataset_path, stage_args.media_root, skip_bad_samples=stage_args.skip_bad_samples
        )
    collator = PixelReferDataCollator(
        processor, skip_bad_samples=stage_args.skip_bad_samples, max_length=stage_args.collator_max_length
    )

    # Training
    trainer = StageTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        data_collator=collator,
        processing_class=processor,
        object_learning_rate=object_lr,
    )
    trainer.train()
    trainer.save_model(training_args.output_dir)
    end_training(trainer.accelerator)  # barrier, then the process group goes down while nothing can deadlock on it


def default_training_arguments() -> dict:
    """The official recipe where it applies (official_spec §7.1), plus what the collator needs from TRL."""
    return {
        "remove_unused_columns": False,
        "dataset_kwargs": {"skip_prepare_dataset": True},
        "max_length": None,
        "learning_rate": 1e-5,
        "weight_decay": 0.0,
        "optim": "adamw_torch",
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0.03,
        "gradient_checkpointing": True,
        "bf16": torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        "per_device_train_batch_size": 2,
        "num_train_epochs": 1,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
    }


if __name__ == "__main__":
    parser = TrlParser((StageArguments, SFTConfig))
    parser.set_defaults(**default_training_arguments())
    stage_args, training_args = parser.parse_args_and_config()
    main(stage_args, training_args)
