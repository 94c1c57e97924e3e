"""Compressed checkpoints: <dir>/params (orbax) + <dir>/compress.json.

A quantized model stores, per quantized weight, its packed integer codes (int8, or uint8 with
two int4/NF4 codes per byte) and float32 scales (`quantize.to_storage`); every other parameter
is stored as it is. A pruned model stores its float params with the pruned weights zeroed.
compress.json records the method, the source run and step, and per quantized weight the
method, shape, contraction dims and group size that `quantize.from_storage` needs.

    save_compressed(path, params, method="int4", source_run=..., step=...)
    run = load_compressed_run(path, method="int4")   # a LoadedRun: sampler, evaluator, ...
"""

from __future__ import annotations

import json
import math
import os
import shutil

import orbax.checkpoint as ocp

from llm.compress import quantize as Q
from llm.config import ConfigError
from llm.data.sources import DataError
from llm.runs import LoadedRun, load_run

RECORD = "compress.json"


def save_compressed(path: str, params: dict, *, method: str, source_run: str, step: int,
                    extra: dict | None = None) -> int:
    """Write params (QArray leaves allowed) to `path` (replacing it). Returns the bytes on disk."""
    path = os.path.abspath(path)
    if os.path.exists(path):
        shutil.rmtree(path)
    os.makedirs(path)
    arrays, meta = Q.to_storage(params)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(os.path.join(path, "params"), arrays)
    record = {"method": method, "source_run": os.path.abspath(source_run), "step": int(step),
              "quantized": meta, **(extra or {})}
    with open(os.path.join(path, RECORD), "w") as f:
        json.dump(record, f, indent=2)
    return directory_bytes(os.path.join(path, "params"))


def directory_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


def read_record(path: str) -> dict:
    record_path = os.path.join(path, RECORD)
    if not os.path.isfile(record_path):
        raise DataError(f"{path!r} is not a compressed checkpoint ({RECORD} missing); pass a "
                        "directory experiments.compress wrote (<run>/compress/<method>/"
                        "checkpoint).")
    with open(record_path) as f:
        return json.load(f)


def check_layout(path: str, quantized: dict) -> None:
    """DataError (one line) unless every stored weight's record names a known method, a valid
    contraction and a group size that divides its contraction (what `to_storage` writes)."""
    for name, m in quantized.items():
        try:
            shape, contraction = list(m["shape"]), list(m["contraction"])
            k = math.prod(shape[d] for d in contraction)
            ok = (m["method"] in Q.METHODS and isinstance(m["group_size"], int)
                  and m["group_size"] > 0 and k % m["group_size"] == 0
                  and (m["method"] == "int8" or k % 2 == 0))
        except (KeyError, TypeError, IndexError):
            ok = False
        if not ok:
            raise DataError(f"compressed checkpoint {path!r}: the record of weight {name!r} "
                            f"({json.dumps(m)}) is not a layout experiments.compress writes; "
                            "re-run experiments.compress instead of editing compress.json.")


def load_compressed(path: str, abstract_params: dict, method: str | None = None
                    ) -> tuple[dict, dict]:
    """(params with QArray leaves where quantized, the record). Raises ConfigError when `method`
    is given and differs from the stored one."""
    record = read_record(path)
    if method is not None and method != record["method"]:
        raise ConfigError(f"the compressed checkpoint {path!r} was written with method "
                          f"{record['method']!r}, not {method!r}; load it with "
                          f"method={record['method']!r}.")
    check_layout(path, record["quantized"])
    target = Q.storage_target(abstract_params, record["quantized"])
    with ocp.StandardCheckpointer() as ckpt:
        try:
            arrays = ckpt.restore(os.path.join(os.path.abspath(path), "params"), target)
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise DataError(f"compressed checkpoint {path!r} does not match its model "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:160]}).") from None
    return Q.from_storage(arrays, record["quantized"]), record


def load_compressed_run(path: str, method: str | None = None) -> LoadedRun:
    """The source run's config and tokenizer with the compressed params: use it wherever a
    LoadedRun goes (`llm.serve.sampler.generate`, `llm.eval.lm.LanguageModel`). The same as
    `llm.runs.load_run(path)`, which detects compress.json, plus the check that the stored
    method is `method` (ConfigError otherwise) when one is given."""
    record = read_record(path)
    if method is not None and method != record.get("method"):
        raise ConfigError(f"the compressed checkpoint {path!r} was written with method "
                          f"{record.get('method')!r}, not {method!r}; load it with "
                          f"method={record.get('method')!r}.")
    return load_run(path)
