"""Device mesh construction and multi-process start-up.

The mesh always has the axes ("data", "fsdp", "tensor"). Which of them a tensor is split over is
decided by the logical-axis rules (`llm.parallel.rules`), so pure data parallel, FSDP, tensor
parallel and FSDP+TP are different rule sets and mesh shapes, not different code.
"""

from __future__ import annotations

import logging
import math
import os

import gin
import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from llm.config import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

log = logging.getLogger(__name__)


@gin.configurable
def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: list | None = None) -> Mesh:
    """A mesh of shape (data, fsdp, tensor) over all devices (of every process).

    One axis may be -1: it takes whatever devices are left. The product must equal the device
    count. `jax.make_mesh` orders devices so the innermost axis ("tensor") stays on the fastest
    interconnect.
    """
    devices = list(jax.devices()) if devices is None else list(devices)
    n = len(devices)
    shape = [data, fsdp, tensor]
    asked = f"make_mesh(data={data}, fsdp={fsdp}, tensor={tensor})"
    fix = ("Set make_mesh.data/fsdp/tensor so that their product is the device count (one of "
           "them may be -1), e.g. --gin_file=gin_configs/mesh/dp.gin; on CPU, "
           "XLA_FLAGS=--xla_force_host_platform_device_count=N simulates N devices.")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ConfigError(f"{asked}: each axis must be >= 1, and at most one may be -1. {fix}")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if n % known:
            raise ConfigError(f"{asked} needs a multiple of {known} devices, but {n} "
                              f"{jax.default_backend()} device(s) are available. {fix}")
        shape[shape.index(-1)] = n // known
    if math.prod(shape) != n:
        raise ConfigError(f"{asked} needs {math.prod(shape)} devices, but {n} "
                          f"{jax.default_backend()} device(s) are available. {fix}")
    # Auto axes: shardings are propagated by XLA (GSPMD) from our explicit in/out shardings and
    # `constrain` hints, the model MaxText and t5x use.
    auto = (AxisType.Auto,) * len(MESH_AXES)
    if devices == list(jax.devices()):
        return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=auto, devices=devices)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def mesh_shape(mesh: Mesh) -> dict[str, int]:
    """{axis name: size}, for manifests and logs."""
    return {name: int(size) for name, size in mesh.shape.items()}


@gin.configurable
def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None,
                           cpu_collectives: str = "gloo") -> bool:
    """Start the multi-process runtime when running on more than one process.

    With no arguments this is a no-op on one process, and auto-detects Cloud TPU / SLURM pods
    through `jax.distributed.initialize()` when `LLM_DISTRIBUTED=auto` is set. Explicit arguments
    (or env LLM_COORDINATOR, LLM_NUM_PROCESSES, LLM_PROCESS_ID) start a CPU/GPU cluster by hand,
    e.g. two CPU processes on loopback. On CPU, collectives use `cpu_collectives` (gloo).
    Returns True when the distributed runtime was initialized.
    """
    coordinator_address = coordinator_address or os.environ.get("LLM_COORDINATOR")
    num_processes = num_processes or _env_int("LLM_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("LLM_PROCESS_ID")
    if coordinator_address is None and os.environ.get("LLM_DISTRIBUTED") != "auto":
        return False
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
    log.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
    return True


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value is not None else None
