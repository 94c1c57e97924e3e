"""The reward model: the decoder plus a scalar head, trained with the Bradley-Terry loss on
chosen/rejected pairs (`llm.posttrain.pairs`), and loaded back to score texts.

    params = {"decoder": <decoder params>, "head": {"kernel": [embed], "bias": []}}
    r = scores(graphdef, params, tokens, last)      # [batch]: head(h[last]) for each row

The score of a row is a linear function of the decoder's final-norm hidden state
(`Decoder(return_hidden=True)`) at the row's last token (the EOS after the response), as in
InstructGPT and TRL's `AutoModelForSequenceClassification` reward models. The head's kernel
carries the logical axis ("embed",), so it shards with the decoder by the same rules.

Bradley-Terry (Bradley & Terry 1952; Ouyang et al. 2022; TRL `RewardTrainer`):

    loss = -log sigmoid(r_chosen - r_rejected - margin)   (+ c * (r_chosen + r_rejected)^2)

the optional second term being TRL's `center_rewards_coefficient` (Eisenstein et al. 2023),
which keeps the scores centred at 0. `bt_loss_fn` returns sums over the pairs in the llm.train
loss convention ({"nll", "z_loss", "tokens", "correct"} with tokens = pairs), so the shared
`llm.train.step.train_step` trains it unchanged: the gradient is that of the mean over pairs, and
"accuracy" is the share of pairs ranked correctly.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from llm import runs
from llm.config import ConfigError
from llm.data.sources import DataError
from llm.data.tokenizer import Tokenizer, load_tokenizer
from llm.model import transformer
from llm.model.config import ModelConfig
from llm.parallel.rules import Rules, constrain, tree_shardings
from llm.posttrain import pairs as pairs_lib

KIND = "reward_model"  # manifest.json "objective" of a reward-model run


def head_axes() -> dict:
    """Logical axis names of the scalar head."""
    return {"kernel": ("embed",), "bias": ()}


def init_head(cfg: ModelConfig, rng: jax.Array) -> dict:
    """kernel [embed] ~ N(0, 1/embed) (unit-variance scores from unit-RMS hidden states), bias 0."""
    kernel = jax.random.normal(rng, (cfg.d_model,), jnp.dtype(cfg.param_dtype))
    return {"kernel": kernel / np.sqrt(cfg.d_model), "bias": jnp.zeros((), cfg.param_dtype)}


def param_axes(decoder_axes: dict) -> dict:
    return {"decoder": decoder_axes, "head": head_axes()}


def abstract_params(cfg: ModelConfig) -> tuple[nnx.GraphDef, dict, dict]:
    """(decoder graphdef, reward-model params as ShapeDtypeStructs, their logical axes)."""
    graphdef, dec, dec_axes = transformer.abstract(cfg)
    head = jax.eval_shape(lambda: init_head(cfg, jax.random.key(0)))
    return graphdef, {"decoder": dec, "head": head}, param_axes(dec_axes)


def scores(graphdef: nnx.GraphDef, params: dict, tokens: jax.Array, last: jax.Array
           ) -> jax.Array:
    """Scalar rewards [batch] fp32 of rows tokens [batch, seq], read at the one-hot positions
    last [batch, seq] (an all-zero row scores the bias alone)."""
    hidden = transformer.apply(graphdef, params["decoder"], tokens, return_hidden=True)
    picked = jnp.einsum("bse,bs->be", hidden.astype(jnp.float32), last.astype(jnp.float32))
    picked = constrain(picked, ("activation_batch", "activation_embed"))
    head = params["head"]
    return picked @ head["kernel"].astype(jnp.float32) + head["bias"].astype(jnp.float32)


def bradley_terry(chosen: jax.Array, rejected: jax.Array, weight: jax.Array, *,
                  margin: jax.Array | float = 0.0, center_coef: float = 0.0
                  ) -> dict[str, jax.Array]:
    """Sums over pairs of the Bradley-Terry loss. chosen, rejected, weight [pairs] (weight 0
    for padding pairs). Returns {"nll": sum w * -log sigmoid(rc - rr - margin), "z_loss":
    center_coef * sum w * (rc + rr)^2, "tokens": sum w (pairs), "correct": sum w * [rc > rr],
    "margin": sum w * (rc - rr)}."""
    diff = chosen - rejected
    return {"nll": jnp.sum(weight * -jax.nn.log_sigmoid(diff - margin)),
            "z_loss": center_coef * jnp.sum(weight * jnp.square(chosen + rejected)),
            "tokens": jnp.sum(weight),
            "correct": jnp.sum(weight * (diff > 0)),
            "margin": jnp.sum(weight * diff)}


def bt_loss_fn(graphdef: nnx.GraphDef, center_coef: float = 0.0):
    """(params, batch) -> Bradley-Terry sums (see `bradley_terry`) for a batch of
    `pairs.encode_pairs` rows. Chosen and rejected rows go through the decoder as one
    [2 * pairs, seq] batch."""

    def loss_fn(params: dict, batch: dict) -> dict[str, jax.Array]:
        tokens = jnp.concatenate([batch["chosen"], batch["rejected"]], axis=0)
        last = jnp.concatenate([batch["chosen_last"], batch["rejected_last"]], axis=0)
        r = scores(graphdef, params, tokens, last)
        n = batch["chosen"].shape[0]
        weight = jnp.sum(batch["chosen_last"], axis=1)
        return bradley_terry(r[:n], r[n:], weight, center_coef=center_coef)

    return loss_fn


# ---------------------------------------------------------------------- a trained reward model

@dataclasses.dataclass(frozen=True)
class RewardModel:
    """A trained reward model, loaded from its run directory (`load`).

    score(prompts, completions) -> np.ndarray [n] float32: the scalar reward of each completion
    after its prompt, computed on rows laid out as in training (`pairs.layout_row`).
    """

    run_dir: str
    cfg: ModelConfig
    graphdef: nnx.GraphDef
    params: dict
    tokenizer: Tokenizer
    seq_len: int
    step: int

    def score(self, prompts: Sequence[str], completions: Sequence[str],
              batch_size: int = 32) -> np.ndarray:
        if len(prompts) != len(completions):
            raise ValueError(f"score: {len(prompts)} prompts but {len(completions)} "
                             "completions.")
        out = []
        for start in range(0, len(prompts), batch_size):
            tokens = np.zeros((batch_size, self.seq_len), np.int32)
            last = np.zeros((batch_size, self.seq_len), np.float32)
            chunk = list(zip(prompts, completions))[start:start + batch_size]
            for i, (p, c) in enumerate(chunk):
                row, _, end, _ = pairs_lib.layout_row(
                    self.tokenizer.encode(p) if p else [], self.tokenizer.encode(c),
                    self.seq_len)
                tokens[i], last[i, end] = row, 1.0
            r = _jit_scores(self.graphdef, self.params, jnp.asarray(tokens), jnp.asarray(last))
            out.append(np.asarray(r)[:len(chunk)])
        return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)


_jit_scores = jax.jit(scores, static_argnums=0)


def load(run_dir: str, step: int | None = None, mesh: Mesh | None = None,
         rules: Rules | None = None) -> RewardModel:
    """Open a reward-model run directory (written by `experiments.reward`): its config, tokenizer
    and the params of checkpoint `step` (default the newest). DataError for a directory that is
    not a reward-model run or has no checkpoint."""
    run_dir = os.path.abspath(run_dir)
    manifest_path = os.path.join(run_dir, "manifest.json")
    if not os.path.isfile(manifest_path):
        raise DataError(f"reward model {run_dir!r} is not a run directory (no manifest.json); "
                        "train one with `python -m experiments.reward`.")
    with open(manifest_path) as f:
        manifest = json.load(f)
    if manifest.get("objective") != KIND:
        raise DataError(f"run {run_dir!r} is not a reward model (its objective is "
                        f"{manifest.get('objective')!r}); train one with "
                        "`python -m experiments.reward`.")
    data, record = manifest["data"], manifest["reward_model"]
    try:
        cfg = ModelConfig(**record["model_config"])
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{manifest_path}: reward_model.model_config does not fit this version "
                          f"of ModelConfig ({e}).") from None
    seq_len = int(record["seq_len"])
    steps = runs.checkpoint_steps(run_dir)
    if not steps:
        raise DataError(f"reward model {run_dir!r} has no checkpoint; train it first.")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise DataError(f"reward model {run_dir!r} has no checkpoint at step {step}; available: "
                        f"{', '.join(map(str, steps))}.")
    graphdef, abstract, axes = abstract_params(cfg)
    if mesh is None:
        mesh, rules = Mesh(jax.devices()[:1], ("data",)), ()
    if rules is None:
        raise ConfigError("reward_model.load: pass the axis rules with the mesh.")
    params = runs.restore_params(run_dir, step, abstract,
                                  tree_shardings(axes, abstract, mesh, rules))
    tokenizer = load_tokenizer(runs.tokenizer_path(run_dir, data))
    return RewardModel(run_dir, cfg, graphdef, params, tokenizer, seq_len, int(step))
