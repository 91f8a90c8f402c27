"""The Ray session of a run: joining or starting Ray, and sizing the actor pool.

Light on purpose (no torch): the driver starts Ray here while another thread
imports the model and checks the run (:mod:`cohort.execution.driver`).
"""

from __future__ import annotations

import logging
import os

from cohort.config import RunConfig
from cohort.errors import ConfigError

__all__ = ["ensure_ray", "plan_pool"]


def ensure_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    else:
        # "local": a private instance, never one a `ray start` on this machine left running
        ray.init(
            address="local",
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=False,
        )


def plan_pool(cfg: RunConfig) -> tuple[int, float, int | None]:
    """Actors, GPUs per actor and torch threads per actor, from the cluster's resources."""
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    cpus = float(resources.get("CPU", 1))
    use_gpu = cfg.execution.device == "cuda" or (cfg.execution.device == "auto" and gpus > 0)
    if cfg.execution.device == "cuda" and gpus == 0:
        raise ConfigError(
            "--device cuda was asked for but the Ray cluster has no GPU resource; "
            "use --device auto or cpu, or add GPU workers"
        )
    if cfg.model.precision == "bf16" and not use_gpu:
        raise ConfigError(
            "--precision bf16 runs the network in bfloat16 on CUDA devices, and this run "
            "uses the CPU; drop --precision (fp32 is the default) or run on GPU workers "
            "with --device cuda"
        )
    actors = cfg.execution.num_actors or (gpus if use_gpu else 1)
    threads = cfg.execution.torch_threads
    if threads is None and not use_gpu:
        threads = max(1, int(cpus // actors))
    return actors, (1.0 if use_gpu else 0.0), threads
