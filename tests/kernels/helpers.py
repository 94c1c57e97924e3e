"""Shared pieces of the kernel tests: random inputs, hardware-or-interpret mode, comparisons.

JAX's pattern: every kernel test class names a backend; it runs compiled when that hardware is
present and in the Pallas interpreter otherwise (Triton kernels through `interpret=True`, Mosaic
kernels inside `pltpu.force_tpu_interpret_mode()`).
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import tpu as pltpu

# Tolerances (max abs error vs the fp32 jnp reference, inputs ~N(0, 1)):
#  fp32: both sides accumulate in fp32; differences are summation order only.
#  bf16: the kernel rounds probabilities / dS to bf16 before the second matmul (as every flash
#        kernel does) and writes bf16 outputs; the reference works on the same bf16 inputs
#        upcast to fp32. Errors are relative to each tensor's largest entry.
FP32_TOL = 2e-5
BF16_TOL = 3e-2


def has_hardware(backend: str) -> bool:
    platform = jax.default_backend()
    return platform == "tpu" if backend == "tpu" else platform in ("gpu", "cuda", "rocm")


@contextlib.contextmanager
def kernel_mode(backend: str):
    """Context under which `backend`'s kernels run: real hardware, or its interpreter.

    fp32 matmuls run at full precision (kernels and reference alike): by default jax lets
    GPUs use TF32 and TPUs bf16 passes for fp32 dots, which the fp32 tolerance would not
    survive on hardware.
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(jax.default_matmul_precision("highest"))
        if backend == "tpu" and not has_hardware("tpu"):
            stack.enter_context(pltpu.force_tpu_interpret_mode())
        yield


def random_qkv(seed: int, batch: int, q_len: int, kv_len: int, heads: int, kv_heads: int,
               head_dim: int, dtype=jnp.float32):
    kq, kk, kv, kd = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(kq, (batch, q_len, heads, head_dim), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (batch, kv_len, kv_heads, head_dim), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (batch, kv_len, kv_heads, head_dim), jnp.float32).astype(dtype)
    do = jax.random.normal(kd, (batch, q_len, heads, head_dim), jnp.float32).astype(dtype)
    return q, k, v, do


def packed_segments(batch: int, length: int, boundaries: list[int]) -> jax.Array:
    """[batch, length] ids 1, 2, ... switching at each boundary (packed documents)."""
    ids = 1 + np.searchsorted(np.array(boundaries), np.arange(length), side="right")
    return jnp.asarray(np.broadcast_to(ids, (batch, length)), jnp.int32)


def assert_close(name: str, got: jax.Array, want: jax.Array, tol: float) -> None:
    got = np.asarray(got, np.float32)
    want = np.asarray(want, np.float32)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    assert np.all(np.isfinite(got)), f"{name}: non-finite values"
    scale = max(1.0, float(np.max(np.abs(want))))
    err = float(np.max(np.abs(got - want)))
    assert err <= tol * scale, f"{name}: max abs error {err:.3g} > {tol * scale:.3g}"
