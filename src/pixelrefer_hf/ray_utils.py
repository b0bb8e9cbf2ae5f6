"""What the Ray Serve deployment (`serving.py`) and the Ray Data job (`batch_inference.py`) share: the guarded import
of Ray and the resources of an actor that holds one model (each loads its pipeline with
`cli.load_region_qa_pipeline`).

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


def cluster_has_gpus() -> bool:
    """Whether the Ray cluster this process is connected to has any GPU."""
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def actor_resources(num_cpus: float | None, num_gpus: float | None) -> dict[str, float]:
    """Ray resources of one actor holding one model (a Serve replica, a Data worker): by default one GPU when the
    cluster has GPUs (and then no CPU reserved beside it), else one CPU."""
    if num_gpus is None:
        num_gpus = 1 if cluster_has_gpus() else 0
    if num_cpus is None:
        num_cpus = 0 if num_gpus else 1
    return {"num_cpus": num_cpus, "num_gpus": num_gpus}
