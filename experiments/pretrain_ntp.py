"""Next-token (causal LM) pretraining, end to end.

    python -m experiments.pretrain_ntp --gin_file=gin_configs/experiments/quickstart.gin \
        [--gin_param='TrainConfig.steps=200' ...]

1. prepare the data (idempotent): corpus -> split -> SentencePiece -> ArrayRecord shards;
2. build the mesh, the model and a sharded TrainState;
3. restore the latest checkpoint (params, optimizer, step, RNG, data iterator) if there is one;
4. train with the pure jitted `train_step`, checkpointing asynchronously and on SIGTERM;
5. evaluate validation loss / perplexity / bits per byte against gzip -9, plot the loss curve,
   and sample a completion.

`main` parses the command line (`llm.train.experiment.parse_command_line`) and calls `pretrain`,
which builds the model and its loss (`llm.train.loss.decoder_loss`) and hands steps 2-5 (except
sampling) to `llm.train.experiment.train_and_evaluate`, shared with `experiments.pretrain_mlm`.
`--gin_param='get_objective.name="prefix_lm"'` trains a prefix LM.

Everything lands in `runs/<name>/`: manifest.json, config.gin, metrics.jsonl, eval.json,
checkpoints/, tb/, plots/loss.png.
"""

from __future__ import annotations

import dataclasses
import sys

import gin
import jax

from llm.config import ConfigError
from llm.data import objectives
from llm.data.tokenizer import load_tokenizer
from llm.eval.perplexity import summarize
from llm.model.config import ModelConfig
from llm.parallel.mesh import make_mesh
from llm.parallel.rules import axis_rules
from llm.posttrain import init
from llm.serve.sampler import generate
from llm.train import experiment
from llm.train.experiment import prepare_on_one_process, train_and_evaluate
from llm.train.loop import TrainConfig

__all__ = ["main", "prepare_on_one_process", "pretrain"]


@gin.configurable
def pretrain(run_dir: str = "runs/ntp", data_dir: str = "data/embedded",
             sample_prompt: str = "def fibonacci(n):\n", sample_tokens: int = 96,
             init_from: str | None = None, init_optimizer: str = "fresh") -> dict:
    """Train, evaluate and sample. Returns the final eval record (also written to eval.json).

    The objective is `get_objective.name`: "next_token" (default) or "prefix_lm" (bidirectional
    attention over a random prefix of every document, loss on the rest).

    Continued pretraining (e.g. on a domain corpus, gin_configs/experiments/domain_*.gin):
    init_from: a run directory whose latest params the run starts from (its model config is
      adopted; `data_dir` must use its tokenizer). Replay of the original data is a train-time
      mixture (`make_dataset.mixture` with `make_dataset.mixture_datasets`).
    init_optimizer: "fresh" (new optimizer state) or "restored" (the base run's, same optimizer).
    """
    tc, cfg = TrainConfig(), ModelConfig()  # settings are checked before any data work
    cfg.check_seq_len(tc.seq_len)
    try:
        objective = objectives.get_objective()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if objective.model != "decoder":
        raise ConfigError(f"Objective {objective.name!r} trains an {objective.model} model; run "
                          "it with `python -m experiments.pretrain_mlm` (pretrain_ntp takes "
                          "next_token or prefix_lm).")
    if init_optimizer not in ("fresh", "restored"):
        raise ConfigError(f"pretrain.init_optimizer={init_optimizer!r} must be 'fresh' or "
                          "'restored'.")
    info = prepare_on_one_process(data_dir)
    base = None
    if init_from is not None:
        base = init.load_base(init_from, make_mesh(), axis_rules())
        init.check_vocabulary(init_from, base.tokenizer_path, data_dir, info.tokenizer_path)
        cfg = init.adopt_model_config(base.cfg, init_from)
        cfg.check_seq_len(tc.seq_len)
    elif init_optimizer == "restored":
        raise ConfigError("pretrain.init_optimizer='restored' needs pretrain.init_from.")
    cfg = dataclasses.replace(cfg, vocab_size=info.vocab_size)
    model, init_opt_state = init.decoder_spec(cfg, tc, base, init_optimizer)
    graphdef = model.graphdef

    validation = info.splits["validation"]

    def summarize_eval(sums: dict) -> dict:
        return {**summarize(sums, bytes_per_token=validation.num_bytes / validation.num_tokens),
                "gzip_bits_per_byte": 8 * validation.gzip_bytes / validation.num_bytes,
                "unigram_bits_per_byte": validation.unigram_bits / validation.num_bytes,
                "num_bytes": validation.num_bytes}

    run = train_and_evaluate(name="pretrain", run_dir=run_dir, data_dir=data_dir, info=info,
                             tc=tc, model=model, objective=objective,
                             summarize_eval=summarize_eval, init_opt_state=init_opt_state,
                             manifest_extra={"init_from": {
                                 "run_dir": base.run_dir, "step": base.step,
                                 "optimizer": init_optimizer}} if base else None)
    if run.status == "preempted":
        return {"status": run.status, "step": int(run.state.step)}
    result = run.eval
    if jax.process_index() == 0:
        print(f"pretrain: validation loss {result['loss']:.4f}, perplexity "
              f"{result['perplexity']:.2f}, bits/byte {result['bits_per_byte']:.4f} "
              f"(gzip -9: {result['gzip_bits_per_byte']:.4f}, unigram: "
              f"{result['unigram_bits_per_byte']:.4f})")
    if sample_prompt and jax.process_count() == 1:
        tok = load_tokenizer(info.tokenizer_path)
        new = generate(graphdef, run.params, cfg, [tok.encode(sample_prompt)],
                       max_new_tokens=sample_tokens)[0]
        print("pretrain: sample\n" + "-" * 60 + "\n" + sample_prompt + tok.decode(new) +
              "\n" + "-" * 60)
    return result


def main(argv: list[str] | None = None) -> int:
    """The command line: exit code 0, or 2 with one line on stderr for a bad setting or bad
    data (`experiment.USER_ERRORS`)."""
    try:
        experiment.parse_command_line("pretrain_ntp", __doc__.split("\n\n")[0], argv)
        pretrain()
    except experiment.USER_ERRORS as e:
        return experiment.report_error("pretrain_ntp", e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
