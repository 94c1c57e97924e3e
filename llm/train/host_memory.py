"""Handing the C heap's free memory back to the operating system.

On CPU, XLA compiles (LLVM) and runs (its buffers) on the process's C heap. glibc's malloc keeps
what is freed -- a compile's scratch is 100-200 MB for a small model -- resident in its arenas
for reuse, and the step that runs next does not reuse most of it (gpt2_tiny, 4096 tokens: the
process holds ~600 MB after compiling the step, ~470 MB after a trim; the step's ~800 MB of
XLA temporaries come on top of whichever). `release_free_memory` after compiling and before the
first step returns it; the training loop and tools/bench_train.py call it there.
"""

from __future__ import annotations

import ctypes


def release_free_memory() -> bool:
    """glibc `malloc_trim(0)`: return the free pages of every malloc arena to the OS. Returns
    whether any memory was released (False where the C library has no malloc_trim)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return bool(trim(0))
