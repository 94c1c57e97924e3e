"""Device mesh construction and multi-process start-up.

The mesh has the axes ("data", "fsdp", "tensor"). Which of them a tensor is split over is
decided by the logical-axis rules (`llm.parallel.rules`), so pure data parallel, FSDP, tensor
parallel and FSDP+TP are different rule sets and mesh shapes, not different code.

Multi-slice (several TPU slices joined by the data-center network, DCN): with
`make_mesh.dcn = N > 1` the mesh gets an outer axis "dcn" of N slices, built by
`jax.experimental.mesh_utils.create_hybrid_device_mesh`: (data, fsdp, tensor) lie inside each
slice, on its fast interconnect (ICI), and only "dcn" crosses slices. Every rule set in
gin_configs/mesh/ puts the batch on ("dcn", "data", "fsdp") and no weight on "dcn", so slices
are data-parallel replicas and the only traffic between them is the gradient all-reduce.
Slices are recognised by the devices' `slice_index` (TPU multislice), else by process (one host
per granule, e.g. GPU nodes); `make_mesh.slices_from = "device_order"` cuts the device list
into N equal runs instead, which simulates a multi-slice layout on one host (fake CPU devices).
"""

from __future__ import annotations

import logging
import math
import os

import gin
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from llm.config import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
DCN_AXIS = "dcn"  # the outer, across-slices axis of a multi-slice mesh
SLICES_FROM = ("auto", "device_order")

log = logging.getLogger(__name__)


@gin.configurable
def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, dcn: int = 1,
              slices_from: str = "auto", devices: list | None = None) -> Mesh:
    """A mesh of shape (data, fsdp, tensor) over all devices (of every process), or
    (dcn, data, fsdp, tensor) over `dcn` slices when dcn > 1 (see the module docstring).

    One of data/fsdp/tensor may be -1: it takes whatever devices are left (per slice). The
    product must equal the device count (per slice). `jax.make_mesh` orders devices so the
    innermost axis ("tensor") stays on the fastest interconnect.
    slices_from: "auto" (devices' slice_index, else their process) or "device_order".
    """
    devices = list(jax.devices()) if devices is None else list(devices)
    if dcn != 1:
        return _multi_slice_mesh(dcn, [data, fsdp, tensor], slices_from, devices)
    return Mesh(_device_array(devices, [data, fsdp, tensor], f"make_mesh(data={data}, "
                              f"fsdp={fsdp}, tensor={tensor})"), MESH_AXES,
                axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _device_array(devices: list, shape: list[int], asked: str, where: str = "") -> np.ndarray:
    """`devices` as a (data, fsdp, tensor) array (-1 resolved), ordered for the interconnect."""
    n = len(devices)
    shape = list(shape)
    fix = ("Set make_mesh.data/fsdp/tensor so that their product is the device count (one of "
           "them may be -1), e.g. --gin_file=gin_configs/mesh/dp.gin; on CPU, "
           "XLA_FLAGS=--xla_force_host_platform_device_count=N simulates N devices.")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ConfigError(f"{asked}: each axis must be >= 1, and at most one may be -1. {fix}")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if n % known:
            raise ConfigError(f"{asked} needs a multiple of {known} devices{where}, but {n} "
                              f"{jax.default_backend()} device(s) are available. {fix}")
        shape[shape.index(-1)] = n // known
    if math.prod(shape) != n:
        raise ConfigError(f"{asked} needs {math.prod(shape)} devices{where}, but {n} "
                          f"{jax.default_backend()} device(s) are available. {fix}")
    # Auto axes: shardings are propagated by XLA (GSPMD) from our explicit in/out shardings and
    # `constrain` hints, the model MaxText and t5x use.
    if devices == list(jax.devices()):
        return jax.make_mesh(tuple(shape), MESH_AXES, devices=devices,
                             axis_types=(AxisType.Auto,) * len(MESH_AXES)).devices
    return np.asarray(devices).reshape(shape)


class _InSlice:
    """A device seen as belonging to slice `slice_index` (for `slices_from="device_order"`):
    what `create_hybrid_device_mesh` groups by; every other attribute is the device's."""

    def __init__(self, device, slice_index: int):
        self.device, self.slice_index = device, slice_index

    def __getattr__(self, name):
        return getattr(self.device, name)


def _multi_slice_mesh(dcn: int, shape: list[int], slices_from: str, devices: list) -> Mesh:
    """(dcn, data, fsdp, tensor) mesh: the ICI shape inside each slice, slices on the outside."""
    asked = f"make_mesh(dcn={dcn}, data={shape[0]}, fsdp={shape[1]}, tensor={shape[2]})"
    if slices_from not in SLICES_FROM:
        raise ConfigError(f"make_mesh.slices_from={slices_from!r} is not one of "
                          f"{', '.join(SLICES_FROM)}.")
    if dcn < 1 or len(devices) % dcn:
        raise ConfigError(f"{asked}: {len(devices)} devices do not split into dcn={dcn} slices; "
                          "set make_mesh.dcn to the number of slices.")
    if slices_from == "device_order":
        per = len(devices) // dcn
        devices = [_InSlice(d, i // per) for i, d in enumerate(devices)]
    by_slice = hasattr(devices[0], "slice_index")
    granules: dict[int, list] = {}
    for d in devices:
        granules.setdefault(d.slice_index if by_slice else d.process_index, []).append(d)
    what = "slices (device slice_index)" if by_slice else "processes (no slice_index)"
    sizes = {len(g) for g in granules.values()}
    if len(granules) != dcn or len(sizes) != 1:
        raise ConfigError(f"{asked}: the devices form {len(granules)} {what} of sizes "
                          f"{sorted(len(g) for g in granules.values())}, not {dcn} equal ones; "
                          "set make_mesh.dcn to the number of slices (or "
                          "make_mesh.slices_from='device_order' to simulate slices on one host).")
    per_slice = _device_array(next(iter(granules.values())), shape, asked, " per slice").shape
    array = mesh_utils.create_hybrid_device_mesh(
        (1, *per_slice), (dcn, 1, 1, 1), devices, process_is_granule=not by_slice)
    if slices_from == "device_order":
        array = np.vectorize(lambda d: d.device, otypes=[object])(array)
    axes = (DCN_AXIS, *MESH_AXES)
    return Mesh(array, axes, axis_types=(AxisType.Auto,) * len(axes))


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
