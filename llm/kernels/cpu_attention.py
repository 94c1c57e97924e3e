"""Flash attention for CPUs: the C++ kernel in `cpu/flash_attention.cc` as an XLA FFI call.

XLA:CPU has no fused attention, and no jnp formulation gets near one: the blocked
online-softmax loop (`llm.kernels.blocked`) runs its small block GEMMs one after another on one
thread (docs/benchmarks.md). The kernel here is FlashAttention-2 on 64 x 64 tiles, parallel
over XLA's own intra-op thread pool, with a custom_vjp whose backward is a second FFI call.

Building: the first call compiles the source with the system C++ compiler ($CXX, else g++, else
clang++; `-O3 -march=native`) into a cache directory ($LLM_KERNEL_CACHE, default
~/.cache/llm/kernels), keyed by the source, the flags, the compiler and the CPU, so later
processes only load it. `available()` says whether that works here (and why not);
`ModelConfig.attention_impl="auto"` uses this kernel on CPU only when it does, and
`attention_impl="cpu_flash"` asks for it explicitly (an error if it cannot be built).

Semantics are `llm.kernels.reference.mha_reference`'s: fp32, causal or bidirectional
self-attention, segment ids, GQA, rows with no allowed key give 0. Shapes: q [batch, seq,
heads, head_dim], k/v [batch, seq, kv_heads, head_dim] (same seq), head_dim a multiple of 16;
segment ids [batch, seq]. Not covered (use `blocked_attention`): prefix-LM masks, q_len !=
kv_len, other dtypes.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu", "flash_attention.cc")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno")
_TARGETS = {"fwd": "llm_cpu_flash_attention_fwd", "bwd": "llm_cpu_flash_attention_bwd"}


class KernelUnavailable(RuntimeError):
    """The CPU kernel cannot be built or loaded here (the message says why)."""


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_signature() -> str:
    """What -march=native depends on: the machine and its CPU flags."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return f"{platform.machine()} {flags}"


def _library_path(cxx: str) -> str:
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    with open(SOURCE, "rb") as f:
        key = hashlib.sha256(b"\0".join([f.read(), " ".join(FLAGS).encode(), version.encode(),
                                         _cpu_signature().encode(),
                                         jax.ffi.include_dir().encode()])).hexdigest()[:16]
    cache = os.environ.get("LLM_KERNEL_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "llm", "kernels")
    return os.path.join(cache, f"cpu_flash_attention-{key}.so")


def _build(cxx: str, path: str) -> None:
    print(f"llm: compiling the CPU flash-attention kernel into {path} (once per machine, a few "
          "seconds)", file=sys.stderr, flush=True)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
    os.close(fd)
    cmd = [cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", SOURCE, "-o", tmp]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        os.unlink(tmp)
        raise KernelUnavailable(f"compiling {SOURCE} failed ({' '.join(cmd)}):\n"
                                f"{done.stderr[-2000:]}")
    os.replace(tmp, path)  # atomic: concurrent builders leave one complete library


@functools.cache
def _load() -> str | None:
    """Builds (if needed) and registers the kernel; None on success, else why not."""
    if platform.system() not in ("Linux", "Darwin"):
        return f"the CPU kernel is built for Linux and macOS, not {platform.system()}"
    cxx = _compiler()
    if cxx is None:
        return "no C++ compiler found ($CXX, g++ or clang++)"
    try:
        path = _library_path(cxx)
        if not os.path.exists(path):
            _build(cxx, path)
        import ctypes

        lib = ctypes.cdll.LoadLibrary(path)
    except (KernelUnavailable, OSError) as e:
        return str(e)
    jax.ffi.register_ffi_target(_TARGETS["fwd"], jax.ffi.pycapsule(lib.LlmFlashAttentionForward),
                                platform="cpu")
    jax.ffi.register_ffi_target(_TARGETS["bwd"],
                                jax.ffi.pycapsule(lib.LlmFlashAttentionBackward), platform="cpu")
    return None


def available() -> tuple[bool, str]:
    """(whether the kernel can run here, why not). Builds it on first call."""
    why = _load()
    return why is None, why or ""


def supports(q_shape, k_shape, dtype, *, prefix: bool) -> str | None:
    """Why `cpu_flash_attention` cannot take these arguments, or None if it can."""
    if prefix:
        return "prefix-LM masks are not supported"
    if q_shape[1] != k_shape[1]:
        return f"q_len {q_shape[1]} != kv_len {k_shape[1]} (self-attention only)"
    if jnp.dtype(dtype) != jnp.float32:
        return f"dtype {jnp.dtype(dtype).name} (fp32 only)"
    if q_shape[3] % 16:
        return f"head_dim {q_shape[3]} is not a multiple of 16"
    if q_shape[2] % k_shape[2]:
        return f"heads {q_shape[2]} is not a multiple of kv_heads {k_shape[2]}"
    return None


def _call(target: str, outs, *args, causal: bool, segments: bool, scale: float):
    return jax.ffi.ffi_call(target, outs, vmap_method="sequential")(
        *args, causal=np.int32(causal), segments=np.int32(segments), scale=np.float32(scale))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _attention(q, k, v, q_seg, kv_seg, causal, segments, scale):
    return _attention_fwd(q, k, v, q_seg, kv_seg, causal, segments, scale)[0]


def _attention_fwd(q, k, v, q_seg, kv_seg, causal, segments, scale):
    b, s, h, _ = q.shape
    out, lse = _call(_TARGETS["fwd"], (jax.ShapeDtypeStruct(q.shape, jnp.float32),
                                       jax.ShapeDtypeStruct((b, h, s), jnp.float32)),
                     q, k, v, q_seg, kv_seg, causal=causal, segments=segments, scale=scale)
    return out, (q, k, v, q_seg, kv_seg, out, lse)


def _attention_bwd(causal, segments, scale, res, dout):
    q, k, v, q_seg, kv_seg, out, lse = res
    dq, dk, dv = _call(_TARGETS["bwd"], (jax.ShapeDtypeStruct(q.shape, jnp.float32),
                                         jax.ShapeDtypeStruct(k.shape, jnp.float32),
                                         jax.ShapeDtypeStruct(v.shape, jnp.float32)),
                       q, k, v, q_seg, kv_seg, out, lse, dout, causal=causal,
                       segments=segments, scale=scale)
    return dq, dk, dv, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def cpu_flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                        q_segment_ids: jax.Array | None = None,
                        kv_segment_ids: jax.Array | None = None, causal: bool = True,
                        sm_scale: float | None = None) -> jax.Array:
    """softmax(q k^T * sm_scale, masked) v on the CPU kernel; equal to `mha_reference`.

    q [batch, seq, heads, head_dim], k/v [batch, seq, kv_heads, head_dim] fp32 -> like q.
    segment ids [batch, seq] (both or neither). Raises KernelUnavailable when the kernel cannot
    be built here and ValueError for arguments it does not cover (`supports`).
    """
    why = _load()
    if why is not None:
        raise KernelUnavailable(f"the CPU flash-attention kernel is unavailable: {why}")
    reason = supports(q.shape, k.shape, q.dtype, prefix=False) or (
        None if v.shape == k.shape else f"v {v.shape} differs from k {k.shape}")
    if reason:
        raise ValueError(f"cpu_flash_attention: {reason}; use llm.kernels.blocked_attention.")
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("cpu_flash_attention: pass both q_segment_ids and kv_segment_ids, or "
                         "neither")
    segments = q_segment_ids is not None
    if not segments:
        q_segment_ids = kv_segment_ids = jnp.zeros(q.shape[:2], jnp.int32)
    scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    return _attention(q, k, v, q_segment_ids.astype(jnp.int32), kv_segment_ids.astype(jnp.int32),
                      bool(causal), segments, float(scale))
