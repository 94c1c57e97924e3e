"""The real (non-interpreted) lowerings, checked from a CPU-only machine.

Interpret mode checks the kernels' math but not the hardware compilers' rules (Triton's
power-of-two tiles, Mosaic's (8, 128) tiling, supported ops). Here the kernels are lowered for
"cuda" and "tpu" with jax.export, which runs the Pallas -> Triton IR and Pallas -> Mosaic
lowerings on this host.

Full compiles need toolchains kept out of .venv, each in its own virtualenv (a TPU or CUDA
plugin in the main one would probe for hardware at every start):
  TPU:  python3.11 -m venv /tmp/tpuenv && /tmp/tpuenv/bin/pip install jax==0.10.2 \
          jaxlib==0.10.2 libtpu==0.0.42.1
  GPU:  python3.11 -m venv /tmp/cudaenv && /tmp/cudaenv/bin/pip install jax==0.10.2 \
          jaxlib==0.10.2 jax-cuda12-plugin==0.10.2 jax-cuda12-pjrt==0.10.2
(other locations through $LLM_TPU_PYTHON / $LLM_CUDA_PYTHON). The tests below run the compile
in a subprocess with that venv's python and skip, saying so, when it is absent. Installing
the venvs takes minutes, so they are not created by the tests. The decode kernel is compiled
here at one cache length per tiling class (tools/decode_grid.py); the full 171-length grid
takes minutes per target and is a tool command; docs/kernels.md records both.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax._src import mesh as mesh_lib

from llm.kernels import decode_attention, flash_attention
from tools.decode_grid import representatives

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_TRITON_CALL = "__gpu$xla.gpu.triton"
TPU_PYTHON = os.environ.get("LLM_TPU_PYTHON", "/tmp/tpuenv/bin/python")
CUDA_PYTHON = os.environ.get("LLM_CUDA_PYTHON", "/tmp/cudaenv/bin/python")


def _has_module(python: str, module: str) -> bool:
    if not os.path.exists(python):
        return False
    probe = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    return subprocess.run([python, "-c", probe], capture_output=True).returncode == 0


needs_libtpu = pytest.mark.skipif(
    not _has_module(TPU_PYTHON, "libtpu"),
    reason=f"no libtpu venv at {TPU_PYTHON} (python3.11 -m venv /tmp/tpuenv && /tmp/tpuenv/bin/"
           "pip install jax==0.10.2 jaxlib==0.10.2 libtpu==0.0.42.1; or set LLM_TPU_PYTHON)")
needs_cuda_plugin = pytest.mark.skipif(
    not _has_module(CUDA_PYTHON, "jax_cuda12_plugin"),
    reason=f"no CUDA-plugin venv at {CUDA_PYTHON} (python3.11 -m venv /tmp/cudaenv && "
           "/tmp/cudaenv/bin/pip install jax==0.10.2 jaxlib==0.10.2 jax-cuda12-plugin==0.10.2 "
           "jax-cuda12-pjrt==0.10.2; or set LLM_CUDA_PYTHON)")


def _run(python: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([python, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


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


def _train_step(backend: str, causal: bool, segments: bool, prefix: bool = False):
    def loss(q, k, v, qs, ks):
        out = flash_attention(q, k, v, q_segment_ids=qs if segments else None,
                              kv_segment_ids=ks if segments else None, causal=causal,
                              prefix=(qs % 2) if prefix else None, backend=backend,
                              interpret=False)
        return out.astype(jnp.float32).sum()

    return jax.grad(loss, argnums=(0, 1, 2))


@pytest.mark.parametrize("backend, platform, marker", [("gpu", "cuda", _TRITON_CALL),
                                                      ("tpu", "tpu", "tpu_custom_call")])
def test_flash_and_decode_lower_for_hardware(backend, platform, marker):
    f32, bf16 = jnp.float32, jnp.bfloat16
    cases = [  # (q_len, kv_len, heads, kv_heads, head_dim, dtype, causal, segments, prefix)
        (1000, 1000, 8, 2, 128, bf16, True, False, False),
        (512, 640, 4, 4, 64, f32, False, True, False),
        (333, 333, 4, 1, 128, bf16, True, True, False),
        (300, 300, 4, 2, 128, bf16, True, True, True),
    ]
    for q_len, kv_len, heads, kv_heads, head_dim, dtype, causal, segments, prefix in cases:
        q = jax.ShapeDtypeStruct((2, q_len, heads, head_dim), dtype)
        kv = jax.ShapeDtypeStruct((2, kv_len, kv_heads, head_dim), dtype)
        qs = jax.ShapeDtypeStruct((2, q_len), jnp.int32)
        ks = jax.ShapeDtypeStruct((2, kv_len), jnp.int32)
        text = _export(_train_step(backend, causal, segments, prefix), platform, q, kv, kv, qs,
                       ks)
        assert text.count(marker) == 3, (q_len, kv_len, "expected fwd, dq and dkv kernels")
    cache = jax.ShapeDtypeStruct((4, 4096, 8, 128), bf16)
    lengths = jax.ShapeDtypeStruct((4,), jnp.int32)
    odd_cache = jax.ShapeDtypeStruct((4, 69, 8, 128), bf16)  # 5-token prompt + 64 new tokens
    for q_len, kv in ((1, cache), (512, cache), (1, odd_cache), (5, odd_cache)):
        q = jax.ShapeDtypeStruct((4, q_len, 32, 128), bf16)
        text = _export(lambda q, k, v, n: decode_attention(q, k, v, n, backend=backend,
                                                           interpret=False),
                       platform, q, kv, kv, lengths)
        assert text.count(marker) == 1


@pytest.mark.tpu
@needs_libtpu
def test_aot_compile_mosaic_kernels_for_v5e():
    proc = _run(TPU_PYTHON, "tools/aot_compile_tpu_kernel.py", "--topology", "v5e:2x2", "--seq",
                "640", "--segments", "--prefix", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("compiled OK") == 4, proc.stdout


def _grid_compiles(backend: str) -> int:
    """Compiles in one decode-grid pass over the tiling classes: q_len 1, and 5 where it fits."""
    return sum(1 + (length >= 5) for length in representatives(backend))


@pytest.mark.tpu
@needs_libtpu
def test_decode_compiles_for_tpu_in_every_tiling_class():
    """AOT compile of decode_attention with libtpu for v5e and v6e (one process), at one cache
    length per tiling class of the 171-length grid 1..1024 (`tools/decode_grid.py`: cache
    block, one block or many, padded or not, last block partial or not), q_len 1 and 5.
    Interpret mode cannot see this: it does not apply Mosaic's (8, 128) tiling rules. The full
    grid (338 compiles per topology, minutes) is the documented tool command in
    docs/kernels.md."""
    proc = _run(TPU_PYTHON, "tools/aot_compile_tpu_kernel.py", "--topology", "v5e:2x2,v6e:2x2",
                "--decode-grid", "--classes", timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    n = _grid_compiles("tpu")
    for topology in ("v5e:2x2", "v6e:2x2"):
        assert f"decode grid {topology} (" in proc.stdout, proc.stdout
    assert proc.stdout.count(f": {n}/{n} compiled") == 2, proc.stdout


def test_sharded_flash_attention_on_four_devices():
    """shard_map over (data=2, tensor=2) fake CPU devices, the Pallas kernel and the CPU
    kernel: same numbers as the reference, no gathering of q/k/v."""
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.run([sys.executable, "-m", "tests.kernels.sharded_worker"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr[-3000:]


@needs_cuda_plugin
def test_cross_compile_triton_kernels_for_h100(tmp_path):
    """Deviceless XLA:GPU compile for sm_90: Triton's full pipeline down to PTX (training
    kernels with and without segments / prefix-LM, decode, prefill through the cache), then,
    in the same process, the decode kernel at one cache length per GPU tiling class of the
    TPU test's grid, q_len 1 and 5 (the full grid is a documented command, docs/kernels.md)."""
    proc = _run(CUDA_PYTHON, "-m", "tests.kernels.gpu_aot_worker", str(tmp_path), "--classes",
                timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("compiled OK") == 6, proc.stdout
    for kernel in ("flash_attention_fwd", "flash_attention_dq", "flash_attention_dkv",
                   "decode_attention"):
        assert f"ptx kernel {kernel} " in proc.stdout, proc.stdout
    n = _grid_compiles("gpu")
    assert f"decode grid h100 ({len(representatives('gpu'))} tiling-class representatives" \
        in proc.stdout and f": {n}/{n} compiled" in proc.stdout, proc.stdout
