"""Short fine-tunes that recover quality after compression, on the shared train step.

Both wrap the decoder's loss (`llm.train.loss.decoder_loss`) and reuse
`llm.train.step.train_step` unchanged:

  QAT:     loss(fake_quantize_params(params)) -- the forward sees the quantized weights, the
           straight-through estimator passes the gradient to the float weights;
  pruning: loss(params * mask) -- pruned weights get no gradient, and the masks are applied
           again to the result, so the sparsity pattern stays exactly fixed whatever the
           optimizer does (Muon's orthogonalized update is dense).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from tqdm import tqdm

from llm.compress import prune
from llm.compress import quantize as Q
from llm.data.pipeline import make_dataset
from llm.train.loss import decoder_loss
from llm.train.state import TrainState
from llm.train.step import train_step


def qat_transform(logical_axes: dict, method: str, group_size: int,
                  embedding_method: str | None = None) -> Callable[[dict], dict]:
    return lambda params: Q.fake_quantize_params(params, logical_axes, method, group_size,
                                                 embedding_method)


def mask_transform(masks: dict) -> Callable[[dict], dict]:
    return lambda params: prune.apply_masks(params, masks)


def finetune(graphdef, params: dict, transform: Callable[[dict], dict], *, data_dir: str,
             steps: int, seq_len: int, batch_size: int, learning_rate: float = 3e-4,
             seed: int = 0) -> tuple[dict, list[float]]:
    """`steps` AdamW steps (cosine decay from `learning_rate`) on the training split with the
    loss evaluated at transform(params). Returns (transform(final params), losses)."""
    base = decoder_loss(graphdef)

    def loss_fn(p, batch):
        return base(transform(p), batch)

    schedule = optax.cosine_decay_schedule(learning_rate, max(steps, 1), alpha=0.1)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.0))
    params = jax.tree.map(jnp.copy, params)  # the step donates its state; keep the caller's
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
    step = jax.jit(lambda s, b: train_step(s, b, loss_fn=loss_fn, tx=tx, schedule=schedule),
                   donate_argnums=0)
    ds = make_dataset(data_dir, "train", seq_len=seq_len, global_batch_size=batch_size,
                      seed=seed + 1, process_index=0, process_count=1)
    losses = []
    it = iter(ds)
    for _ in tqdm(range(steps), desc="finetune", leave=False):
        batch = {k: jnp.asarray(v) for k, v in next(it).items()}
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return jax.jit(transform)(state.params), losses
