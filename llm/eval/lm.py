"""`LanguageModel`: a run directory's model behind lm-evaluation-harness's three request types.

    lm = LanguageModel.from_run_dir("runs/quickstart", batch_size=8)
    lm.loglikelihood([("The capital of France is", " Paris")])  # [(logprob, is_greedy)]
    lm.loglikelihood_rolling(["a whole document ..."])          # [logprob of every token]
    lm.generate_until([("Q: 2+2=\\nA:", {"until": ["\\n"], "max_gen_toks": 8})])  # [text]

Semantics follow lm-eval 0.4 (`lm_eval.api.model.LM`, `HFLM`):
- `loglikelihood`: trailing whitespace of the context moves to the continuation; the pair is
  tokenized whole and the continuation is what follows the context's tokens. The model reads
  BOS (= PAD_ID, the token every training document starts with, `objectives.shift_right`) +
  context + continuation[:-1] and the continuation's log-probabilities are summed. is_greedy:
  every continuation token is the argmax.
- `loglikelihood_rolling`: the text is cut into disjoint windows of `max_length` predicted tokens
  (lm-eval's `get_rolling_token_windows` with context_len=1 + `make_disjoint_window`): every
  token is scored exactly once, the first window is conditioned on BOS and the last one keeps a
  full `max_length` context.
- `generate_until`: greedy (temperature 0) or sampled continuation, cut at the first stop string.

Batch invariance (lm-eval's scores drift with the batch size; ours do not): a request's row is
padded to a fixed length that depends only on its own length (a power-of-two bucket, capped at
max_length), every call of a bucket has the same [batch_size, bucket] shape (short batches are
filled with dummy rows), and nothing reduces across rows, so a request's numbers are bitwise the
same at any batch size and in any order (tests/eval/test_lm.py, fp32 on CPU). Sums over a
continuation are taken on the host in float64 over the fp32 token log-probabilities.

Sharding: with a mesh, params stay where `load_run` put them (the training rules) and the batch is
split along `batch` by the same rules, as in the training step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from llm.data.objectives import EOS_ID, PAD_ID
from llm.data.sources import DataError
from llm.model import transformer
from llm.parallel.rules import (
    Rules,
    activation_sharding,
    constrain,
    logical_to_spec,
    named_sharding,
)
from llm.runs import LoadedRun, load_run
from llm.serve.sampler import init_caches

BOS_ID = PAD_ID  # position 0 of every training document reads PAD_ID (shift_right's BOS)
MIN_BUCKET = 16


class PromptTooLong(DataError):
    """A request does not fit the model's context (and truncation was not asked for)."""


def bucket_length(n: int, max_length: int) -> int:
    """Padded length of a row of n tokens: the next power of two >= MIN_BUCKET, capped at
    max_length. Depends on n only, never on the other rows of a batch."""
    b = MIN_BUCKET
    while b < n:
        b *= 2
    return min(b, max_length) if n <= max_length else n


def rolling_windows(tokens: Sequence[int], max_length: int, prefix_token: int = BOS_ID
                    ) -> list[tuple[list[int], list[int]]]:
    """Disjoint scoring windows (context, targets) covering `tokens`, each scored target exactly
    once; len(context) + len(targets) - 1 <= max_length tokens are read per window.

    The first window reads [prefix_token] + tokens[:max_length-1]; each later window predicts the
    next up-to-max_length tokens, and the last, shorter one reads the max_length tokens before its
    last target (lm-eval's get_rolling_token_windows(context_len=1) + make_disjoint_window).
    """
    tokens = list(tokens)
    out: list[tuple[list[int], list[int]]] = []
    if not tokens:
        return out
    first = min(max_length, len(tokens))
    out.append(([prefix_token], tokens[:first]))
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, max_length)
        end = done + n
        window = tokens[max(end - max_length - 1, 0): end - 1]  # what the model reads
        # the model reads window; the targets are its last n positions shifted by one
        out.append((window[: len(window) - (n - 1)], tokens[end - n: end]))
        done = end
    return out


def _score_fn(graphdef: nnx.GraphDef, micro_rows: int, mesh: Mesh | None, rules: Rules | None,
              param_shardings) -> Callable:
    """jit of (params, inputs [B, L], targets [B, L]) -> (token logprob [B, L] fp32,
    is_argmax [B, L] bool), B a multiple of `micro_rows` * data shards.

    The rows are computed `micro_rows` per data shard at a time under `lax.map`, so the arithmetic
    applied to a row is one fixed program of shape [micro_rows, L] whatever B is: XLA picks matmul
    kernels by shape, and a [1, 16] call would otherwise round differently from a [7, 16] one."""

    def score(params, inputs, targets):
        logits = transformer.apply(graphdef, params, inputs).astype(jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        greedy = jnp.argmax(logits, axis=-1) == targets
        return target_logit - lse, greedy

    def mapped(params, inputs, targets):
        batch, length = inputs.shape
        step = micro_rows * _shards(mesh, rules)
        chunks = (inputs.reshape(batch // step, step, length),
                  targets.reshape(batch // step, step, length))

        def one(chunk):
            x, y = chunk
            if mesh is not None:
                x = constrain(x, ("batch", "length"))
                y = constrain(y, ("batch", "length"))
            return score(params, x, y)

        logprob, greedy = jax.lax.map(one, chunks)
        return logprob.reshape(batch, length), greedy.reshape(batch, length)

    if mesh is None:
        return jax.jit(mapped)
    batch = named_sharding(("batch", "length"), mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())

    def traced(params, inputs, targets):
        with activation_sharding(mesh, rules):
            return mapped(params, inputs, targets)

    return jax.jit(traced, in_shardings=(param_shardings, batch, batch),
                   out_shardings=(replicated, replicated))


def _shards(mesh: Mesh | None, rules: Rules | None) -> int:
    """How many ways the rules split the `batch` axis on `mesh`."""
    if mesh is None:
        return 1
    spec = logical_to_spec(("batch",), rules or (), mesh)
    axes = spec[0] if len(spec) else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return int(np.prod([mesh.shape[a] for a in axes])) if axes else 1


def _decode_fn(graphdef: nnx.GraphDef, cache_graphdef, max_new_tokens: int, temperature: float
               ) -> Callable:
    """jit of (params, cache_state, prompts [B, P], lengths [B], keys [B, 2] uint32) -> new
    tokens [B, max_new_tokens]. Row b's tokens depend on its own prompt and key only: each step
    samples row b with fold_in(key_b, step)."""

    def forward(params, cache_state, tokens, positions, cache_lengths):
        model = nnx.merge(graphdef, params)
        caches = nnx.merge(cache_graphdef, cache_state)
        logits = model(tokens, positions=positions, caches=list(caches),
                       cache_lengths=cache_lengths)
        return logits, nnx.state(caches)

    def pick(logits, keys, step):
        if temperature == 0.0:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)

        def one(row, key):
            k = jax.random.fold_in(jax.random.wrap_key_data(key), step)
            return jax.random.categorical(k, row / temperature).astype(jnp.int32)

        return jax.vmap(one)(logits, keys)

    def run(params, cache_state, prompts, lengths, keys):
        batch, prompt_len = prompts.shape
        positions = jnp.broadcast_to(jnp.arange(prompt_len), prompts.shape)
        logits, cache_state = forward(params, cache_state, prompts, positions,
                                      jnp.zeros((batch,), jnp.int32))
        last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
        out = jnp.full((batch, max_new_tokens), PAD_ID, jnp.int32)

        def body(i, carry):
            out, last, cache_state, lengths = carry
            tok = pick(last, keys, i)
            out = out.at[:, i].set(tok)
            logits, cache_state = forward(params, cache_state, tok[:, None], lengths[:, None],
                                          lengths)
            return out, logits[:, 0], cache_state, lengths + 1

        out, *_ = jax.lax.fori_loop(0, max_new_tokens, body, (out, last, cache_state, lengths))
        return out

    return jax.jit(run)


class LanguageModel:
    """A decoder-only run scored with lm-eval semantics (see the module docstring).

    batch_size: requests per jitted call (any value gives the same numbers).
    micro_rows: rows per data shard that one forward pass computes (the fixed compute shape
      [micro_rows, bucket], see `_score_fn`); larger is faster on accelerators. Numbers are
      bitwise reproducible for a fixed micro_rows, whatever the batch size and order.
    max_length: tokens the model reads per row; default the run's training seq_len.
    truncate: what to do with a request longer than max_length -- False (default) raises
      PromptTooLong naming it; True drops the oldest context tokens, as lm-eval does.
    """

    def __init__(self, run: LoadedRun, *, batch_size: int = 8, max_length: int | None = None,
                 mesh: Mesh | None = None, rules: Rules | None = None, truncate: bool = False,
                 micro_rows: int = 4, progress: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1.")
        self.run = run
        self.tokenizer = run.tokenizer
        self.batch_size = int(batch_size)
        self.max_length = int(max_length or run.seq_len)
        if run.cfg.position == "learned" and self.max_length > run.cfg.max_seq_len:
            raise ValueError(f"max_length={self.max_length} exceeds the learned position table "
                             f"(ModelConfig.max_seq_len={run.cfg.max_seq_len}).")
        self.truncate = truncate
        self.progress = progress
        self.mesh, self.rules = mesh, rules
        self.micro_rows = int(micro_rows)
        self._step = self.micro_rows * _shards(mesh, rules)
        param_shardings = (None if mesh is None else
                           jax.tree.map(lambda x: x.sharding, run.params))
        self._score = _score_fn(run.graphdef, self.micro_rows, mesh, rules, param_shardings)
        self._decoders: dict = {}

    @classmethod
    def from_run_dir(cls, run_dir: str, *, step: int | None = None, mesh: Mesh | None = None,
                     rules: Rules | None = None, **kwargs) -> LanguageModel:
        """Load `run_dir` (latest checkpoint, or `step`) and wrap it; kwargs as __init__."""
        return cls(load_run(run_dir, step=step, mesh=mesh, rules=rules), mesh=mesh, rules=rules,
                   **kwargs)

    # ---------------------------------------------------------------- tokenization
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's `_encode_pair`: trailing spaces of the context join the continuation; the
        continuation's tokens are those of context+continuation after the context's (its own
        tokens when that leaves none, see below)."""
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        if len(whole) <= len(ctx) and continuation:
            # A BPE whose merges cross the boundary (byte-level BPE: "))" + "))") can leave no
            # tokens after the context's count; lm-eval would score nothing. Score the
            # continuation's own tokens after the context's instead.
            return ctx, self.encode(continuation)
        return ctx, whole[len(ctx):]

    # ---------------------------------------------------------------- scoring core
    def _rows_per_call(self) -> int:
        return -(-self.batch_size // self._step) * self._step

    def score_sequences(self, rows: Sequence[tuple[list[int], int]], desc: str = "scoring"
                        ) -> list[np.ndarray]:
        """rows: (seq, n) with seq = tokens read + the last target, n = how many final targets to
        score. Returns each row's n target log-probabilities (fp32) and greedy flags, as an array
        [n, 2] (logprob, is_argmax). len(seq) - 1 must be <= max_length."""
        out: list[np.ndarray | None] = [None] * len(rows)
        by_bucket: dict[int, list[int]] = {}
        for i, (seq, n) in enumerate(rows):
            length = len(seq) - 1
            if length > self.max_length or not 1 <= n <= length:
                raise ValueError(f"row {i}: {length} input tokens, {n} scored (max_length "
                                 f"{self.max_length}).")
            by_bucket.setdefault(bucket_length(length, self.max_length), []).append(i)
        per_call = self._rows_per_call()
        calls = [(b, idx[s: s + per_call]) for b, idx in sorted(by_bucket.items())
                 for s in range(0, len(idx), per_call)]
        for bucket, idx in tqdm(calls, desc=desc, disable=not self.progress or len(calls) < 2,
                                unit="batch"):
            inputs = np.full((per_call, bucket), PAD_ID, np.int32)
            targets = np.full((per_call, bucket), PAD_ID, np.int32)
            for r, i in enumerate(idx):
                seq = rows[i][0]
                inputs[r, : len(seq) - 1] = seq[:-1]
                targets[r, : len(seq) - 1] = seq[1:]
            logprob, greedy = jax.device_get(self._score(self.run.params, inputs, targets))
            for r, i in enumerate(idx):
                seq, n = rows[i]
                end = len(seq) - 1
                out[i] = np.stack([logprob[r, end - n: end].astype(np.float64),
                                   greedy[r, end - n: end].astype(np.float64)], axis=-1)
        return out  # type: ignore[return-value]

    # ---------------------------------------------------------------- lm-eval's three methods
    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """(context, continuation) -> (sum log p(continuation | context), continuation is the
        greedy decode). Natural-log, summed over the continuation's tokens."""
        rows = []
        for i, (context, continuation) in enumerate(requests):
            ctx, cont = self.encode_pair(context, continuation)
            if not cont:
                raise DataError(f"request {i}: the continuation {continuation!r} is empty after "
                                "tokenization; a loglikelihood needs at least one token.")
            rows.append(self._fit([BOS_ID, *ctx, *cont], len(cont), i))
        scored = self.score_sequences(rows, desc="loglikelihood")
        return [(float(s[:, 0].sum()), bool(s[:, 1].all())) for s in scored]

    def _fit(self, seq: list[int], n: int, index: int) -> tuple[list[int], int]:
        if len(seq) - 1 <= self.max_length:
            return seq, n
        if n > self.max_length or not self.truncate:
            raise PromptTooLong(
                f"request {index}: {len(seq) - 1} tokens ({n} scored) exceed the model's context "
                f"of {self.max_length} tokens; shorten the prompt or fewer few-shot examples"
                + ("" if n > self.max_length else " (or truncate=True to drop the oldest tokens)")
                + ".")
        return seq[-(self.max_length + 1):], n

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
        """Sum of log p over every token of each text (see `rolling_windows`)."""
        rows, owner = [], []
        for i, text in enumerate(texts):
            for ctx, targets in rolling_windows(self.encode(text), self.max_length):
                rows.append(([*ctx, *targets], len(targets)))
                owner.append(i)
        scored = self.score_sequences(rows, desc="loglikelihood_rolling")
        totals = [0.0] * len(texts)
        for i, s in zip(owner, scored):
            totals[i] += float(s[:, 0].sum())
        return totals

    def generate_until(self, requests: Sequence[tuple[str, dict]]) -> list[str]:
        """(context, gen_kwargs) -> generated text, cut before the first stop string.

        gen_kwargs (lm-eval names): until (str or list), max_gen_toks (default 256; `max_tokens`
        is accepted too), temperature (0 = greedy, default), do_sample (False forces greedy),
        seed (default 0; with the same seed a request's sample does not depend on the batch),
        truncate (default: the model's `truncate`) keeps the newest prompt tokens that fit.
        """
        groups: dict[tuple[int, float], list[int]] = {}
        prompts: list[list[int]] = []
        stops: list[list[str]] = []
        keys: list[np.ndarray] = []
        for i, (context, kwargs) in enumerate(requests):
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", kwargs.pop("max_tokens", 256)))
            temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
            if kwargs.pop("do_sample", True) is False:
                temperature = 0.0
            seed = int(kwargs.pop("seed", 0))
            truncate = bool(kwargs.pop("truncate", self.truncate))
            prompt = [BOS_ID, *self.encode(context)]
            if len(prompt) + max_new > self.max_length:
                if not truncate or max_new >= self.max_length:
                    raise PromptTooLong(
                        f"request {i}: {len(prompt)} prompt tokens + {max_new} new tokens exceed "
                        f"the model's context of {self.max_length} tokens; shorten the prompt or "
                        "lower max_gen_toks.")
                prompt = prompt[-(self.max_length - max_new):]
            prompts.append(prompt)
            stops.append(until)
            keys.append(np.asarray(jax.random.key_data(jax.random.key(seed))))
            groups.setdefault((max_new, temperature), []).append(i)
        out: list[str] = [""] * len(requests)
        per_call = self._step  # one fixed decode shape, whatever batch_size is
        for (max_new, temperature), idx in groups.items():
            by_bucket: dict[int, list[int]] = {}
            for i in idx:
                by_bucket.setdefault(bucket_length(len(prompts[i]), self.max_length), []
                                     ).append(i)
            calls = [(b, ids[s: s + per_call]) for b, ids in sorted(by_bucket.items())
                     for s in range(0, len(ids), per_call)]
            for bucket, ids in tqdm(calls, desc="generate_until", unit="batch",
                                    disable=not self.progress or len(calls) < 2):
                tokens = self._decode(bucket, max_new, temperature, ids, prompts, keys)
                for r, i in enumerate(ids):
                    row = tokens[r].tolist()
                    if EOS_ID in row:
                        row = row[: row.index(EOS_ID)]
                    text = self.tokenizer.decode(row)
                    for s in stops[i]:
                        if s:
                            text = text.split(s)[0]
                    out[i] = text
        return out

    def _decode(self, bucket: int, max_new: int, temperature: float, ids: list[int],
                prompts: list[list[int]], keys: list[np.ndarray]) -> np.ndarray:
        per_call = self._step
        padded = np.full((per_call, bucket), PAD_ID, np.int32)
        lengths = np.ones((per_call,), np.int32)
        key_data = np.zeros((per_call, *keys[0].shape), keys[0].dtype)
        for r, i in enumerate(ids):
            padded[r, : len(prompts[i])] = prompts[i]
            lengths[r] = len(prompts[i])
            key_data[r] = keys[i]
        cache_graphdef, cache_state = init_caches(self.run.cfg, per_call, bucket + max_new)
        fn = self._decoders.get((max_new, temperature, bucket))
        if fn is None:
            fn = _decode_fn(self.run.graphdef, cache_graphdef, max_new, temperature)
            self._decoders[(max_new, temperature, bucket)] = fn
        return np.asarray(fn(self.run.params, cache_state, padded, lengths, key_data))


@functools.lru_cache(maxsize=4)
def cached_model(run_dir: str, step: int | None = None, batch_size: int = 8) -> LanguageModel:
    """One LanguageModel per (run, step, batch size) per process (tests, notebooks)."""
    return LanguageModel.from_run_dir(run_dir, step=step, batch_size=batch_size, progress=False)
