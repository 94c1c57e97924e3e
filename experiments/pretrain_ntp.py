"""Next-token (causal LM) pretraining, end to end.

    python -m experiments.pretrain_ntp --gin_file=gin_configs/experiments/quickstart.gin \
        [--gin_param='TrainConfig.steps=200' ...]

1. prepare the data (idempotent): corpus -> split -> SentencePiece -> ArrayRecord shards;
2. build the mesh, the model and a sharded TrainState;
3. restore the latest checkpoint (params, optimizer, step, RNG, data iterator) if there is one;
4. train with the pure jitted `train_step`, checkpointing asynchronously and on SIGTERM;
5. evaluate validation loss / perplexity / bits per byte against gzip -9, plot the loss curve,
   and sample a completion.

Everything lands in `runs/<name>/`: manifest.json, config.gin, metrics.jsonl, eval.json,
checkpoints/, tb/, plots/loss.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import gin
import jax
from jax.experimental import multihost_utils

from llm.config import ConfigError, parse_gin
from llm.data import objectives
from llm.data.pipeline import make_dataset
from llm.data.shards import DatasetInfo, load_dataset_info
from llm.data.sources import DataError
from llm.data.tokenizer import load_tokenizer
from llm.eval.perplexity import accumulate, summarize
from llm.model import transformer
from llm.model.config import ModelConfig
from llm.parallel.mesh import initialize_distributed, make_mesh, mesh_shape
from llm.parallel.rules import axis_rules
from llm.serve.sampler import generate
from llm.train import checkpoint
from llm.train.loop import NonFiniteLoss, TrainConfig, to_global, train_loop
from llm.train.manifest import write_manifest
from llm.train.metrics import MetricsWriter, peak_flops, plot_loss
from llm.train.optimizer import make_optimizer
from llm.train.state import create_train_state
from llm.train.step import batch_sharding, decoder_loss, jit_eval_step, jit_train_step
from tools.prepare_data import prepare


def prepare_on_one_process(data_dir: str) -> DatasetInfo:
    """Process 0 prepares (or reuses) the data; the others wait, then read dataset.json."""
    if jax.process_index() == 0:
        prepare(data_dir)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("prepare_data")
    return load_dataset_info(data_dir)


@gin.configurable
def pretrain(run_dir: str = "runs/ntp", data_dir: str = "data/embedded",
             sample_prompt: str = "def fibonacci(n):\n", sample_tokens: int = 96) -> dict:
    """Train, evaluate and sample. Returns the final eval record (also written to eval.json)."""
    info = prepare_on_one_process(data_dir)
    tc = TrainConfig()
    cfg = ModelConfig(vocab_size=info.vocab_size)
    mesh, rules = make_mesh(), axis_rules()
    objective = objectives.get_objective()

    graphdef, abstract_params, logical_axes = transformer.abstract(cfg)
    tx, schedule = make_optimizer(total_steps=tc.steps)
    state, shardings = create_train_state(lambda k: transformer.init(cfg, k)[1], abstract_params,
                                          logical_axes, tx, mesh, rules, seed=tc.seed)
    loss_fn = decoder_loss(graphdef, tc.z_loss)
    train_step = jit_train_step(shardings, mesh, rules, loss_fn=loss_fn, tx=tx, schedule=schedule,
                                accum_steps=tc.accum_steps)
    eval_step = jit_eval_step(shardings.params, mesh, rules, loss_fn)
    batch_shard = batch_sharding(mesh, rules)

    data_iter = iter(make_dataset(data_dir, "train", seq_len=tc.seq_len,
                                  global_batch_size=tc.global_batch_size, seed=tc.seed,
                                  objective=objective))
    manager = checkpoint.checkpoint_manager(os.path.join(run_dir, "checkpoints"))
    restored = checkpoint.restore_latest(manager, state, data_iter)
    if restored is not None:
        state = restored
        print(f"pretrain: resumed from step {int(state.step)} of {tc.steps}")

    validation = info.splits["validation"]
    bytes_per_token = validation.num_bytes / validation.num_tokens

    def evaluate(state, max_batches: int | None) -> dict:
        batches = make_dataset(data_dir, "validation", seq_len=tc.seq_len,
                               global_batch_size=tc.global_batch_size, seed=tc.seed,
                               objective=objective, shuffle=False, num_epochs=1)
        sums = accumulate(eval_step, state.params, batches,
                          lambda b: to_global(b, batch_shard), max_batches)
        return summarize(sums, bytes_per_token=bytes_per_token)

    write_manifest(run_dir, mesh_shape=mesh_shape(mesh), seed=tc.seed,
                   data={"data_dir": os.path.abspath(data_dir), **info.to_json()},
                   extra={"model": {"params": cfg.num_params(),
                                    "flops_per_token": cfg.flops_per_token(tc.seq_len)}})
    writer = MetricsWriter(run_dir)
    peak, peak_source = peak_flops()
    print(f"pretrain: {cfg.num_params() / 1e6:.2f}M params, mesh {mesh_shape(mesh)}, "
          f"peak {peak / 1e9:.1f} GFLOP/s per device ({peak_source})")
    state, status = train_loop(
        cfg=tc, state=state, step_fn=train_step, batches=data_iter, data_iter=data_iter,
        batch_sharding=batch_shard, manager=manager, writer=writer,
        flops_per_step=cfg.flops_per_token(tc.seq_len) * tc.global_batch_size * tc.seq_len,
        peak_flops_total=peak * jax.device_count(), evaluate=evaluate)
    if status == "preempted":
        print(f"pretrain: stopped by signal at step {int(state.step)}; checkpoint written.")
        writer.close()
        return {"status": status, "step": int(state.step)}

    result = evaluate(state, None)
    result.update(step=int(state.step), gzip_bits_per_byte=8 * validation.gzip_bytes /
                  validation.num_bytes, num_bytes=validation.num_bytes)
    writer.write(int(state.step), result, prefix="eval")
    writer.close()
    if jax.process_index() == 0:
        with open(os.path.join(run_dir, "eval.json"), "w") as f:
            json.dump(result, f, indent=2)
        plot_loss(run_dir)
        print(f"pretrain: validation loss {result['loss']:.4f}, perplexity "
              f"{result['perplexity']:.2f}, bits/byte {result['bits_per_byte']:.4f} "
              f"(gzip -9: {result['gzip_bits_per_byte']:.4f})")
    if sample_prompt and jax.process_count() == 1:
        tok = load_tokenizer(info.tokenizer_path)
        new = generate(graphdef, state.params, cfg, [tok.encode(sample_prompt)],
                       max_new_tokens=sample_tokens)[0]
        print("pretrain: sample\n" + "-" * 60 + "\n" + sample_prompt + tok.decode(new) +
              "\n" + "-" * 60)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gin_file", action="append", default=[], help="gin config file(s)")
    parser.add_argument("--gin_param", action="append", default=[], help="gin binding(s)")
    args = parser.parse_args(argv)
    try:
        parse_gin(args.gin_file, args.gin_param)
        initialize_distributed()
        pretrain()
    except (ConfigError, DataError, NonFiniteLoss) as e:
        print(f"pretrain_ntp: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
