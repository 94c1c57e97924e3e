"""Supervised fine-tuning on chat data, from a pretrained run directory or from scratch.

    python -m experiments.sft --gin_file=gin_configs/experiments/sft_tasks.gin \
        [--gin_param='sft.init_from="runs/quickstart"' --gin_param='sft.run_dir="runs/sft"' ...]

1. the base: `sft.init_from` (a run directory: its latest params, through `llm.runs.load_run`;
   the model config is the base's) or nothing (from scratch: `ModelConfig.*`, `sft.tokenizer`).
   The chat role tags are appended to the vocabulary if the tokenizer lacks them (new embedding
   rows, mean-initialised: `llm.posttrain.init`); the run directory gets its own tokenizer.model;
2. the data: JSONL conversations (`sft.train_data`, `sft.validation_data`; or `sft.tasks`, task
   families of `llm.posttrain.tasks` written to <run_dir>/data/), tokenized with the serving chat
   template, loss on assistant tokens only, packed whole with segment ids
   (`llm.posttrain.chat_data`);
3. training on the shared path (`llm.train.experiment.train_and_evaluate`: the same train step,
   mesh, rules, checkpoints and exact resume as pretraining; LoRA applies through gin
   `LoraConfig.*`). The optimizer starts fresh, or from the base's state
   (`sft.init_optimizer="restored"`, same optimizer and vocabulary only);
4. validation loss on response tokens, of the base (eval.json "base") and after fine-tuning;
   with `sft.tasks`, the greedy task score of the held-out split before (the base, with and
   without the chat template) and after fine-tuning.

The run directory is a normal one (manifest.json, config.gin, checkpoints/, metrics.jsonl, tb/,
plots/loss.png, eval.json, tokenizer.model): `load_run`, `experiments.evaluate` and the server
read it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import gin
import jax

from llm.config import ConfigError
from llm.data.objectives import Objective
from llm.data.sources import DataError
from llm.data.tokenizer import load_tokenizer
from llm.eval.perplexity import accumulate
from llm.model.config import ModelConfig
from llm.parallel.mesh import make_mesh
from llm.parallel.rules import axis_rules
from llm.posttrain import chat_data, init
from llm.posttrain import tasks as task_families
from llm.posttrain.task_score import task_score
from llm.serve.chat_template import ROLE_TAGS
from llm.train import experiment
from llm.train.experiment import train_and_evaluate
from llm.train.loop import TrainConfig
from llm.train.loss import decoder_loss

__all__ = ["main", "sft"]

# Tokens generated per held-out answer when scoring, by task (None: the others).
SCORE_TOKENS = {"code": 160, None: 24}

# Rows are packed by `llm.posttrain.chat_data`; the objective only names the run's rows
# (manifest "objective"; `llm.runs` reads "sft" runs as decoder-only).
SFT_OBJECTIVE = Objective(name="sft", lengths=lambda n: {"targets": n},
                          post_pack=lambda f, rng: f)


def _task_data(run_dir: str, names: tuple[str, ...], num: int | None, num_heldout: int | None,
               seed: int) -> tuple[str, str, dict[str, list]]:
    """Write the train / held-out splits of task families as prompt/response JSONL under
    <run_dir>/data/. Returns (train path, validation path, {task: held-out examples})."""
    unknown = [n for n in names if n not in task_families.TASKS]
    if unknown:
        raise ConfigError(f"sft.tasks={list(names)} names {unknown}, not among "
                          f"{sorted(task_families.TASKS)}.")
    train, held = [], {}
    for name in names:
        train += task_families.make_examples(name, "train", num=num, seed=seed)
        held[name] = task_families.make_examples(name, "heldout", num=num_heldout, seed=seed)
    data = os.path.join(run_dir, "data")
    train_path = task_families.write_jsonl(train, os.path.join(data, "train.jsonl"))
    val_path = task_families.write_jsonl([e for n in names for e in held[n]],
                                 os.path.join(data, "validation.jsonl"))
    return train_path, val_path, held


@gin.configurable
def sft(run_dir: str = "runs/sft", init_from: str | None = None, tokenizer: str | None = None,
        train_data: str | None = None, validation_data: str | None = None,
        validation_fraction: float = 0.1, tasks: tuple[str, ...] = (),
        task_examples: int | None = None, validation_examples: int | None = 256,
        score_examples: int = 64,
        score_max_new_tokens: int | None = None, init_optimizer: str = "fresh") -> dict:
    """Fine-tune and evaluate. Returns the final eval record (also in eval.json).

    init_from: a run directory to start from (None: from scratch, with `tokenizer`).
    tokenizer: a SentencePiece model for a run from scratch (e.g. a prepared data directory's
      tokenizer.model).
    train_data / validation_data: JSONL path or glob (messages or prompt/response records);
      without validation_data, `validation_fraction` of train_data is held out (seeded).
    tasks: task families of `llm.posttrain.tasks` to train on instead of
      train_data (their "train" split, `task_examples` each, None: the task's default; the
      validation set: the first `validation_examples` of each "heldout" split).
    score_examples / score_max_new_tokens: held-out examples per task scored by greedy
      generation before and after training (0: no scoring); tokens generated per answer
      (None: `SCORE_TOKENS`).
    init_optimizer: "fresh" or "restored" (the base run's optimizer state; same optimizer).
    """
    tc = TrainConfig()
    if init_optimizer not in ("fresh", "restored"):
        raise ConfigError(f"sft.init_optimizer={init_optimizer!r} must be 'fresh' or "
                          "'restored'.")
    if (train_data is None) == (not tasks):
        raise ConfigError("Set exactly one of sft.train_data (a chat JSONL path) and sft.tasks "
                          f"(task families among {sorted(task_families.TASKS)}).")
    if init_from is None and tokenizer is None:
        raise ConfigError("A run from scratch needs sft.tokenizer (a tokenizer.model path); or "
                          "start from a pretrained run with sft.init_from.")
    if init_from is not None and tokenizer is not None:
        raise ConfigError(f"sft.tokenizer={tokenizer!r} and sft.init_from={init_from!r} are both "
                          "set; a run from a base uses the base's tokenizer, so unset "
                          "sft.tokenizer.")
    if init_from is None and init_optimizer == "restored":
        raise ConfigError("sft.init_optimizer='restored' needs sft.init_from.")
    os.makedirs(run_dir, exist_ok=True)
    tokenizer_path = os.path.join(run_dir, "tokenizer.model")
    mesh, rules = make_mesh(), axis_rules()
    if init_from is not None:
        base = init.load_base(init_from, mesh, rules, add_tokens=ROLE_TAGS,
                              tokenizer_out=tokenizer_path)
        cfg = init.adopt_model_config(base.cfg, init_from, base.cfg.vocab_size)
        new_ids = base.new_ids
    else:
        if not os.path.isfile(tokenizer):
            raise DataError(f"sft.tokenizer={tokenizer!r} does not exist; pass a "
                            "tokenizer.model (e.g. a prepared data directory's).")
        new_ids = init.extend_tokenizer(tokenizer, tokenizer_path, ROLE_TAGS)
        cfg = dataclasses.replace(ModelConfig(),
                                  vocab_size=load_tokenizer(tokenizer_path).vocab_size)
        base = None
    cfg.check_seq_len(tc.seq_len)
    if new_ids and init_optimizer == "restored":
        raise ConfigError(f"sft.init_optimizer='restored' cannot be used: the chat tags were "
                          f"appended to {init_from}'s vocabulary, so its optimizer state has "
                          "another shape; use 'fresh'.")
    tok = load_tokenizer(tokenizer_path)

    held = {}
    if tasks:
        train_data, validation_data, held = _task_data(run_dir, tuple(tasks), task_examples,
                                                       validation_examples, tc.seed)
    conversations = chat_data.read_chat_jsonl(train_data, "sft.train_data")
    if validation_data is not None:
        val_conversations = chat_data.read_chat_jsonl(validation_data, "sft.validation_data")
    else:
        conversations, val_conversations = chat_data.split_validation(
            conversations, validation_fraction, tc.seed)
    train_examples, train_stats = chat_data.encode_conversations(tok, conversations, tc.seq_len)
    val_examples, val_stats = chat_data.encode_conversations(tok, val_conversations, tc.seq_len)
    pc, pi = jax.process_count(), jax.process_index()
    train_ds = chat_data.chat_dataset(train_examples, seq_len=tc.seq_len,
                                      global_batch_size=tc.global_batch_size, seed=tc.seed,
                                      process_index=pi, process_count=pc)
    val_ds = chat_data.chat_dataset(val_examples, seq_len=tc.seq_len,
                                    global_batch_size=tc.global_batch_size, seed=tc.seed,
                                    shuffle=False, num_epochs=1, process_index=pi,
                                    process_count=pc)
    for split, st in (("train", train_stats), ("validation", val_stats)):
        print(f"sft: {split}: {st.conversations} conversations, {st.tokens} tokens, "
              f"{st.response_tokens} response tokens, {st.truncated} cut at "
              f"seq_len={tc.seq_len}")

    model, init_opt_state = init.decoder_spec(cfg, tc, base, init_optimizer)
    graphdef = model.graphdef

    def summarize_eval(sums: dict) -> dict:
        n = max(sums["tokens"], 1.0)
        return {"loss": sums["nll"] / n, "accuracy": sums["correct"] / n,
                "tokens": sums["tokens"],
                "bits_per_response_byte": sums["nll"] / 0.6931471805599453 /
                max(val_stats.response_bytes, 1)}

    base_eval = None
    if base is not None and jax.process_count() == 1:  # the base's loss on the same responses
        base_eval = summarize_eval(accumulate(jax.jit(decoder_loss(graphdef)), base.init(None),
                                              val_ds, lambda b: b))
        print(f"sft: base validation loss on response tokens {base_eval['loss']:.4f}")

    def max_tokens(task: str) -> int:
        return score_max_new_tokens or SCORE_TOKENS.get(task, SCORE_TOKENS[None])

    scores_before = {}
    if held and score_examples and base is not None and jax.process_count() == 1:
        params0 = base.init(None)
        for name, examples in held.items():
            ex = examples[:score_examples]
            scores_before[name] = {
                "chat": task_score(graphdef, params0, cfg, tok, ex, chat=True,
                                   max_new_tokens=max_tokens(name))["score"],
                "raw": task_score(graphdef, params0, cfg, tok, ex, chat=False,
                                  max_new_tokens=max_tokens(name))["score"]}
            print(f"sft: base task score {name}: chat template "
                  f"{scores_before[name]['chat']:.3f}, raw prompt {scores_before[name]['raw']:.3f}")
        del params0

    data_record = {"data_dir": os.path.abspath(run_dir), "tokenizer": "tokenizer.model",
                   "vocab_size": cfg.vocab_size, "added_tokens": new_ids,
                   "train_data": os.path.abspath(train_data),
                   "validation_data": os.path.abspath(validation_data) if validation_data
                   else None, "train": train_stats.to_json(), "validation": val_stats.to_json()}
    run = train_and_evaluate(
        name="sft", run_dir=run_dir, data_dir=run_dir, info=None, tc=tc, model=model,
        objective=SFT_OBJECTIVE, summarize_eval=summarize_eval,
        datasets=(train_ds, val_ds), data_record=data_record, init_opt_state=init_opt_state,
        manifest_extra={"init_from": {"run_dir": base.run_dir, "step": base.step,
                                      "optimizer": init_optimizer} if base else None})
    if run.status == "preempted":
        return {"status": run.status, "step": int(run.state.step)}
    result = dict(run.eval)
    if base_eval is not None:
        result["base"] = base_eval
    if held and score_examples and jax.process_count() == 1:
        params = run.params
        result["task_score"] = {}
        for name, examples in held.items():
            s = task_score(graphdef, params, cfg, tok, examples[:score_examples], chat=True,
                           max_new_tokens=max_tokens(name))
            result["task_score"][name] = {"sft": s["score"], "n": s["n"], "reward": s["reward"],
                                          **({"base_chat": scores_before[name]["chat"],
                                              "base_raw": scores_before[name]["raw"]}
                                             if name in scores_before else {}),
                                          "samples": s["samples"]}
            print(f"sft: task score {name}: {s['score']:.3f} after SFT"
                  + (f" (base: chat {scores_before[name]['chat']:.3f}, raw "
                     f"{scores_before[name]['raw']:.3f})" if name in scores_before else ""))
        if jax.process_index() == 0:
            with open(os.path.join(run_dir, "eval.json"), "w") as f:
                json.dump(result, f, indent=2)
    if jax.process_index() == 0:
        print(f"sft: validation loss on response tokens {result['loss']:.4f}, accuracy "
              f"{result['accuracy']:.3f}, {result['bits_per_response_byte']:.4f} bits per "
              "response byte")
    return result


def main(argv: list[str] | None = None) -> int:
    """The command line: exit code 0, or 2 with one line on stderr for a bad setting or bad
    data (`experiment.USER_ERRORS`)."""
    try:
        experiment.parse_command_line("sft", __doc__.split("\n\n")[0], argv)
        sft()
    except experiment.USER_ERRORS as e:
        return experiment.report_error("sft", e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
