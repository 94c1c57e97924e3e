"""Knowledge distillation: train a smaller student on a teacher run's next-token distributions.

    python -m experiments.distill --gin_file=gin_configs/debug/distill_tiny.gin \
        --gin_param='distill.teacher_run="runs/quickstart"' --gin_param='distill.run_dir="runs/d"'

The teacher is any decoder run directory (`llm.runs.load_run`); the student is the gin
`ModelConfig` (any depth, width, head count), trained on the teacher's data directory (or
`distill.data_dir`, prepared with the same tokenizer). Teacher and student vocabularies must
match. The loss (`llm.distill.losses.DistillLoss`: forward KL, reverse KL or generalized JSD, a
temperature, a mix with the hard-label loss) and the teacher's role (`distill.mode`):

  online   the teacher's forward runs inside the jitted step, its parameters an input of the step
           sharded by the same logical-axis rules as the student's, frozen (no gradient, no
           optimizer state);
  offline  the teacher's top-k logits (`distill.top_k`) are written once to ArrayRecord beside
           the tokens of the training rows (`llm.distill.offline`, `distill.topk_dir`) and read
           back through grain; the loss renormalises over the top-k.

`OnPolicy.fraction` > 0 (online mode) trains that share of the steps on the student's own samples
scored by the teacher (GKD; `llm.distill.on_policy`).

The student trains on the shared `llm.train.step.train_step` (the teacher is its `frozen`
input) and the shared loop: checkpoints (student only; the teacher is named in manifest.json),
metrics.jsonl (`loss` = the objective, `hard_loss`, `divergence`), resume, SIGTERM. Evaluation is
the student's plain next-token loss on the validation split: bits per byte, comparable with
`experiments.pretrain_ntp` runs. The run directory is an ordinary decoder run (`load_run`,
evaluation, serving and compression read it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys

import gin
import jax
from jax.experimental import multihost_utils

from llm.config import ConfigError
from llm.data.objectives import NEXT_TOKEN
from llm.data.pipeline import make_dataset
from llm.data.shards import load_dataset_info
from llm.distill import offline, on_policy
from llm.distill.losses import DistillLoss
from llm.distill.step import distill_loss_fn
from llm.eval.perplexity import accumulate, summarize
from llm.model import transformer
from llm.model.config import ModelConfig
from llm.parallel.mesh import make_mesh, mesh_shape
from llm.parallel.rules import axis_rules
from llm.runs import load_run, read_run_config
from llm.train import checkpoint, experiment
from llm.train.experiment import check_batch_fits_mesh
from llm.train.loop import TrainConfig, to_global, train_loop
from llm.train.loss import decoder_loss
from llm.train.manifest import write_manifest
from llm.train.metrics import MetricsWriter, peak_flops, plot_loss
from llm.train.optimizer import make_optimizer
from llm.train.state import create_train_state
from llm.train.step import batch_sharding, jit_eval_step, jit_train_step

__all__ = ["distill", "main"]

MODES = ("online", "offline")


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def student_vocab_size(data_vocab: int) -> tuple[int, str]:
    """(vocab size, where it comes from): an explicit `ModelConfig.vocab_size` binding, else the
    data's tokenizer (as pretrain_ntp does)."""
    try:
        return int(gin.query_parameter("ModelConfig.vocab_size")), "ModelConfig.vocab_size"
    except ValueError:
        return data_vocab, "the data's tokenizer"


def check_vocabularies(teacher_run: str, teacher_vocab: int, teacher_tokenizer: str,
                       student_vocab: int, student_source: str, data_dir: str, data_vocab: int,
                       data_tokenizer: str) -> None:
    """ConfigError (one line naming both sides) unless teacher, student and data share one
    vocabulary: same size, and the data's tokenizer is the teacher's (same file bytes)."""
    if teacher_vocab != student_vocab:
        raise ConfigError(f"teacher {teacher_run!r} has vocabulary size {teacher_vocab} but the "
                          f"student has {student_vocab} (from {student_source}); distillation "
                          "needs one vocabulary: unset ModelConfig.vocab_size or set it to "
                          f"{teacher_vocab}.")
    if data_vocab != student_vocab or _sha256(teacher_tokenizer) != _sha256(data_tokenizer):
        raise ConfigError(f"teacher {teacher_run!r} tokenizer {teacher_tokenizer} (vocabulary "
                          f"{teacher_vocab}) differs from distill.data_dir={data_dir!r} tokenizer "
                          f"{data_tokenizer} (vocabulary {data_vocab}); use the teacher's data "
                          "directory or one prepared with prepare.tokenizer_model set to the "
                          "teacher's tokenizer.")


@gin.configurable
def distill(teacher_run: str = "", run_dir: str = "runs/distill", data_dir: str | None = None,
            mode: str = "online", teacher_step: int | None = None, top_k: int = 64,
            topk_dir: str | None = None) -> dict:
    """Distil `teacher_run` into the gin `ModelConfig`; returns the final eval record (also in
    eval.json; `teacher_bits_per_byte` is copied from the teacher's eval.json when it has one).

    data_dir: a prepared data directory (default: the teacher's, from its manifest). It is read,
      never (re)prepared.
    mode: "online" or "offline" (see the module docstring).
    teacher_step: the teacher checkpoint (default: its latest).
    top_k: offline: logits kept per token (1 <= top_k <= vocabulary size).
    topk_dir: offline: where the top-k rows are written once (default <run_dir>/teacher_topk).
    """
    tc, loss_cfg, op_cfg = TrainConfig(), DistillLoss(), on_policy.OnPolicy()
    if not teacher_run:
        raise ConfigError("distill.teacher_run is not set; pass the teacher's run directory, "
                          "e.g. --gin_param='distill.teacher_run=\"runs/quickstart\"'.")
    if mode not in MODES:
        raise ConfigError(f"distill.mode={mode!r} is not one of {', '.join(MODES)}.")
    op_cfg.check(tc.seq_len)
    if op_cfg.fraction and mode != "online":
        raise ConfigError(f"OnPolicy.fraction={op_cfg.fraction} needs distill.mode='online' (the "
                          "teacher scores the student's samples as they are drawn).")
    teacher_manifest, teacher_cfg, _, teacher_tokenizer = read_run_config(teacher_run)
    data_dir = data_dir or teacher_manifest["data"].get("data_dir", "")
    info = load_dataset_info(data_dir)
    vocab, vocab_source = student_vocab_size(info.vocab_size)
    check_vocabularies(teacher_run, teacher_cfg.vocab_size, teacher_tokenizer, vocab,
                       vocab_source, data_dir, info.vocab_size, info.tokenizer_path)
    if mode == "offline" and not 1 <= top_k <= vocab:
        raise ConfigError(f"distill.top_k={top_k} must be in [1, vocabulary size {vocab}].")
    if mode == "offline" and loss_cfg.divergence == "reverse_kl" and top_k < vocab:
        raise ConfigError(f"DistillLoss.divergence='reverse_kl' needs the teacher's whole "
                          f"distribution (it is 0 outside its top {top_k} tokens, so KL(q||p) is "
                          "infinite); use forward_kl or jsd with distill.mode='offline', or "
                          "distill.mode='online'.")
    cfg = dataclasses.replace(ModelConfig(), vocab_size=vocab)
    cfg.check_seq_len(tc.seq_len)

    mesh, rules = make_mesh(), axis_rules()
    check_batch_fits_mesh(tc, mesh, rules)
    teacher = load_run(teacher_run, step=teacher_step, mesh=mesh, rules=rules)
    graphdef, abstract_params, logical_axes = transformer.abstract(cfg)
    tx, schedule = make_optimizer(total_steps=tc.steps)
    state, shardings = create_train_state(lambda k: transformer.init(cfg, k)[1], abstract_params,
                                          logical_axes, tx, mesh, rules, seed=tc.seed)
    loss_fn = distill_loss_fn(graphdef, teacher.graphdef, loss_cfg)
    step_kwargs = dict(loss_fn=loss_fn, tx=tx, schedule=schedule, accum_steps=tc.accum_steps)
    batch_shard = batch_sharding(mesh, rules)
    eval_step = jit_eval_step(shardings.params, mesh, rules, decoder_loss(graphdef))

    if mode == "online":
        teacher_shardings = jax.tree.map(lambda x: x.sharding, teacher.params)
        jitted = jit_train_step(shardings, mesh, rules, frozen_shardings=teacher_shardings,
                                **step_kwargs)
        data_iter = iter(make_dataset(data_dir, "train", seq_len=tc.seq_len,
                                      global_batch_size=tc.global_batch_size, seed=tc.seed))
    else:
        jitted = jit_train_step(shardings, mesh, rules, **step_kwargs)
        topk_dir = topk_dir or os.path.join(run_dir, "teacher_topk")
        meta = offline.settings(teacher.run_dir, teacher.step, data_dir, info.fingerprint,
                                k=top_k, seq_len=tc.seq_len,
                                global_batch_size=tc.global_batch_size, seed=tc.seed,
                                num_batches=tc.steps, vocab_size=vocab)
        if jax.process_index() == 0 and not offline.check_reusable(topk_dir, meta):
            offline.write_topk(topk_dir, graphdef=teacher.graphdef, params=teacher.params,
                               meta=meta)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("distill_topk")
        print(f"distill: teacher top-{top_k} in {topk_dir}: "
              f"{offline.bytes_per_token(top_k, vocab)} bytes per token")
        data_iter = iter(offline.topk_dataset(topk_dir, global_batch_size=tc.global_batch_size))

    def step_fn(state, batch):
        if op_cfg.fraction:
            # Every process gathers the whole global batch and the student's parameters, samples
            # all rows (the same program on the same inputs) and keeps the rows it owns, so the
            # samples do not depend on the process count (on_policy.sample_global_batch).
            step = int(state.step)
            if on_policy.is_on_policy(op_cfg, tc.seed, step):
                batch = on_policy.sample_global_batch(batch, batch_shard, graphdef=graphdef,
                                                      params=state.params, cfg=cfg,
                                                      config=op_cfg, seed=tc.seed, step=step)
            else:
                batch = {**batch, "hard_mask": batch["loss_mask"]}
        if mode == "online":
            return jitted(state, batch, teacher.params)
        return jitted(state, batch)

    validation = make_dataset(data_dir, "validation", seq_len=tc.seq_len,
                              global_batch_size=tc.global_batch_size, seed=tc.seed,
                              shuffle=False, num_epochs=1)
    split = info.splits["validation"]

    def evaluate(state, max_batches: int | None) -> dict:
        sums = accumulate(eval_step, state.params, validation,
                          lambda b: to_global(b, batch_shard), max_batches)
        return summarize(sums, bytes_per_token=split.num_bytes / split.num_tokens)

    manager = checkpoint.checkpoint_manager(os.path.join(run_dir, "checkpoints"))
    restored = checkpoint.restore_latest(manager, state, data_iter)
    if restored is not None:
        state = restored
        print(f"distill: resumed from step {int(state.step)} of {tc.steps}")
    flops_per_row = (cfg.flops_per_token(tc.seq_len)
                     + (teacher.cfg.flops_per_token(tc.seq_len) / 3 if mode == "online" else 0)
                     ) * tc.seq_len
    record = {"teacher_run": teacher.run_dir, "teacher_step": teacher.step,
              "teacher_params": teacher.cfg.num_params(), "mode": mode,
              "loss": dataclasses.asdict(loss_cfg), "on_policy": dataclasses.asdict(op_cfg)}
    if mode == "offline":
        record.update(top_k=top_k, topk_dir=os.path.abspath(topk_dir),
                      topk_bytes_per_token=offline.bytes_per_token(top_k, vocab))
    write_manifest(run_dir, mesh_shape=mesh_shape(mesh), seed=tc.seed,
                   data={"data_dir": os.path.abspath(data_dir), **info.to_json()},
                   extra={"objective": NEXT_TOKEN.name, "distill": record,
                          "model": {"params": cfg.num_params(),
                                    "flops_per_token": flops_per_row / tc.seq_len}})
    writer = MetricsWriter(run_dir)
    peak, peak_source = peak_flops()
    print(f"distill: student {cfg.num_params() / 1e6:.2f}M params, teacher "
          f"{teacher.cfg.num_params() / 1e6:.2f}M ({teacher.run_dir} step {teacher.step}), "
          f"{mode}, {loss_cfg.divergence} T={loss_cfg.temperature} alpha={loss_cfg.alpha}, "
          f"mesh {mesh_shape(mesh)}, peak {peak / 1e9:.1f} GFLOP/s per device ({peak_source})")
    state, status = train_loop(
        cfg=tc, state=state, step_fn=step_fn, data_iter=data_iter, batch_sharding=batch_shard,
        manager=manager, writer=writer, flops_per_step=flops_per_row * tc.global_batch_size,
        peak_flops_total=peak * jax.device_count(), evaluate=evaluate,
        profile_dir=os.path.join(run_dir, "profile"))
    if status == "preempted":
        print(f"distill: stopped by signal at step {int(state.step)}; checkpoint written.")
        writer.close()
        return {"status": status, "step": int(state.step)}

    result = {**evaluate(state, None), "step": int(state.step)}
    writer.write(int(state.step), result, prefix="eval")
    writer.close()
    teacher_eval = os.path.join(teacher.run_dir, "eval.json")
    if os.path.isfile(teacher_eval):
        with open(teacher_eval) as f:
            result["teacher_bits_per_byte"] = json.load(f).get("bits_per_byte")
    if jax.process_index() == 0:
        with open(os.path.join(run_dir, "eval.json"), "w") as f:
            json.dump(result, f, indent=2)
        plot_loss(run_dir)
        print(f"distill: validation loss {result['loss']:.4f}, bits/byte "
              f"{result['bits_per_byte']:.4f} (teacher: {result.get('teacher_bits_per_byte')})")
    return result


def main(argv: list[str] | None = None) -> int:
    """The command line: exit code 0, or 2 with one line on stderr for a bad setting or bad
    data (`experiment.USER_ERRORS`)."""
    try:
        experiment.parse_command_line("distill", __doc__.split("\n\n")[0], argv)
        distill()
    except experiment.USER_ERRORS as e:
        return experiment.report_error("distill", e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
