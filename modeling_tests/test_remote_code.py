"""Save, then load in a fresh process where pixelrefer_hf cannot be imported, through remote code, offline."""

import json
import os
import textwrap

import numpy as np
import pytest
import torch
from fresh_process import run_python

from pixelrefer_hf.testing import tiny_model_and_processor

REMOTE_MODULES = {
    "configuration_pixelrefer.py",
    "modeling_pixelrefer.py",
    "processing_pixelrefer.py",
    "image_processing_pixelrefer.py",
    "region_utils.py",
}

# Runs in the child process. The import blocker makes `import pixelrefer_hf` fail, so everything must come from the
# code files saved next to the weights.
CHILD = textwrap.dedent(
    """
    import json, sys
    import numpy as np, torch
    from transformers import (AutoConfig, AutoImageProcessor, AutoModel, AutoModelForCausalLM,
                              AutoModelForImageTextToText, AutoProcessor)

    folder = sys.argv[1]
    data = np.load(folder + "/inputs.npz")
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    inputs = processor(text=[str(data["text"])], images=[data["image"]], regions=[[data["mask"], [4, 6, 30, 40]]],
                       return_tensors="pt")
    result = {"input_ids": inputs["input_ids"][0].tolist(),
              "image_processor": type(AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)).__name__,
              "config": type(AutoConfig.from_pretrained(folder, trust_remote_code=True)).__name__}
    for auto in (AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText):
        model = auto.from_pretrained(folder, trust_remote_code=True).eval()
        with torch.no_grad():
            tokens = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        result[auto.__name__] = {"class": type(model).__name__, "module": type(model).__module__,
                                 "tokens": tokens[0].tolist()}
    print("RESULT" + json.dumps(result))
    """
)


@pytest.mark.parametrize("variant", ["pixelrefer", "pixelrefer-lite"])
def test_fresh_process_loads_remote_code_offline_and_generates_the_same_tokens(variant, tmp_path):
    model, processor = tiny_model_and_processor(variant, seed=1)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, size=(64, 80, 3), dtype=np.uint8)
    mask = np.zeros((64, 80), dtype=bool)
    mask[20:40, 30:60] = True
    text = "<|im_start|>user\n<image>\nCompare <region> and <region>.<|im_end|>\n<|im_start|>assistant\n"
    inputs = processor(text=[text], images=[image], regions=[[mask, [4, 6, 30, 40]]], return_tensors="pt")
    with torch.no_grad():
        expected = model.generate(**inputs, max_new_tokens=8, do_sample=False)[0].tolist()

    folder = tmp_path / "checkpoint"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    np.savez(folder / "inputs.npz", image=image, mask=mask, text=np.array(text))

    saved = set(os.listdir(folder))
    assert REMOTE_MODULES <= saved, REMOTE_MODULES - saved
    assert "model.safetensors" in saved
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in saved)
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_pixelrefer.PixelReferConfig",
        "AutoModel": "modeling_pixelrefer.PixelReferForConditionalGeneration",
        "AutoModelForCausalLM": "modeling_pixelrefer.PixelReferForConditionalGeneration",
        "AutoModelForImageTextToText": "modeling_pixelrefer.PixelReferForConditionalGeneration",
    }
    processor_config = json.loads((folder / "processor_config.json").read_text())
    assert processor_config["auto_map"]["AutoProcessor"] == "processing_pixelrefer.PixelReferProcessor"

    result = run_python(CHILD, str(folder), cwd=tmp_path)
    assert result["config"] == "PixelReferConfig"
    assert result["image_processor"] == "PixelReferImageProcessor"
    assert result["input_ids"] == inputs["input_ids"][0].tolist()
    for auto in ("AutoModel", "AutoModelForCausalLM", "AutoModelForImageTextToText"):
        assert result[auto]["class"] == "PixelReferForConditionalGeneration"
        assert result[auto]["module"].startswith("transformers_modules."), result[auto]["module"]
        assert result[auto]["tokens"] == expected, auto


def test_reloaded_in_process_gives_identical_logits(tmp_path):
    """from_pretrained rebuilds non-persistent buffers (rotary frequencies) correctly."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model, processor = tiny_model_and_processor("pixelrefer", seed=2)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    reloaded_processor = AutoProcessor.from_pretrained(tmp_path)
    image = np.full((48, 64, 3), 120, dtype=np.uint8)
    image[10:30, 20:40] = (255, 0, 0)
    kwargs = {
        "text": "<image>\nWhat is <region>?",
        "images": image,
        "regions": [[18, 8, 42, 32]],
        "return_tensors": "pt",
    }
    inputs, reloaded_inputs = processor(**kwargs), reloaded_processor(**kwargs)
    for key in inputs:
        assert torch.equal(inputs[key], reloaded_inputs[key]), key
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits, atol=0, rtol=0)


def test_importing_the_package_registers_the_auto_classes():
    """With pixelrefer_hf imported, the Auto factories know the classes without any remote code."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText

    import pixelrefer_hf

    config = AutoConfig.for_model("pixelrefer", variant="pixelrefer-lite")
    assert isinstance(config, pixelrefer_hf.PixelReferConfig)
    for auto in (AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText):
        assert auto._model_mapping[type(config)] is pixelrefer_hf.PixelReferForConditionalGeneration
