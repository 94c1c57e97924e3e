"""The distillation loss as a `train_step` loss: the student trains on the shared step, the
teacher is its `frozen` input.

    loss_fn = distill_loss_fn(student_graphdef, teacher_graphdef, DistillLoss())
    step = jit_train_step(shardings, mesh, rules, frozen_shardings=teacher_shardings,
                          loss_fn=loss_fn, tx=tx, schedule=schedule)   # llm.train.step
    state, metrics = step(state, batch, teacher_params)

The teacher's parameters are an *argument* of the jitted step (never a closed-over constant),
laid out by the same logical-axis rules as the student's, so on a mesh the teacher forward is
sharded exactly like a training forward. They are not differentiated (`train_step`
differentiates `state.params` only, and the loss reads the teacher's logits through
`stop_gradient`), have no optimizer state and are not checkpointed (the run's manifest names the
teacher run and step).

Online rows carry the usual next-token fields (`llm.data.objectives`). Offline rows also carry
`topk_values` / `topk_indices` [batch, seq, k] (`llm.distill.offline`), and the step has no
teacher input. Rows with a `hard_mask` field (on-policy samples, `llm.distill.on_policy`) apply
the hard-label term only where it is 1.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from flax import nnx

from llm.distill.losses import DistillLoss, distill_sums
from llm.model import transformer
from llm.train.loss import Batch

# (student params, batch[, teacher params, step]) -> sums
DistillLossFn = Callable[..., dict[str, jax.Array]]


def distill_loss_fn(student_graphdef: nnx.GraphDef, teacher_graphdef: nnx.GraphDef | None,
                    config: DistillLoss) -> DistillLossFn:
    """The student's forward, the teacher's forward (online) or its stored top-k (offline), and
    `llm.distill.losses.distill_sums`. Metrics (through `train_step`): `loss` is the objective
    per target token, `hard_loss` the hard-label cross entropy, `divergence` D before T^2."""

    def loss_fn(params: dict, batch: Batch, teacher_params: dict | None = None,
                step: jax.Array | None = None) -> dict[str, jax.Array]:
        del step  # nothing in the loss is random
        kwargs = dict(positions=batch["positions"], segment_ids=batch["segment_ids"])
        logits = transformer.apply(student_graphdef, params, batch["inputs"], **kwargs)
        teacher = {}
        if "topk_values" in batch:
            teacher = {"topk_values": batch["topk_values"],
                       "topk_indices": batch["topk_indices"]}
        elif config.alpha < 1.0:
            teacher["teacher_logits"] = transformer.apply(teacher_graphdef, teacher_params,
                                                          batch["inputs"], **kwargs)
        sums = distill_sums(logits, batch["targets"], batch["loss_mask"], config,
                            hard_mask=batch.get("hard_mask"), **teacher)
        sums["per_token/hard_loss"] = sums.pop("hard_nll")
        sums["per_token/divergence"] = sums.pop("divergence")
        return sums

    return loss_fn
