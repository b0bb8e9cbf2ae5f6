"""The bundled demo checkpoints: small PixelRefer and PixelRefer-Lite models trained from scratch on synthetic shapes.

They are toys. They know five colours, three shapes, which of two shapes is larger and which way a shape moves
(`pixelrefer_hf.synthetic`), and nothing about real photos; they exist so that the `pixelrefer` command, the examples
and the tests run a model that really reads regions, offline, in seconds. For real weights convert a released
checkpoint (`pixelrefer convert --help`).

    >>> from pixelrefer_hf.demo import demo_checkpoint
    >>> path = demo_checkpoint("pixelrefer")      # a folder: AutoModel / AutoProcessor / pipeline("region-qa")

`examples/train_shapes.py` trains them (under 30 minutes per variant on a 2-core CPU) with [`demo_config`]; its output
folder is what is committed under `pixelrefer_hf/demo_checkpoints/`. This module is not remote code.
"""

from pathlib import Path

from .configuration_pixelrefer import PixelReferConfig
from .testing import processor_for_config
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
    # One patch of context around the tight box (released: two patches on images ~4x larger).
    "context_pixels": 14,
    "max_object_patches": 64,
    # Lite context images at the scale of the 224 px scenes.
    "local_image_size": 112,
    "global_image_size": 224,
    "oci_num_heads": 4,
    "max_visual_tokens": 1024,
    # Still images pooled 2x2 like video frames: 64 global tokens per 224 px scene instead of 256.
    "image_merge_size": 2,
    # Trained from scratch: the geometrically correct box encoding and a local crop per object.
    "legacy_box_position": False,
    "legacy_local_crop_reuse": False,
}


def demo_config(variant: str = "pixelrefer", tokenizer=None, **overrides) -> PixelReferConfig:
    """The configuration of the demo checkpoints, with token ids from `tokenizer` (the tiny offline one by default)."""
    tokenizer = tokenizer if tokenizer is not None else build_tiny_tokenizer()
    text_config = {**DEMO_TEXT_CONFIG, "vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id,
                   "pad_token_id": tokenizer.pad_token_id}
    return PixelReferConfig(
        variant=variant,
        text_config=text_config,
        vision_config=dict(DEMO_VISION_CONFIG),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        region_token_id=tokenizer.convert_tokens_to_ids("<REGION>"),
        **{**DEMO_DEFAULTS, **overrides},
    )


def demo_config_and_processor(variant: str = "pixelrefer", **overrides):
    """`(config, processor)` of an untrained demo model: the starting point of `examples/train_shapes.py`."""
    tokenizer = build_tiny_tokenizer()
    config = demo_config(variant, tokenizer, **overrides)
    return config, processor_for_config(config, tokenizer)


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


__all__ = ["DEMO_CHECKPOINTS", "demo_checkpoint", "demo_config", "demo_config_and_processor"]
