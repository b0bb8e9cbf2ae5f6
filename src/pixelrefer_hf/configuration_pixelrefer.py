"""Configuration of PixelRefer (Vision-Object) and PixelRefer-Lite (Object-Only).

Every constant the modeling code reads lives here as a typed field. The preprocessing constants (crop scales,
context, budgets, merge sizes, token compression) belong to `PixelReferImageProcessor` and are saved in
`processor_config.json`. Two facts are needed on both sides: `variant` and `num_object_tokens` are owned here; the
image processor takes them from `PixelReferConfig.image_processor_kwargs()` when it is built for a model, and a
processor that disagrees with its model is refused (`check_processor_matches_config`) before anything runs.
"""

from typing import ClassVar

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.models.video_llama_3.configuration_video_llama_3 import VideoLlama3VisionConfig

VARIANTS = ("pixelrefer", "pixelrefer-lite")
# Where the remote code of each Auto class lives. All three model factories give the generative class, so that
# `AutoModel.from_pretrained(repo, trust_remote_code=True).generate(...)` works as users of region models expect.
AUTO_MAP = {
    "AutoConfig": "configuration_pixelrefer.PixelReferConfig",
    "AutoModel": "modeling_pixelrefer.PixelReferForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_pixelrefer.PixelReferForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_pixelrefer.PixelReferForConditionalGeneration",
}
# The task of this package's pipeline. Its code travels only with folders the pipeline saves
# (`RegionQAPipeline.save_pretrained`, which writes `config.custom_pipelines`), as transformers' custom pipelines do.
PIPELINE_TASK = "region-qa"
# Loaded from the installed package, whose import registers `region-qa` in transformers' pipeline registry, a folder
# whose config.json names the pipeline would make `pipeline()` prefer the folder's copy and demand
# `trust_remote_code`; in memory the registered pipeline wins. A remote-code copy of this module keeps the entry.
_LOADED_AS_REMOTE_CODE = not __name__.startswith("pixelrefer_hf.")
KMEANS_INITS = ("linspace", "random")
# Fields of configs saved before the preprocessing constants moved to the image processor (its
# processor_config.json holds them); dropped on load so that they cannot disagree with the processor.
LEGACY_PROCESSOR_FIELDS = (
    "max_object_patches",
    "context_pixels",
    "local_image_size",
    "global_image_size",
    "legacy_local_crop_reuse",
    "max_visual_tokens",
    "use_token_compression",
    "token_compression_threshold",
    "object_crop",
    "spatial_merge_size",
    "image_merge_size",
)


class PixelReferConfig(PreTrainedConfig):
    r"""
    Configuration of [`PixelReferForConditionalGeneration`].

    Args:
        text_config (`dict` or `PreTrainedConfig`, *optional*):
            The Qwen2 language model. Defaults to a `Qwen2Config`.
        vision_config (`dict` or `VideoLlama3VisionConfig`, *optional*):
            The VideoLLaMA3 NaViT SigLIP vision tower (hidden 1152, 27 layers, patch 14 in the released models).
        variant (`str`, *optional*, defaults to `"pixelrefer"`):
            `"pixelrefer"` is the Vision-Object framework (global image/frame tokens and object tokens reach the LLM);
            `"pixelrefer-lite"` is the Object-Only framework (an Object-Centric Infusion module fuses local and global
            context into the object tokens, and only object tokens reach the LLM).
        image_token_id (`int`): id of the `<image>` token, one per global visual token.
        region_token_id (`int`): id of the `<REGION>` token, one per object token.
        num_object_tokens (`int`, *optional*, defaults to 32):
            n, the number of tokens an object is reduced to by k-means (official `mask_num`).
        kmeans_iterations (`int`, *optional*):
            Iterations of the object-token k-means. Defaults to 5 for PixelRefer and 3 for PixelRefer-Lite, as in the
            released code.
        kmeans_tolerance (`float`, *optional*, defaults to 1e-6):
            A region stops iterating once no centroid moves by more than this (official early stop).
        kmeans_init (`str`, *optional*, defaults to `"linspace"`):
            How the n initial centroids are picked among an object's patches: `"linspace"` takes evenly spaced patches
            in raster order (deterministic, spatially spread, tokens come out in spatial order); `"random"` takes a
            seeded pseudo-random subset, the closest match to the official `torch.randperm` initialisation. Both are
            deterministic and batch-invariant.
        kmeans_seed (`int`, *optional*, defaults to 0): seed of the `"random"` initialisation.
        oci_num_heads (`int`, *optional*, defaults to 8): Lite only. Heads of the two OCI cross-attentions.
        legacy_box_position (`bool`, *optional*, defaults to `True`):
            The released weights were trained with a relative position encoding whose box extents and offsets are
            transposed (row extent used for columns and vice versa). Keep `True` for converted checkpoints; `False`
            uses the geometrically correct mapping for models trained from scratch.
        tie_word_embeddings (`bool`, *optional*, defaults to `False`): tie `lm_head` to the input embeddings.

    Example:

    ```python
    >>> from pixelrefer_hf import PixelReferConfig, PixelReferForConditionalGeneration
    >>> config = PixelReferConfig(variant="pixelrefer-lite")
    >>> config.kmeans_iterations
    3
    ```
    """

    model_type = "pixelrefer"
    sub_configs_defaults: ClassVar = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2"),
        "vision_config": VideoLlama3VisionConfig,
    }
    keys_to_ignore_at_inference: ClassVar = ["past_key_values"]

    text_config: dict | PreTrainedConfig | None = None
    vision_config: dict | PreTrainedConfig | None = None
    variant: str = "pixelrefer"
    image_token_id: int = 151665
    region_token_id: int = 151668
    num_object_tokens: int = 32
    kmeans_iterations: int | None = None
    kmeans_tolerance: float = 1e-6
    kmeans_init: str = "linspace"
    kmeans_seed: int = 0
    oci_num_heads: int = 8
    legacy_box_position: bool = True
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        for name in LEGACY_PROCESSOR_FIELDS:
            kwargs.pop(name, None)
        super().__post_init__(**kwargs)
        if self.variant not in VARIANTS:
            raise ValueError(f"`variant` must be one of {VARIANTS}, got {self.variant!r}.")
        if self.kmeans_init not in KMEANS_INITS:
            raise ValueError(f"`kmeans_init` must be one of {KMEANS_INITS}, got {self.kmeans_init!r}.")
        if self.num_object_tokens < 1:
            raise ValueError(f"`num_object_tokens` must be at least 1, got {self.num_object_tokens}.")
        if self.vision_config.hidden_size % self.oci_num_heads != 0:
            raise ValueError(
                f"`oci_num_heads` ({self.oci_num_heads}) must divide the vision width "
                f"({self.vision_config.hidden_size})."
            )
        # The variant-dependent default is resolved once here, so the saved config.json states the value in use.
        if self.kmeans_iterations is None:
            self.kmeans_iterations = 3 if self.is_lite else 5
        # save_pretrained merges the classes' own auto classes into this map; entries loaded from a hub config win.
        self.auto_map = {**AUTO_MAP, **(getattr(self, "auto_map", None) or {})}
        loaded_pipelines = getattr(self, "custom_pipelines", None) or {}
        if not _LOADED_AS_REMOTE_CODE and PIPELINE_TASK in loaded_pipelines:
            loaded_pipelines = {task: spec for task, spec in loaded_pipelines.items() if task != PIPELINE_TASK}
        if loaded_pipelines:
            self.custom_pipelines = loaded_pipelines
        elif hasattr(self, "custom_pipelines"):
            del self.custom_pipelines
        # Qwen2.5-1.5B ties its embeddings; the flag may only be present in the text config.
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True

    @property
    def is_lite(self) -> bool:
        """True for the Object-Only framework (PixelRefer-Lite)."""
        return self.variant == "pixelrefer-lite"

    def image_processor_kwargs(self) -> dict:
        """The facts this config owns that the image processor needs: build a processor for this model with
        `PixelReferImageProcessor(**config.image_processor_kwargs(), **preprocessing_options)`."""
        return {
            "variant": self.variant,
            "num_object_tokens": self.num_object_tokens,
            "patch_size": self.vision_config.patch_size,
        }


def check_processor_matches_config(config: PixelReferConfig, image_processor) -> None:
    """Refuse an image processor whose shared facts differ from the model's config, naming each difference.

    The model would otherwise fail later with a placeholder-count mismatch (a different `n` or variant gives other
    token counts), or silently read crops cut for another patch size."""
    differences = [
        f"{name}: model {expected!r}, processor {getattr(image_processor, name, None)!r}"
        for name, expected in config.image_processor_kwargs().items()
        if getattr(image_processor, name, None) != expected
    ]
    if differences:
        raise ValueError(
            "the image processor does not match the model (" + "; ".join(differences) + "); load both from the "
            "same checkpoint, or build the processor with PixelReferImageProcessor(**config.image_processor_kwargs())"
        )


__all__ = ["PixelReferConfig", "check_processor_matches_config"]
