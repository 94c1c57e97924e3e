"""What every RLHF algorithm (DPO, PPO, GRPO) is handed by `experiments.rlhf`, and the
per-token log-probabilities they all score sequences with.

    ctx = make_context(run_dir, base_run, seed)      # base run loaded and sharded on the mesh
    result = algorithm_module.train(ctx)             # see /work/brief/api/rlhf.md

The policy and the reference both start from the base run's latest checkpoint (an SFT run, or a
pretrained one), placed by the same logical-axis rules as pretraining (`llm.parallel.rules`).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from llm.model import transformer
from llm.parallel.mesh import make_mesh
from llm.parallel.rules import Rules, axis_rules, tree_shardings
from llm.runs import LoadedRun, load_run
from llm.train import checkpoint
from llm.train.metrics import MetricsWriter


@dataclasses.dataclass
class RLHFContext:
    """run_dir: this run's directory. base: the base run (cfg, graphdef, params placed on `mesh`,
    tokenizer, seq_len). logical_axes / param_shardings: per-parameter logical axis names and
    NamedShardings of the policy params. manager: the orbax manager of <run_dir>/checkpoints
    (items "state" and "data"). writer: metrics.jsonl + TensorBoard of the run."""

    run_dir: str
    seed: int
    base: LoadedRun
    mesh: Mesh
    rules: Rules
    logical_axes: dict
    param_shardings: dict
    manager: ocp.CheckpointManager
    writer: MetricsWriter


def make_context(run_dir: str, base_run: str, seed: int) -> RLHFContext:
    """Build the mesh and rules from gin (`make_mesh`, `axis_rules`), load `base_run` into them,
    and open the run's checkpoint manager and metrics writer."""
    mesh, rules = make_mesh(), axis_rules()
    base = load_run(base_run, mesh=mesh, rules=rules)
    _, abstract_params, logical_axes = transformer.abstract(base.cfg)
    shardings = tree_shardings(logical_axes, abstract_params, mesh, rules)
    manager = checkpoint.checkpoint_manager(os.path.join(run_dir, "checkpoints"))
    return RLHFContext(run_dir=run_dir, seed=seed, base=base, mesh=mesh, rules=rules,
                       logical_axes=logical_axes, param_shardings=shardings, manager=manager,
                       writer=MetricsWriter(run_dir))


def token_logprobs(logits: jax.Array, tokens: jax.Array, temperature: float = 1.0
                   ) -> tuple[jax.Array, jax.Array]:
    """logits [batch, seq, vocab] (position t predicts token t+1), tokens [batch, seq] ->
    (log p(tokens[:, t] | tokens[:, :t]), entropy of that distribution), both [batch, seq] fp32
    and 0 at t = 0. The distribution is softmax(logits / temperature)."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32) / temperature, axis=-1)
    picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    pad = jnp.zeros((tokens.shape[0], 1), jnp.float32)
    return jnp.concatenate([pad, picked], axis=1), jnp.concatenate([pad, entropy], axis=1)


def sequence_logprobs(graphdef: nnx.GraphDef, params: dict, tokens: jax.Array,
                      loss_mask: jax.Array, temperature: float = 1.0) -> jax.Array:
    """Per-token log p(tokens[:, t] | tokens[:, :t]) [batch, seq] fp32 under the decoder
    (`transformer.apply`), times loss_mask [batch, seq] (0 at t = 0 and where the mask is 0).
    Sum over the sequence axis for a sequence's log-likelihood (DPO)."""
    logits = transformer.apply(graphdef, params, tokens)
    logp, _ = token_logprobs(logits, tokens, temperature)
    return logp * loss_mask
