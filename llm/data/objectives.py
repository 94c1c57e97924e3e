"""Training objectives as data transforms: what a batch row means to the loss.

An `Objective` says how one tokenized document becomes packable features (`pre_pack`), which
features are packed to which length (`pack_lengths`), and how one packed row becomes the fields the
model and loss read (`post_pack`). All transforms are pure numpy so they run inside grain workers.

Row fields produced for a decoder-only model, each `[seq_len]`:
  inputs       int32  token ids the model reads (per-segment shift-right of targets, BOS = PAD_ID)
  targets      int32  token ids the model predicts
  loss_mask    float32 1.0 where the target counts toward the loss
  segment_ids  int32  1, 2, ... per packed document; 0 is padding. Attention never crosses segments.
  positions    int32  position of each token inside its own document
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import gin
import numpy as np

PAD_ID = 0  # also the BOS fed to the first position of each segment (seqio / T5 convention)
EOS_ID = 1
UNK_ID = 2

Features = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Objective:
    """How documents become training rows.

    name: registry name.
    pre_pack: per document `(features, rng) -> features`; input is {'targets': tokens + EOS}.
      None means identity.
    pack_lengths: feature name -> packed length, derived from the row length by `lengths(seq_len)`.
    post_pack: per packed row `(features, rng) -> row fields`; packed features arrive with
      `<name>_segment_ids` and `<name>_positions` beside each packed feature.
    """

    name: str
    lengths: Callable[[int], dict[str, int]]
    post_pack: Callable[[Features, np.random.Generator], Features]
    pre_pack: Callable[[Features, np.random.Generator], Features] | None = None


def shift_right(tokens: np.ndarray, segment_ids: np.ndarray, bos: int = PAD_ID) -> np.ndarray:
    """Shift each packed segment right by one, putting `bos` at every segment start.

    tokens, segment_ids: [length]. Returns [length]; padding (segment 0) stays PAD_ID.
    """
    shifted = np.concatenate([[bos], tokens[:-1]]).astype(tokens.dtype)
    starts = np.concatenate([[True], segment_ids[1:] != segment_ids[:-1]])
    shifted = np.where(starts, bos, shifted)
    return np.where(segment_ids > 0, shifted, PAD_ID).astype(np.int32)


def _next_token_post_pack(f: Features, rng: np.random.Generator) -> Features:
    del rng
    seg = f["targets_segment_ids"].astype(np.int32)
    targets = f["targets"].astype(np.int32)
    return {
        "inputs": shift_right(targets, seg),
        "targets": targets,
        "loss_mask": (seg > 0).astype(np.float32),
        "segment_ids": seg,
        "positions": f["targets_positions"].astype(np.int32),
    }


NEXT_TOKEN = Objective(name="next_token", lengths=lambda n: {"targets": n},
                       post_pack=_next_token_post_pack)

OBJECTIVES: dict[str, Objective] = {NEXT_TOKEN.name: NEXT_TOKEN}


@gin.configurable
def get_objective(name: str = "next_token") -> Objective:
    """The objective registered under `name` (gin: `get_objective.name`)."""
    if name not in OBJECTIVES:
        raise ValueError(f"Unknown objective {name!r}; choose one of {sorted(OBJECTIVES)} "
                         "(gin: `get_objective.name`).")
    return OBJECTIVES[name]
