# /// script
# dependencies = ["pixelrefer-hf[train]"]
# ///
"""LoRA fine-tuning of PixelRefer / PixelRefer-Lite on a region-chat dataset with TRL's SFTTrainer.

On the CPU, as is (tiny random model, synthetic shapes; about 20 s):

    python examples/finetune_lora.py --output_dir runs/lora-tiny

On one GPU, with a real checkpoint and your data (a `save_to_disk` folder of `pixelrefer_hf.data`, a parquet file, or
an official annotation JSON with its media next to it):

    python examples/finetune_lora.py --model_name_or_path path/to/PixelRefer-2B --dataset_path data/train.json \
        --output_dir runs/lora --bf16 --per_device_train_batch_size 2 --gradient_accumulation_steps 8 \
        --learning_rate 2e-4 --num_train_epochs 1

On several GPUs (see examples/accelerate/README.md), and as the test suite runs it, on two CPU processes (gloo):

    accelerate launch --config_file examples/accelerate/ddp.yaml examples/finetune_lora.py --output_dir runs/lora --bf16
    accelerate launch --config_file examples/accelerate/ddp.yaml --num_processes 2 --mixed_precision no \
        examples/finetune_lora.py --output_dir runs/lora-ddp --use_cpu --max_steps 2

LoRA adapters go on the attention and MLP projections of the language model only (a regex on `language_model`, so the
vision tower's identically named projections stay frozen); the object tokenizer (SAOT), OCI (Lite) and the global
projector (PixelRefer) are trained in full through `modules_to_save`. The vision tower stays frozen. The adapter (with
the processor) is saved to `--output_dir`; `examples/merge_lora.py` merges it into a full model.
"""

from dataclasses import dataclass, field

import torch
from datasets import Dataset, load_dataset, load_from_disk
from peft import LoraConfig
from transformers import AutoModelForImageTextToText, AutoProcessor
from trl import SFTConfig, SFTTrainer, TrlParser

from pixelrefer_hf.collator import PixelReferDataCollator
from pixelrefer_hf.data import load_official_annotations, synthetic_region_chat_dataset
from pixelrefer_hf.testing import tiny_model_and_processor
from pixelrefer_hf.training_utils import end_training

# LoRA targets: the Qwen2 projections inside `model.language_model` (PEFT matches the regex against full names).
LANGUAGE_MODEL_TARGETS = r".*\.language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
# Trained in full: SAOT (position embedding + token MLP), OCI (Lite only) and the global projector (PixelRefer only).
# PEFT matches these names as suffixes; "model.projector" does not match "object_tokenizer.projector".
FULLY_TRAINED_MODULES = ["object_tokenizer", "object_infusion", "model.projector"]


@dataclass
class ScriptArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Checkpoint folder or Hub id; without it a tiny random model is built."}
    )
    variant: str = field(default="pixelrefer", metadata={"help": "Tiny model only: 'pixelrefer' or 'pixelrefer-lite'."})
    dataset_path: str | None = field(
        default=None,
        metadata={"help": "A save_to_disk folder, a .parquet file or official .json/.jsonl annotations."},
    )
    media_root: str | None = field(
        default=None, metadata={"help": "Official annotations: folder of the image/video paths (default: its folder)."}
    )
    num_synthetic_samples: int = field(default=32, metadata={"help": "Size of the synthetic dataset."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    collator_max_length: int | None = field(
        default=None,
        metadata={
            "help": "Truncate longer samples (text only; samples that would lose visual or "
            "region tokens raise or are skipped)."
        },
    )
    skip_bad_samples: bool = field(
        default=False, metadata={"help": "Skip bad samples with a counted warning instead of stopping."}
    )


def load_region_chat_dataset(script_args: ScriptArguments) -> Dataset:
    path = script_args.dataset_path
    if path is None:
        return synthetic_region_chat_dataset(script_args.num_synthetic_samples)
    if path.endswith((".json", ".jsonl")):
        return load_official_annotations(path, script_args.media_root, skip_bad_samples=script_args.skip_bad_samples)
    if path.endswith(".parquet"):
        return load_dataset("parquet", data_files=path, split="train")
    return load_from_disk(path)


def main(script_args: ScriptArguments, training_args: SFTConfig) -> None:
    # Model
    if script_args.model_name_or_path is None:
        model, processor = tiny_model_and_processor(script_args.variant)
    else:
        dtype = torch.bfloat16 if training_args.bf16 else torch.float32
        model = AutoModelForImageTextToText.from_pretrained(
            script_args.model_name_or_path, trust_remote_code=True, dtype=dtype
        )
        processor = AutoProcessor.from_pretrained(script_args.model_name_or_path, trust_remote_code=True)
    # The vision tower is never trained: freezing it here also keeps it out of the optimizer.
    model.model.vision_model.requires_grad_(False)
    peft_config = LoraConfig(
        r=script_args.lora_r,
        lora_alpha=script_args.lora_alpha,
        lora_dropout=script_args.lora_dropout,
        target_modules=LANGUAGE_MODEL_TARGETS,
        modules_to_save=FULLY_TRAINED_MODULES,
        task_type="CAUSAL_LM",
    )

    # Dataset
    train_dataset = load_region_chat_dataset(script_args)
    collator = PixelReferDataCollator(
        processor, skip_bad_samples=script_args.skip_bad_samples, max_length=script_args.collator_max_length
    )

    # Training
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        data_collator=collator,
        processing_class=processor,
        peft_config=peft_config,
    )
    trainer.train()
    trainer.save_model(training_args.output_dir)
    end_training(trainer.accelerator)  # barrier, then the process group goes down while nothing can deadlock on it


def default_training_arguments() -> dict:
    """SFTConfig values this script needs (the collator builds every model input, so TRL must not touch the data)."""
    return {
        "remove_unused_columns": False,  # keep `regions`, `frames`, `id` for the collator
        "dataset_kwargs": {"skip_prepare_dataset": True},
        "max_length": None,  # truncation belongs to the collator, which never cuts through region tokens
        "gradient_checkpointing": True,
        "learning_rate": 2e-4,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0.03,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "bf16": torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        "per_device_train_batch_size": 4,
        "num_train_epochs": 1,
    }


if __name__ == "__main__":
    parser = TrlParser((ScriptArguments, SFTConfig))
    parser.set_defaults(**default_training_arguments())
    script_args, training_args = parser.parse_args_and_config()
    main(script_args, training_args)
