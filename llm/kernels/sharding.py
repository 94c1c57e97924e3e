"""Flash attention on a device mesh.

XLA cannot partition a Pallas kernel or the CPU kernel (custom calls): under a multi-device
`jit` their operands would be gathered onto every device. Attention is independent per
sequence and per head, so the kernel runs per shard under `jax.shard_map`, batch split over
`batch_axes` and heads (q and kv alike, which keeps each GQA group on one shard) over
`head_axes`. Sequence sharding (ring / context parallel attention) is not supported.
"""

from __future__ import annotations

import math

import jax
from jax.sharding import Mesh, PartitionSpec

from llm.kernels.flash_attention import flash_attention


def _size(mesh: Mesh, axes) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    for a in axes:
        if a not in mesh.shape:
            raise ValueError(f"mesh axis {a!r} not in mesh axes {tuple(mesh.shape)}")
    return math.prod(mesh.shape[a] for a in axes)


def sharded_flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mesh: Mesh,
                            batch_axes: str | tuple[str, ...] | None = None,
                            head_axes: str | tuple[str, ...] | None = None,
                            q_segment_ids: jax.Array | None = None,
                            kv_segment_ids: jax.Array | None = None,
                            prefix: jax.Array | None = None, kernel=flash_attention,
                            **kwargs) -> jax.Array:
    """`kernel` (`flash_attention`, or `cpu_flash_attention`) run shard by shard on `mesh`;
    same arguments and result.

    q [batch, q_len, heads, head_dim], k/v [batch, kv_len, kv_heads, head_dim]: batch is split
    over `batch_axes`, heads and kv_heads over `head_axes`; other dims are whole on each shard.
    Segment ids and the prefix-LM `prefix` ([batch, len]) split over `batch_axes` like q.
    `kwargs` (causal, sm_scale, block_sizes, backend, interpret) pass through.
    """
    n_batch, n_heads = _size(mesh, batch_axes), _size(mesh, head_axes)
    if q.shape[0] % n_batch:
        raise ValueError(f"batch {q.shape[0]} is not divisible by the {n_batch} shards of "
                         f"{batch_axes!r}")
    if q.shape[2] % n_heads or k.shape[2] % n_heads:
        raise ValueError(f"heads={q.shape[2]} and kv_heads={k.shape[2]} must both divide into "
                         f"the {n_heads} shards of {head_axes!r}; replicate heads "
                         "(head_axes=None) for this model")
    x_spec = PartitionSpec(batch_axes, None, head_axes, None)
    seg_spec = PartitionSpec(batch_axes, None)
    rows = {name: x for name, x in (("q_segment_ids", q_segment_ids),
                                    ("kv_segment_ids", kv_segment_ids), ("prefix", prefix))
            if x is not None}

    def local(q, k, v, *row_args):
        return kernel(q, k, v, **dict(zip(rows, row_args)), **kwargs)

    in_specs = (x_spec, x_spec, x_spec) + (seg_spec,) * len(rows)
    fn = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=x_spec, check_vma=False)
    return fn(q, k, v, *rows.values())
