"""What the Ray Serve deployment (`serving.py`) and the Ray Data job (`batch_inference.py`) share: the guarded import
of Ray, and how a worker process loads the region-qa pipeline on its device.

Not remote code: nothing here travels with a checkpoint, and importing `pixelrefer_hf` never imports Ray.
"""

from __future__ import annotations

import importlib

SERVE_EXTRA_HINT = 'pip install "pixelrefer-hf[serve]"'


def require_ray(what: str, modules: tuple[str, ...] = ("ray",)) -> None:
    """Raise an ImportError naming the `serve` extra when one of `modules` cannot be imported."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as error:
            raise ImportError(f"{what} needs Ray ({name} is missing): {SERVE_EXTRA_HINT}") from error


def load_region_qa_pipeline(model: str, device: str | None = None, dtype: str = "auto"):
    """The region-qa pipeline of `model` (a checkpoint folder, repo id, `demo[-lite]` or `tiny-random[-lite]`, as
    `pixelrefer ask --model` takes) in this process: on `device` (default: the GPU Ray gave this worker, else the
    CPU), in bfloat16 on a GPU and the checkpoint's dtype on the CPU unless `dtype` says otherwise."""
    import torch

    from .cli import load_model_and_processor
    from .pipeline_region_qa import RegionQAPipeline

    # Ray sets CUDA_VISIBLE_DEVICES to the GPUs it assigned to this worker, so "cuda" is the worker's own GPU.
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype != "auto" and dtype not in dtypes:
        raise ValueError(f"dtype must be auto, {', '.join(dtypes)}; got {dtype!r}")
    loaded, processor = load_model_and_processor(model)
    chosen = dtypes.get(dtype) or (torch.bfloat16 if device.type == "cuda" else loaded.dtype)
    loaded = loaded.to(device=device, dtype=chosen).eval()
    return RegionQAPipeline(model=loaded, processor=processor, task="region-qa", device=device)


def cluster_has_gpus() -> bool:
    """Whether the Ray cluster this process is connected to has any GPU."""
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0
