"""The machine as the code sees it, for the benchmark tools to print and record.

  python -m tools.machine        # one line, and the JSON

Read from /proc/cpuinfo (model name, the SIMD flags that matter to XLA:CPU and PyTorch), the CPU
affinity of this process (the cores it may run on), /proc/meminfo and the load average; nothing
is typed in by hand.
"""

from __future__ import annotations

import json
import os

SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
              "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "neon", "asimd",
              "sve")


def _cpuinfo() -> tuple[str, set[str], int]:
    """(model name, flags, logical CPUs listed) from /proc/cpuinfo; empty where absent."""
    model, flags, cpus = "", set(), 0
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "processor":
                    cpus += 1
                elif key == "model name" and not model:
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return model, flags, cpus


def machine_info() -> dict:
    """{cpu_model, simd (flags present, in SIMD_FLAGS order), logical_cpus, usable_cpus (this
    process's affinity), mem_gib, load_avg (1, 5, 15 min)}."""
    model, flags, cpus = _cpuinfo()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count() or 0
    mem = 0.0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = int(line.split()[1]) / 2**20
    except OSError:
        pass
    return {"cpu_model": model, "simd": [f for f in SIMD_FLAGS if f in flags],
            "logical_cpus": cpus or os.cpu_count() or 0, "usable_cpus": usable,
            "mem_gib": round(mem, 1), "load_avg": [round(x, 2) for x in os.getloadavg()]}


def describe(info: dict) -> str:
    """One line: 'AMD EPYC, 2 of 2 CPUs, avx2 avx512f ..., 23.4 GiB, load 1.0 0.8 0.5'."""
    return (f"{info['cpu_model'] or 'unknown CPU'}, {info['usable_cpus']} of "
            f"{info['logical_cpus']} CPUs usable, SIMD {' '.join(info['simd']) or 'none'}, "
            f"{info['mem_gib']} GiB, load average {' '.join(map(str, info['load_avg']))}")


if __name__ == "__main__":
    info = machine_info()
    print(describe(info))
    print(json.dumps(info))
