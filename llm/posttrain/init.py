"""Start a run from another run directory's weights: SFT and domain continued pretraining.

    base = load_base("runs/quickstart", mesh, rules, add_tokens=ROLE_TAGS,
                     tokenizer_out="runs/sft/tokenizer.model")
    cfg = adopt_model_config(base.cfg, "runs/quickstart")   # gin ModelConfig := the base's shape
    model = ModelSpec(..., init=base.init, base_run=base.run_dir, base_step=base.step)

What carries over: the parameters (through `llm.runs.load_run`, straight into the new run's
shardings) and, on request, the optimizer state (`restore_opt_state`; same optimizer and the same
parameter shapes only). What does not: the step counter, the learning-rate schedule and the data
position -- the new run is a new run directory with its own manifest.

Extending a vocabulary (the documented way, docs/post_training.md): `extend_tokenizer` appends the
missing strings to the SentencePiece model as USER_DEFINED pieces (ids base_vocab, base_vocab+1,
... -- existing ids never move, so every other token encodes as before), and `extend_params`
appends one embedding row per new piece (and one output column when the output projection is not
tied), initialised to the mean of the existing rows: the new tokens start as an "average" token
instead of a random direction, so the model's loss on ordinary text is unchanged and the first
SFT steps do not chase large logits of untrained rows (Hewitt, "Initializing new word embeddings
for pretrained language models", 2021).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable, Sequence

import gin
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from llm.compress.qat import qat
from llm.config import ConfigError
from llm.data.curate.local import atomic_write
from llm.data.sources import DataError
from llm.data.tokenizer import is_tokenizer_json, load_tokenizer
from llm.model import transformer
from llm.model.config import ModelConfig
from llm.parallel.rules import Rules
from llm.runs import checkpoint_steps, load_run, read_run_config, restore_state_field
from llm.train.experiment import ModelSpec
from llm.train.loop import TrainConfig
from llm.train.loss import decoder_loss

# ModelConfig fields that do not change the parameters: free to differ from the base run's.
COMPUTE_FIELDS = ("attention_impl", "attention_splits", "remat", "dtype")


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def extend_tokenizer(src: str, dst: str, symbols: Sequence[str]) -> list[int]:
    """Write `src`'s SentencePiece model to `dst` with every string of `symbols` that it does not
    already encode as one token appended as a USER_DEFINED piece. Returns the new ids (empty when
    nothing was missing; `dst` is then a plain copy). A tokenizer.json (a run imported from
    Hugging Face) gets them as added tokens, matched whole and kept in decoded text."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    tok = load_tokenizer(src)
    if is_tokenizer_json(src):
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as HFTok

        hf_tok = HFTok.from_file(src)
        missing = [s for s in symbols if len(tok.encode(s)) != 1]
        hf_tok.add_tokens([AddedToken(s, normalized=False, special=False) for s in missing])
        os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
        atomic_write(dst, hf_tok.to_str().encode())
        return [hf_tok.token_to_id(s) for s in missing]  # the next ids, in order
    with open(src, "rb") as f:
        model = pb.ModelProto.FromString(f.read())
    new_ids = []
    for s in symbols:
        if len(tok.encode(s)) != 1:
            model.pieces.add(piece=s, score=0.0, type=pb.ModelProto.SentencePiece.USER_DEFINED)
            new_ids.append(len(model.pieces) - 1)
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    atomic_write(dst, model.SerializeToString())
    return new_ids


def extend_params(params: dict, num_new: int) -> dict:
    """Append `num_new` vocabulary rows, each the mean of the existing rows: to the token
    embedding [vocab, embed] and, if the model has one, the output projection [embed, vocab]
    (learned position embeddings are left alone)."""
    if num_new == 0:
        return params
    out = jax.tree.map(lambda x: x, params)
    emb = params["embed"]["embedding"]
    out["embed"] = {**params["embed"], "embedding": jnp.concatenate(
        [emb, jnp.broadcast_to(emb.mean(0, keepdims=True), (num_new, emb.shape[1]))])}
    if "lm_head" in params:
        k = params["lm_head"]["kernel"]
        out["lm_head"] = {**params["lm_head"], "kernel": jnp.concatenate(
            [k, jnp.broadcast_to(k.mean(1, keepdims=True), (k.shape[0], num_new))], axis=1)}
        if "bias" in params["lm_head"]:
            b = params["lm_head"]["bias"]
            out["lm_head"]["bias"] = jnp.concatenate([b, jnp.full((num_new,), b.mean(), b.dtype)])
    return out


def adopt_model_config(base: ModelConfig, base_run: str, vocab_size: int | None = None
                       ) -> ModelConfig:
    """The new run's ModelConfig: the base run's, with `vocab_size` (default the base's).

    The base's values are bound in gin, so the new run's config.gin records them and
    `load_run` rebuilds the same model. A ModelConfig setting the user bound that changes the
    parameters (anything but COMPUTE_FIELDS) must equal the base's: ConfigError naming both.
    """
    bound = gin.get_bindings("ModelConfig")
    for field in dataclasses.fields(ModelConfig):
        name = field.name
        if name == "vocab_size" or name in COMPUTE_FIELDS:
            continue
        if name in bound and bound[name] != getattr(base, name):
            raise ConfigError(f"ModelConfig.{name}={bound[name]!r} does not match the base run "
                              f"{base_run} (ModelConfig.{name}={getattr(base, name)!r}); drop "
                              "the binding or start from a matching run.")
    with gin.unlock_config():
        for field in dataclasses.fields(ModelConfig):
            if field.name not in COMPUTE_FIELDS or field.name not in bound:
                value = vocab_size if field.name == "vocab_size" and vocab_size else \
                    getattr(base, field.name)
                gin.bind_parameter(f"ModelConfig.{field.name}", value)
    return ModelConfig()


def check_vocabulary(base_run: str, base_tokenizer: str, data_dir: str, data_tokenizer: str
                     ) -> None:
    """ConfigError naming both sides unless the run and the data use the same tokenizer."""
    if file_sha256(base_tokenizer) == file_sha256(data_tokenizer):
        return
    base_n, data_n = load_tokenizer(base_tokenizer).vocab_size, \
        load_tokenizer(data_tokenizer).vocab_size
    raise ConfigError(f"the vocabulary of init_from run {base_run} ({base_n} ids, "
                      f"{base_tokenizer}) does not match data_dir {data_dir} ({data_n} ids, "
                      f"{data_tokenizer}); prepare the data with "
                      f"prepare.tokenizer_model='{base_tokenizer}'.")


@dataclasses.dataclass(frozen=True)
class Base:
    """A loaded base run. init: the `ModelSpec.init` that returns its (extended) params."""

    run_dir: str
    step: int
    cfg: ModelConfig  # the base's config, vocab_size extended
    seq_len: int
    tokenizer_path: str  # the base tokenizer, extended copy if tokens were added
    new_ids: list[int]
    init: Callable[[jax.Array], dict]


def load_base(run_dir: str, mesh: Mesh, rules: Rules, *, add_tokens: Sequence[str] = (),
              tokenizer_out: str | None = None, step: int | None = None) -> Base:
    """Load `run_dir`'s params on `mesh` by `rules` (latest checkpoint unless `step`), with the
    missing `add_tokens` appended to its vocabulary (written to `tokenizer_out`; needed when
    `add_tokens` is given)."""
    _, cfg, seq_len, tokenizer_path = read_run_config(run_dir)
    run = load_run(run_dir, step=step, mesh=mesh, rules=rules)
    new_ids: list[int] = []
    if tokenizer_out is not None:
        new_ids = extend_tokenizer(tokenizer_path, tokenizer_out, add_tokens)
        tokenizer_path = tokenizer_out
    if new_ids and new_ids[0] != cfg.vocab_size:
        raise DataError(f"the tokenizer of {run_dir} has {new_ids[0]} pieces but its model "
                        f"{cfg.vocab_size} vocabulary rows; cannot append tokens.")
    params = extend_params(run.params, len(new_ids))
    cfg = dataclasses.replace(cfg, vocab_size=cfg.vocab_size + len(new_ids))

    def init(key: jax.Array) -> dict:
        del key
        return params

    init.loads_params = True  # create_train_state places these instead of jitting an init
    return Base(run_dir=os.path.abspath(run_dir), step=run.step, cfg=cfg, seq_len=seq_len,
                tokenizer_path=tokenizer_path, new_ids=new_ids, init=init)


def restore_opt_state(run_dir: str, step: int, opt_state):
    """The optimizer state of `run_dir`'s checkpoint `step`, restored into the shardings of
    `opt_state` (a freshly initialised state of the same optimizer). ConfigError when the
    structures or shapes differ (another optimizer, or an extended vocabulary)."""
    if step not in checkpoint_steps(run_dir):
        raise DataError(f"run_dir {run_dir!r} has no checkpoint at step {step}.")
    return restore_state_field(run_dir, step, "opt_state", opt_state, lambda why: ConfigError(
        f"the optimizer state of {run_dir} step {step} does not fit this run's optimizer "
        f"({why}); set the optimizer to the base run's make_optimizer.* or start the optimizer "
        "fresh."))


def decoder_spec(cfg: ModelConfig, tc: TrainConfig, base: Base | None,
                 init_optimizer: str = "fresh") -> tuple[ModelSpec, Callable | None]:
    """(the decoder's `ModelSpec` for `train_and_evaluate`, its optimizer-state initialiser or
    None): parameters from `base` (or freshly initialised), the next-token loss over the batch's
    `loss_mask` (chunked by `TrainConfig.loss_chunk`, fake-quantized when gin sets `qat.method`),
    and with `init_optimizer="restored"` the base run's optimizer state."""
    graphdef, abstract_params, logical_axes = transformer.abstract(cfg)
    spec = ModelSpec(graphdef, abstract_params, logical_axes,
                     init=base.init if base else (lambda k: transformer.init(cfg, k)[1]),
                     loss_fn=qat(decoder_loss(graphdef, tc.z_loss, tc.loss_chunk),
                                 abstract_params, logical_axes),
                     num_params=cfg.num_params(),
                     flops_per_row=cfg.flops_per_token(tc.seq_len) * tc.seq_len,
                     base_run=base.run_dir if base else None,
                     base_step=base.step if base else None)
    if init_optimizer != "restored":
        return spec, None
    return spec, lambda fresh: restore_opt_state(base.run_dir, base.step, fresh)

