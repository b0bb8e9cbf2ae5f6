"""pixelrefer_hf: PixelRefer and PixelRefer-Lite as transformers models.

Importing the package registers every class with the transformers Auto factories, so a saved folder loads with or
without `trust_remote_code` while the package is installed; `save_pretrained` copies the remote-code modules and writes
their `auto_map`, so the folder also loads where the package is not installed. The `region-qa` pipeline is
registered too; `RegionQAPipeline.save_pretrained` writes its code and `config.custom_pipelines` next to the model,
as transformers' custom pipelines travel.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
)
from transformers.pipelines import PIPELINE_REGISTRY

from .configuration_pixelrefer import PixelReferConfig
from .image_processing_pixelrefer import PixelReferImageProcessor
from .modeling_pixelrefer import (
    PixelReferForConditionalGeneration,
    PixelReferModel,
    PixelReferObjectCentricInfusion,
    PixelReferObjectTokenizer,
    PixelReferPreTrainedModel,
)
from .pipeline_region_qa import RegionQAPipeline
from .processing_pixelrefer import PixelReferProcessor

__version__ = "0.1.0"

AutoConfig.register(PixelReferConfig.model_type, PixelReferConfig, exist_ok=True)
# All three model factories give the generative class: users of remote-code region models call
# `AutoModel.from_pretrained(...).generate(...)`.
for _auto_class in (AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText):
    _auto_class.register(PixelReferConfig, PixelReferForConditionalGeneration, exist_ok=True)
AutoImageProcessor.register(PixelReferConfig, image_processor_classes={"pil": PixelReferImageProcessor}, exist_ok=True)
AutoProcessor.register(PixelReferConfig, PixelReferProcessor, exist_ok=True)

PixelReferConfig.register_for_auto_class()
PixelReferForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
PixelReferImageProcessor.register_for_auto_class("AutoImageProcessor")
PixelReferProcessor.register_for_auto_class("AutoProcessor")
PIPELINE_REGISTRY.register_pipeline(
    "region-qa", pipeline_class=RegionQAPipeline, pt_model=AutoModelForImageTextToText, type="multimodal"
)


def __getattr__(name: str):
    # The collator reads training rows with `datasets` (the `train` extra): imported on first use only.
    if name == "PixelReferDataCollator":
        try:
            from .collator import PixelReferDataCollator
        except ImportError as error:
            raise ImportError(
                f"PixelReferDataCollator needs the training extra: pip install 'pixelrefer-hf[train]' ({error})"
            ) from error
        return PixelReferDataCollator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "PixelReferConfig",
    "PixelReferDataCollator",
    "PixelReferForConditionalGeneration",
    "PixelReferImageProcessor",
    "PixelReferModel",
    "PixelReferObjectCentricInfusion",
    "PixelReferObjectTokenizer",
    "PixelReferPreTrainedModel",
    "PixelReferProcessor",
    "RegionQAPipeline",
]
