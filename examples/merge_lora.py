"""Merge a PixelRefer LoRA adapter (from examples/finetune_lora.py) into its base model and save a full model.

    python examples/merge_lora.py --adapter_path runs/lora-tiny --output_dir runs/merged-tiny
    python examples/merge_lora.py --adapter_path runs/lora --base_model path/to/PixelRefer-2B --output_dir runs/merged

The output folder holds the merged weights, the processor and the remote-code modules, so it loads anywhere with
`AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)` (no PEFT needed). Without
`--base_model` the base is the one recorded in the adapter; an adapter of the tiny random model (which records none)
is merged into `tiny_model_and_processor(--variant, --seed)`, the same weights finetune_lora.py started from.
"""

from dataclasses import dataclass, field

import torch
from peft import PeftConfig, PeftModel
from transformers import AutoModelForImageTextToText, AutoProcessor, HfArgumentParser

from pixelrefer_hf.testing import tiny_model_and_processor


@dataclass
class MergeArguments:
    adapter_path: str = field(metadata={"help": "Folder written by finetune_lora.py (adapter + processor)."})
    output_dir: str = field(metadata={"help": "Where the merged model and processor go."})
    base_model: str | None = field(default=None, metadata={"help": "Base checkpoint (default: the adapter's)."})
    variant: str = field(default="pixelrefer", metadata={"help": "Tiny base only: 'pixelrefer' / 'pixelrefer-lite'."})
    seed: int = field(default=0, metadata={"help": "Tiny base only: the seed of its random weights."})
    dtype: str = field(default="float32", metadata={"help": "Dtype of the merged weights: float32, bfloat16, float64."})


def merge(args: MergeArguments) -> None:
    # Model
    base_path = args.base_model or PeftConfig.from_pretrained(args.adapter_path).base_model_name_or_path
    if base_path is None:
        base, _ = tiny_model_and_processor(args.variant, seed=args.seed)
    else:
        base = AutoModelForImageTextToText.from_pretrained(base_path, trust_remote_code=True, dtype=torch.float32)
    # Merge in at least float32 (merging in bf16 would round twice), then cast once to the requested dtype.
    dtype = getattr(torch, args.dtype)
    base = base.to(torch.promote_types(dtype, torch.float32))
    merged = PeftModel.from_pretrained(base, args.adapter_path).merge_and_unload().to(dtype)

    # Save: weights, config with auto_map, remote-code modules, and the processor saved next to the adapter.
    merged.save_pretrained(args.output_dir)
    AutoProcessor.from_pretrained(args.adapter_path, trust_remote_code=True).save_pretrained(args.output_dir)


if __name__ == "__main__":
    (merge_args,) = HfArgumentParser(MergeArguments).parse_args_into_dataclasses()
    merge(merge_args)
