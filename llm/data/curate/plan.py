"""A curation plan: units to read, segments to run, where to write. Picklable."""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from llm.data.curate.process import RunOptions
from llm.data.curate.readers import Unit
from llm.data.curate.steps import Segment


@dataclasses.dataclass(frozen=True)
class Plan:
    units: tuple[Unit, ...]
    segments: tuple[Segment, ...]
    step_names: tuple[str, ...]
    out_dir: str
    options: RunOptions

    @property
    def work_dir(self) -> str:
        return os.path.join(self.out_dir, "_work")

    @staticmethod
    def summarize(step: str, state) -> dict:
        """A small JSON summary of a global step's combined state, for the datasheet."""
        if step == "minhash_dedup":
            return {"documents": state["docs"], "clusters_with_duplicates": state["clusters"],
                    "removed": int(len(state["removed"]))}
        if step == "exact_dedup":
            return {"removed": int(len(state))}
        if step == "boilerplate":
            return {"boilerplate_lines_per_source": {s: int(len(v)) for s, v in
                                                     sorted(state.items())}}
        if step == "balance":
            return {"before": state["before"], "target_share": state["target"],
                    "rates": state["rates"]}
        return {}


def jsonable(x):
    """Numpy scalars/arrays to plain Python, recursively."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return x
