"""Masked-LM pretraining, end to end: BERT MLM (encoder-only) or T5 span corruption
(encoder-decoder).

    python -m experiments.pretrain_mlm --gin_file=gin_configs/experiments/mlm_bert.gin
    python -m experiments.pretrain_mlm --gin_file=gin_configs/experiments/mlm_t5.gin

`get_objective.name` picks the objective and with it the model: "bert_mlm" trains
`encoder_decoder.Encoder` (15 % of tokens selected, 80/10/10 mask/random/keep, gin
`bert_mlm.*`), "span_corruption" trains `encoder_decoder.EncoderDecoder` (noise density 0.15, mean
span length 3, gin `span_corruption.*`). The vocabulary is the prepared SentencePiece model plus
`pretrain_mlm.extra_ids` sentinels (seqio's `<extra_id_i>`); BERT's [MASK] is `<extra_id_0>`.

The run directory is the same as next-token pretraining's (manifest.json, config.gin,
metrics.jsonl, eval.json, checkpoints/, tb/, plots/loss.png; resume after a kill). eval.json holds
the validation loss and masked-token accuracy (BERT, with the unigram-frequency baselines), or
the denoising loss, token accuracy and exact-span accuracy (span corruption). At the end a
validation row is printed with its masked spans filled in by the model.
"""

from __future__ import annotations

import dataclasses
import math
import sys

import gin
import jax
import numpy as np

from llm.config import ConfigError
from llm.data import objectives
from llm.data.objectives import VocabInfo
from llm.data.pipeline import make_dataset, pad_row
from llm.data.shards import read_all
from llm.data.tokenizer import Tokenizer, load_tokenizer
from llm.model import encoder_decoder, transformer
from llm.model.config import ModelConfig
from llm.train import experiment
from llm.train.experiment import ModelSpec, prepare_on_one_process, train_and_evaluate
from llm.train.loop import TrainConfig
from llm.train.loss import encoder_decoder_loss, encoder_loss

LOSSES = {"encoder": encoder_loss, "encoder_decoder": encoder_decoder_loss}


def unigram_baseline(info, vocab: VocabInfo) -> dict[str, float]:
    """What a model that ignores the context scores on masked regular tokens of the validation
    split, with the train split's unigram frequencies: accuracy of always predicting the most
    frequent token, and the cross entropy (nats) of the unigram distribution (add-one smoothed).
    Masked positions are a uniform sample of regular tokens, so these are the expected values."""
    def counts(split: str) -> np.ndarray:
        c = np.zeros(vocab.size, np.int64)
        for doc in read_all(info.shard_paths(split)):
            c += np.bincount(doc, minlength=vocab.size)[:vocab.size]
        c[:objectives.FIRST_REGULAR_ID] = 0
        c[vocab.regular_end:] = 0
        return c

    train, valid = counts("train"), counts("validation")
    p = (train + 1.0) / (train + 1.0)[objectives.FIRST_REGULAR_ID:vocab.regular_end].sum()
    total = max(valid.sum(), 1)
    return {"unigram_accuracy": float(valid[np.argmax(train)] / total),
            "unigram_loss": float(-(valid * np.log(p)).sum() / total)}


def _text(tok: Tokenizer, ids) -> str:
    """Text of ids, document boundaries (EOS) shown as <eos>, padding dropped."""
    ids = [int(i) for i in ids if int(i) != objectives.PAD_ID]
    parts, cur = [], []
    for i in ids:
        if i == objectives.EOS_ID:
            parts.append(tok.decode(cur))
            cur = []
        else:
            cur.append(i)
    return "<eos>\n".join([*parts, tok.decode(cur)])


def _decode_runs(tok: Tokenizer, runs: list[tuple[list[int], bool]]) -> str:
    """Text of token runs; runs flagged True are shown [[like this]]."""
    return "".join(f"[[{_text(tok, ids)}]]" if mark else _text(tok, ids) for ids, mark in runs)


def demo_bert(tok: Tokenizer, vocab: VocabInfo, graphdef, params, row: dict, max_tokens: int
              ) -> str:
    """The first document of a validation row, as the model saw it and with the masked positions
    filled in by its argmax predictions ([[...]])."""
    logits = transformer.apply(graphdef, params, row["inputs"][None],
                               positions=row["positions"][None],
                               segment_ids=row["segment_ids"][None])[0]
    pred = np.asarray(np.argmax(logits, axis=-1))
    n = min(int(np.sum(row["segment_ids"] == row["segment_ids"][0])), max_tokens)
    inputs, selected = row["inputs"][:n], row["loss_mask"][:n] > 0
    mask_id = objectives.bert_mask_id(vocab)
    shown = [((tok.encode("[MASK]") if i == mask_id else [i]), False) for i in inputs.tolist()]
    filled = [([int(p if s else t)], bool(s)) for p, t, s in zip(pred[:n], row["targets"][:n],
                                                                   selected)]
    correct = int(np.sum((pred[:n] == row["targets"][:n]) & selected))
    return (f"input (masked, [MASK] = <extra_id_0>):\n{_decode_runs(tok, shown)}\n"
            f"model's fill ({correct}/{int(selected.sum())} masked tokens right):\n"
            f"{_decode_runs(tok, filled)}")


def demo_span(tok: Tokenizer, vocab: VocabInfo, graphdef, params, row: dict, max_tokens: int
              ) -> str:
    """A validation row's corrupted input (sentinels shown as <extra_id_k>) and the text with
    every span filled in by greedy decoding ([[...]])."""
    targets_len = len(row["targets"])
    pred = np.asarray(encoder_decoder.greedy_decode(
        graphdef, params, row["encoder_inputs"][None], row["encoder_segment_ids"][None],
        targets_len))[0]
    inputs = objectives.strip_row(row["encoder_inputs"])
    truth = objectives.fill_spans(inputs, row["targets"], vocab)
    filled = objectives.fill_spans(inputs, pred, vocab, predicted=True)
    # Mark the filled spans: walk the inputs, expanding each sentinel into its predicted span.
    spans = objectives.split_spans(pred, vocab, int(np.sum(inputs >= vocab.regular_end)))
    runs: list[tuple[list[int], bool]] = []
    for t in inputs[:max_tokens].tolist():
        if t >= vocab.regular_end:
            runs.append((spans.get(t, []), True))
        elif runs and not runs[-1][1]:
            runs[-1][0].append(t)
        else:
            runs.append(([t], False))
    exact = len(filled) == len(truth) and bool(np.all(filled == truth))
    return (f"input (corrupted):\n{_text(tok, inputs[:max_tokens])}\n"
            f"model's fill (row reconstructed exactly: {exact}):\n{_decode_runs(tok, runs)}")


@gin.configurable
def pretrain_mlm(run_dir: str = "runs/mlm", data_dir: str = "data/embedded",
                 extra_ids: int = 100, demo_tokens: int = 96) -> dict:
    """Train, evaluate and print a fill-in demo. Returns the final eval record (eval.json).

    extra_ids: sentinels added to the prepared vocabulary (seqio's default is 100); span
      corruption needs one per noise span of a row, BERT uses `<extra_id_0>` as [MASK].
    demo_tokens: tokens of the validation row shown by the demo (0: no demo).
    """
    tc, cfg = TrainConfig(), ModelConfig()  # settings are checked before any data work
    cfg.check_seq_len(tc.seq_len)
    info = prepare_on_one_process(data_dir)
    tok = load_tokenizer(info.tokenizer_path, extra_ids)
    vocab = VocabInfo.from_tokenizer(tok)
    try:
        objective = objectives.get_objective(vocab=vocab)
        pad = pad_row(objective, tc.seq_len)  # validates seq_len against the noise settings
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if objective.model not in encoder_decoder.MODELS:
        raise ConfigError(f"pretrain_mlm trains encoder or encoder-decoder models; objective "
                          f"{objective.name!r} is for a {objective.model} model. Set "
                          "`get_objective.name` to 'bert_mlm' or 'span_corruption' (or run "
                          "`python -m experiments.pretrain_ntp`).")
    cfg = dataclasses.replace(cfg, vocab_size=tok.vocab_size)
    module = encoder_decoder.MODELS[objective.model]
    graphdef, abstract_params, logical_axes = transformer.abstract(cfg, module)
    model = ModelSpec(
        graphdef, abstract_params, logical_axes,
        init=lambda k: transformer.init(cfg, k, module)[1],
        loss_fn=LOSSES[objective.model](graphdef, tc.z_loss),
        num_params=encoder_decoder.num_params(abstract_params),
        flops_per_row=encoder_decoder.flops_per_row(cfg, objective.model, tc.seq_len,
                                                    len(pad["targets"])))

    baseline = unigram_baseline(info, vocab) if objective.model == "encoder" else {}

    def summarize_eval(sums: dict) -> dict:
        tokens = max(sums["tokens"], 1.0)
        out = {"loss": sums["nll"] / tokens, "perplexity": math.exp(min(sums["nll"] / tokens,
                                                                         700.0)),
               "accuracy": sums["correct"] / tokens, "tokens": sums["tokens"]}
        if objective.model == "encoder":
            out.update(masked_token_accuracy=out["accuracy"], masked_tokens=sums["tokens"],
                       masked_fraction=sums["tokens"] / max(sums["row_tokens"], 1.0),
                       **baseline)
        else:
            out.update(denoising_loss=out["loss"], spans=sums["spans"],
                       exact_span_accuracy=sums["spans_exact"] / max(sums["spans"], 1.0))
        return out

    run = train_and_evaluate(name="pretrain_mlm", run_dir=run_dir, data_dir=data_dir, info=info,
                             tc=tc, model=model, objective=objective,
                             summarize_eval=summarize_eval)
    if run.status == "preempted":
        return {"status": run.status, "step": int(run.state.step)}
    result = run.eval
    if jax.process_index() != 0:
        return result
    if objective.model == "encoder":
        print(f"pretrain_mlm: validation masked-token loss {result['loss']:.4f}, accuracy "
              f"{result['accuracy']:.4f} on {int(result['tokens'])} masked tokens (unigram "
              f"baseline: accuracy {result['unigram_accuracy']:.4f}, loss "
              f"{result['unigram_loss']:.4f})")
    else:
        print(f"pretrain_mlm: validation denoising loss {result['loss']:.4f}, token accuracy "
              f"{result['accuracy']:.4f}, exact-span accuracy "
              f"{result['exact_span_accuracy']:.4f} over {int(result['spans'])} spans")
    if demo_tokens and jax.process_count() == 1:
        row = next(iter(make_dataset(data_dir, "validation", seq_len=tc.seq_len,
                                     global_batch_size=1, seed=tc.seed, objective=objective,
                                     shuffle=False, num_streams=1)))
        row = {k: v[0] for k, v in row.items()}
        demo = demo_bert if objective.model == "encoder" else demo_span
        params = jax.device_get(run.params)
        print("pretrain_mlm: demo\n" + "-" * 60 + "\n" +
              demo(tok, vocab, graphdef, params, row, demo_tokens) + "\n" + "-" * 60)
    return result


def main(argv: list[str] | None = None) -> int:
    """The command line: exit code 0, or 2 with one line on stderr for a bad setting or bad
    data (`experiment.USER_ERRORS`)."""
    try:
        experiment.parse_command_line("pretrain_mlm", __doc__.split("\n\n")[0], argv)
        pretrain_mlm()
    except experiment.USER_ERRORS as e:
        return experiment.report_error("pretrain_mlm", e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
