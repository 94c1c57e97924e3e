"""Choosing the kernel lowering ("gpu" Triton / "tpu" Mosaic) and interpret mode."""

from __future__ import annotations

import jax

BACKENDS = ("auto", "gpu", "tpu")


def resolve_backend(backend: str) -> str:
    """"auto" -> "tpu" on a TPU, else "gpu" (on CPU the GPU kernel runs interpreted)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    if backend == "auto":
        return "tpu" if jax.default_backend() == "tpu" else "gpu"
    return backend


def resolve_interpret(backend: str, interpret: bool | None) -> bool:
    """None -> interpret exactly when the hardware `backend` targets is absent."""
    if interpret is not None:
        return bool(interpret)
    platform = jax.default_backend()
    if backend == "gpu":
        return platform not in ("gpu", "cuda", "rocm")
    return platform != "tpu"
