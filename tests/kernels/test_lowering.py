"""The real (non-interpreted) lowerings, checked from a CPU-only machine.

Interpret mode checks the kernels' math but not the hardware compilers' rules (Triton's
power-of-two tiles, Mosaic's (8, 128) tiling, supported ops). Here the kernels are lowered for
"cuda" and "tpu" with jax.export, which runs the Pallas -> Triton IR and Pallas -> Mosaic
lowerings on this host. With `libtpu` importable, the `tpu` test goes further and compiles
the Mosaic kernels to TPU machine code for a v5e topology (tools/aot_compile_tpu_kernel.py).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax._src import mesh as mesh_lib

from llm.kernels import decode_attention, flash_attention

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_TRITON_CALL = "__gpu$xla.gpu.triton"


def _target(platform: str):
    """Pallas TPU lowering asks the current device which chip it targets; on a CPU host an
    abstract mesh stands in for a v5e (jax has no public constructor for the device yet)."""
    if platform != "tpu":
        return contextlib.nullcontext()
    device = mesh_lib.AbstractDevice("TPU v5 lite", 1, "tpu")
    return jax.sharding.use_abstract_mesh(
        jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device))


def _export(fn, platform: str, *args) -> str:
    checks = [jax.export.DisabledSafetyCheck.custom_call(_TRITON_CALL)]
    with _target(platform):
        exported = jax.export.export(jax.jit(fn), platforms=[platform],
                                     disabled_checks=checks)(*args)
    return exported.mlir_module()


def _train_step(backend: str, causal: bool, segments: bool):
    def loss(q, k, v, qs, ks):
        out = flash_attention(q, k, v, q_segment_ids=qs if segments else None,
                              kv_segment_ids=ks if segments else None, causal=causal,
                              backend=backend, interpret=False)
        return out.astype(jnp.float32).sum()

    return jax.grad(loss, argnums=(0, 1, 2))


@pytest.mark.parametrize("backend, platform, marker", [("gpu", "cuda", _TRITON_CALL),
                                                      ("tpu", "tpu", "tpu_custom_call")])
def test_flash_and_decode_lower_for_hardware(backend, platform, marker):
    f32, bf16 = jnp.float32, jnp.bfloat16
    cases = [  # (q_len, kv_len, heads, kv_heads, head_dim, dtype, causal, segments)
        (1000, 1000, 8, 2, 128, bf16, True, False),
        (512, 640, 4, 4, 64, f32, False, True),
        (333, 333, 4, 1, 128, bf16, True, True),
    ]
    for q_len, kv_len, heads, kv_heads, head_dim, dtype, causal, segments in cases:
        q = jax.ShapeDtypeStruct((2, q_len, heads, head_dim), dtype)
        kv = jax.ShapeDtypeStruct((2, kv_len, kv_heads, head_dim), dtype)
        qs = jax.ShapeDtypeStruct((2, q_len), jnp.int32)
        ks = jax.ShapeDtypeStruct((2, kv_len), jnp.int32)
        text = _export(_train_step(backend, causal, segments), platform, q, kv, kv, qs, ks)
        assert text.count(marker) == 3, (q_len, kv_len, "expected fwd, dq and dkv kernels")
    cache = jax.ShapeDtypeStruct((4, 4096, 8, 128), bf16)
    lengths = jax.ShapeDtypeStruct((4,), jnp.int32)
    for q_len in (1, 512):  # decoding; prefill through the cache (row tiles)
        q = jax.ShapeDtypeStruct((4, q_len, 32, 128), bf16)
        text = _export(lambda q, k, v, n: decode_attention(q, k, v, n, backend=backend,
                                                           interpret=False),
                       platform, q, cache, cache, lengths)
        assert text.count(marker) == 1


@pytest.mark.tpu
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu not installed (pip install 'jax[tpu]' in a separate venv)")
def test_aot_compile_mosaic_kernels_for_v5e():
    proc = subprocess.run(
        [sys.executable, "tools/aot_compile_tpu_kernel.py", "--topology", "v5e:2x2", "--seq",
         "640", "--segments"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("compiled OK") == 4, proc.stdout


def test_sharded_flash_attention_on_four_devices():
    """shard_map over (data=2, tensor=2) fake CPU devices: same numbers as the reference."""
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.run([sys.executable, "-m", "tests.kernels.sharded_worker"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr[-3000:]


@pytest.mark.skipif(importlib.util.find_spec("jax_cuda12_plugin") is None,
                    reason="jax_cuda12_plugin not installed (pip install jax-cuda12-plugin "
                           "jax-cuda12-pjrt at the jax version, in a separate venv)")
def test_cross_compile_triton_kernels_for_h100(tmp_path):
    """Deviceless XLA:GPU compile for sm_90: Triton's full pipeline down to PTX."""
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.run([sys.executable, "-m", "tests.kernels.gpu_aot_worker", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("compiled OK") == 5, proc.stdout
    for kernel in ("flash_attention_fwd", "flash_attention_dq", "flash_attention_dkv",
                   "decode_attention"):
        assert f"ptx kernel {kernel} " in proc.stdout, proc.stdout
