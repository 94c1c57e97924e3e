"""Will this config fit on that TPU slice? Compile the full train step for a Cloud TPU topology
ahead of time, on this CPU machine, and read XLA's own memory and cost analysis.

    python tools/aot_check.py --gin_file=gin_configs/experiments/quickstart.gin --topology=v5e-8
    python tools/aot_check.py --gin_file=... --gin_param='make_mesh.fsdp=8' --topology=v5p-64

The step is the one `experiments.pretrain_ntp` runs (`llm.train.step.jit_train_step`: forward,
backward, AdamW update, donated state), over the gin-configured model, TrainConfig batch and mesh
(`make_mesh`, `axis_rules`), lowered for the topology's devices with libtpu through
`jax.experimental.topologies` (MaxText's `train_compile.py` does the same). Without libtpu in
this interpreter the tool re-runs itself in the side environment named by $LLM_TPU_PYTHON
(default /tmp/tpuenv/bin/python, a venv with `jax[tpu]` at this jax version).

Reports, per device: argument, output, temporary and total HBM against the chip's HBM; the FLOPs
of one step (XLA cost analysis); a roofline step time (max of FLOPs / peak and bytes accessed /
HBM bandwidth) and the MFU it implies for the model's 6N-style FLOPs; and one verdict line
starting `fits:` or `does not fit:`. Exit 0 if it fits, 1 if not, 2 for bad input.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation. hbm/peak/bandwidth per chip (bf16 dense peak, Google's published
    figures); `count_unit`: what the number in the Cloud accelerator type counts."""

    name: str
    hbm_bytes: int
    peak_flops: float
    hbm_bandwidth: float
    count_unit: str  # "cores" (v4-8 = 4 chips) or "chips" (v5e-8 = 8 chips)
    dims: int  # 2D torus (v5e, v6e) or 3D (v4, v5p)


CHIPS = {
    "v4": Chip("v4", 32 * GiB, 275e12, 1.2e12, "cores", 3),
    "v5e": Chip("v5e", 16 * GiB, 197e12, 8.19e11, "chips", 2),
    "v5p": Chip("v5p", 95 * GiB, 459e12, 2.765e12, "cores", 3),
    "v6e": Chip("v6e", 32 * GiB, 918e12, 1.64e12, "chips", 2),
}
VALID = [f"{gen}-{n}" for gen, counts in (("v4", (8, 16, 32, 64, 128)),
                                           ("v5e", (4, 8, 16, 32, 64, 128, 256)),
                                           ("v5p", (8, 16, 32, 64, 128)),
                                           ("v6e", (4, 8, 16, 32, 64, 128, 256)))
         for n in counts]


class CheckError(Exception):
    """A user-fixable problem: one line on stderr, exit code 2."""


def parse_topology(name: str) -> tuple[Chip, int, str]:
    """'v5e-8' -> (chip, number of chips, jax topology string 'v5e:2x4')."""
    if name not in VALID:
        raise CheckError(f"--topology={name!r} is not a known TPU topology; valid: "
                         f"{', '.join(VALID)}.")
    gen, count = name.split("-")
    chip = CHIPS[gen]
    chips = int(count) // (2 if chip.count_unit == "cores" else 1)
    shape = [1] * chip.dims
    if chip.dims == 3:
        shape = [2, 2, 1]
    i = 0
    while math.prod(shape) < chips:  # grow the torus one axis at a time: 2x2x1 -> 2x2x2 -> ...
        axis = (chip.dims - 1 - i % chip.dims) if chip.dims == 3 else (1 - i % 2)
        shape[axis] *= 2
        i += 1
    return chip, chips, f"{gen}:{'x'.join(map(str, shape))}"


def verdict(memory: dict[str, int], hbm_bytes: int) -> str:
    """One line: `fits: ...` or `does not fit: ...`, with the shortfall and what to try.

    memory: per-device bytes {"arguments", "outputs", "temporaries", "aliased"}; the donated
    state aliases its outputs to its arguments, so aliased bytes count once.
    """
    total = peak_bytes(memory)
    share = total / hbm_bytes
    if total <= hbm_bytes:
        return (f"fits: {total / GiB:.2f} GiB of {hbm_bytes / GiB:.0f} GiB HBM per device "
                f"({share:.0%}), {(hbm_bytes - total) / GiB:.2f} GiB free")
    over = total - hbm_bytes
    hints = []
    if memory["arguments"] > 0.5 * hbm_bytes:
        hints.append("the state alone (params + optimizer moments, arguments "
                     f"{memory['arguments'] / GiB:.2f} GiB) needs sharding: FSDP "
                     "(--gin_file=gin_configs/mesh/fsdp.gin) or a bigger slice")
    if memory["temporaries"] > 0.25 * hbm_bytes or not hints:
        hints.append(f"activations (temporaries {memory['temporaries'] / GiB:.2f} GiB): "
                     "ModelConfig.remat='block', a smaller TrainConfig.global_batch_size or "
                     "more TrainConfig.accum_steps")
    hint = "; ".join(hints)
    return (f"does not fit: needs {total / GiB:.2f} GiB per device, {over / GiB:.2f} GiB "
            f"({share - 1:.0%}) over the {hbm_bytes / GiB:.0f} GiB HBM; {hint}")


def peak_bytes(memory: dict[str, int]) -> int:
    return memory["arguments"] + memory["outputs"] - memory["aliased"] + memory["temporaries"]


def compile_train_step(devices, vocab_size: int | None = None, platform: str | None = None):
    """Lower and compile the gin-configured train step for `devices` (gin already parsed).

    Returns (compiled, model flops of one step, {mesh axis: size}). Nothing is allocated: the
    state and the batch are ShapeDtypeStructs carrying their shardings.
    """
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from llm.model import transformer
    from llm.model.config import ModelConfig
    from llm.parallel.mesh import make_mesh, mesh_shape
    from llm.parallel.rules import axis_rules, tree_shardings
    from llm.train.experiment import check_batch_fits_mesh
    from llm.train.loop import TrainConfig
    from llm.train.loss import decoder_loss
    from llm.train.optimizer import make_optimizer
    from llm.train.state import TrainState
    from llm.train.step import batch_sharding, jit_train_step

    tc, cfg = TrainConfig(), ModelConfig()
    if vocab_size:
        cfg = dataclasses.replace(cfg, vocab_size=vocab_size)
    cfg.check_seq_len(tc.seq_len)
    mesh, rules = make_mesh(devices=devices), axis_rules()
    check_batch_fits_mesh(tc, mesh, rules)
    graphdef, abstract_params, logical_axes = transformer.abstract(cfg)
    tx, schedule = make_optimizer(total_steps=tc.steps)
    lower = {"lowering_platforms": (platform,)} if platform else {}

    param_sh = tree_shardings(logical_axes, abstract_params, mesh, rules)
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_params, param_sh)
    replicated = NamedSharding(mesh, PartitionSpec())
    # Optimizer moments (subtrees shaped like the params) are sharded like their parameters, as
    # XLA propagates them in `create_train_state`; counts and other scalars are replicated.
    params_def = jax.tree.structure(params)

    def like_params(x) -> bool:
        return not isinstance(x, jax.ShapeDtypeStruct) and jax.tree.structure(x) == params_def

    def place(x):
        if like_params(x):
            return jax.tree.map(lambda a, p: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                                  sharding=p.sharding), x, params)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated)

    opt_state = jax.tree.map(place, jax.eval_shape(tx.init, params), is_leaf=like_params)
    state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
                       params=params, opt_state=opt_state)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    step = jit_train_step(shardings, mesh, rules,
                          loss_fn=decoder_loss(graphdef, tc.z_loss, tc.loss_chunk), tx=tx,
                          schedule=schedule, accum_steps=tc.accum_steps)
    row = jax.ShapeDtypeStruct((tc.global_batch_size, tc.seq_len), jnp.int32,
                               sharding=batch_sharding(mesh, rules))
    batch = {k: row for k in ("inputs", "targets", "segment_ids", "positions")}
    batch["loss_mask"] = jax.ShapeDtypeStruct(row.shape, jnp.float32, sharding=row.sharding)
    model_flops = cfg.flops_per_token(tc.seq_len) * tc.seq_len * tc.global_batch_size
    lowered = step.trace(state, batch).lower(**lower)
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        # XLA:TPU refuses a program that cannot fit; its message says what it needed.
        raise OutOfHBM(str(e), _device_bytes((state, batch)), _device_bytes(state),
                       model_flops, mesh_shape(mesh)) from None
    return compiled, model_flops, mesh_shape(mesh)


class OutOfHBM(Exception):
    """The TPU compiler's RESOURCE_EXHAUSTED, with the per-device bytes we know ourselves."""

    def __init__(self, message: str, argument_bytes: int, state_bytes: int, model_flops: float,
                 mesh: dict):
        super().__init__(message)
        self.argument_bytes, self.state_bytes = argument_bytes, state_bytes
        self.model_flops, self.mesh = model_flops, mesh

    def memory(self) -> dict[str, int]:
        """Arguments (and the donated state aliased as outputs) from the shardings; the
        temporaries XLA reported needing."""
        m = re.search(r"required for HLO temporaries \(([\d.]+)([KMGT])\)", str(self))
        temps = int(float(m.group(1)) * 1024 ** "KMGT".index(m.group(2)) * 1024) if m else 0
        return {"arguments": self.argument_bytes, "outputs": self.state_bytes,
                "aliased": self.state_bytes, "temporaries": temps}


def _device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard)."""
    import jax
    import numpy as np

    return int(sum(np.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(tree)))


def memory_of(compiled) -> dict[str, int]:
    m = compiled.memory_analysis()
    return {"arguments": int(m.argument_size_in_bytes), "outputs": int(m.output_size_in_bytes),
            "temporaries": int(m.temp_size_in_bytes), "aliased": int(m.alias_size_in_bytes)}


def flops_of(compiled) -> tuple[float, float]:
    """(FLOPs, bytes accessed) of one device's program, from XLA's cost analysis."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list):
        cost = cost[0]
    return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


def check(topology: str, gin_files: list[str], gin_params: list[str],
          vocab_size: int | None) -> dict:
    """The report for `topology` (runs where libtpu is importable)."""
    import jax
    from jax.experimental import topologies

    from experiments import pretrain_ntp  # noqa: F401  (registers the experiment's bindings)
    from llm.config import parse_gin

    chip, chips, topo_name = parse_topology(topology)
    parse_gin(gin_files, gin_params)
    topo = topologies.get_topology_desc(topo_name, platform="tpu")
    devices = list(topo.devices)
    per_chip = len(devices) / chips  # v4 exposes both TensorCores of a chip as devices
    hbm = int(chip.hbm_bytes / per_chip)
    try:
        with jax.default_device(devices[0]):
            compiled, model_flops, mesh = compile_train_step(devices, vocab_size,
                                                             platform="tpu")
        memory = memory_of(compiled)
        flops, bytes_accessed = flops_of(compiled)
    except OutOfHBM as e:  # no program, so no cost analysis: the model's FLOPs per device
        memory, model_flops, mesh = e.memory(), e.model_flops, e.mesh
        flops, bytes_accessed = model_flops / len(devices), 0.0
    peak = chip.peak_flops / per_chip
    step_s = max(flops / peak, bytes_accessed / (chip.hbm_bandwidth / per_chip))
    mfu = model_flops / (step_s * peak * len(devices)) if step_s else 0.0
    return {"topology": topology, "jax_topology": topo_name, "chips": chips,
            "devices": len(devices), "device_kind": devices[0].device_kind, "mesh": mesh,
            "memory_per_device": memory, "hbm_per_device": hbm,
            "flops_per_device": flops, "model_flops_per_step": model_flops,
            "bytes_accessed_per_device": bytes_accessed, "predicted_step_s": step_s,
            "predicted_mfu": mfu, "verdict": verdict(memory, hbm),
            "fits": peak_bytes(memory) <= hbm}


def report_lines(r: dict) -> list[str]:
    m = r["memory_per_device"]
    return [
        f"topology {r['topology']} ({r['jax_topology']}, {r['chips']} chips, {r['devices']} "
        f"devices of {r['device_kind']}), mesh {r['mesh']}",
        f"HBM per device: arguments {m['arguments'] / GiB:.3f} GiB, outputs "
        f"{m['outputs'] / GiB:.3f} GiB (aliased to arguments {m['aliased'] / GiB:.3f} GiB), "
        f"temporaries {m['temporaries'] / GiB:.3f} GiB; total {peak_bytes(m) / GiB:.3f} of "
        f"{r['hbm_per_device'] / GiB:.1f} GiB",
        f"FLOPs of one step: {r['flops_per_device']:.4g} per device (XLA), model "
        f"{r['model_flops_per_step']:.4g} in all",
        f"predicted step time {r['predicted_step_s'] * 1e3:.3f} ms "
        f"(roofline: FLOPs / peak vs bytes / HBM bandwidth), MFU at that time "
        f"{r['predicted_mfu']:.1%}",
        r["verdict"],
    ]


def _has_libtpu() -> bool:
    try:
        import libtpu  # noqa: F401
        return True
    except ImportError:
        return False


def side_python() -> str | None:
    """The interpreter that has libtpu: $LLM_TPU_PYTHON or /tmp/tpuenv/bin/python, if present."""
    path = os.environ.get("LLM_TPU_PYTHON", "/tmp/tpuenv/bin/python")
    return path if os.path.isfile(path) else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gin_file", action="append", default=[])
    p.add_argument("--gin_param", action="append", default=[])
    p.add_argument("--topology", required=True, help=f"one of {', '.join(VALID)}")
    p.add_argument("--vocab_size", type=int, default=None,
                   help="tokenizer size (default: ModelConfig.vocab_size)")
    p.add_argument("--json", default=None, help="also write the report here")
    args = p.parse_args(argv)
    try:
        parse_topology(args.topology)
        if not _has_libtpu():
            py = side_python()
            if py is None:
                raise CheckError("libtpu is not importable here and /tmp/tpuenv/bin/python does "
                                 "not exist; create a side venv with `pip install "
                                 "'jax[tpu]==<this jax version>'` and set LLM_TPU_PYTHON to it.")
            import site

            env = {**os.environ, "PYTHONPATH": os.pathsep.join(
                [REPO, *site.getsitepackages()])}
            return subprocess.run([py, os.path.abspath(__file__), *(argv or sys.argv[1:])],
                                  env=env).returncode
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
        gen, count = args.topology.split("-")
        os.environ.setdefault("TPU_ACCELERATOR_TYPE",
                              f"v5litepod-{count}" if gen == "v5e" else args.topology)
        sys.path.insert(0, REPO)
        from llm.config import ConfigError

        try:
            r = check(args.topology, args.gin_file, args.gin_param, args.vocab_size)
        except ConfigError as e:
            raise CheckError(str(e).splitlines()[0]) from None
    except CheckError as e:
        print(f"aot_check: error: {e}", file=sys.stderr)
        return 2
    for line in report_lines(r):
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)
    return 0 if r["fits"] else 1


if __name__ == "__main__":
    # Compile-only TPU devices: JAX runs on CPU, and libtpu must not look for a real chip.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.exit(main())
