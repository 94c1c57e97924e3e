"""A continuous-batching inference engine: fixed decode slots, chunked prefill, per-request
sampling.

    engine = Engine(graphdef, params, cfg, tokenizer, EngineConfig(slots=8))
    [completion] = engine.generate([tokenizer.encode("def f(x):")], SamplingParams(max_tokens=32))

Layout. The KV cache is one `KVCache` per layer of shape [slots, cache_len, kv_heads, head_dim]:
one contiguous row per decode slot (not paged; docs/serving.md gives the reason). A request owns a
slot from admission to its last token; the slot is free again in the same engine step the request
finishes or is cancelled.

One engine `step()`:
  1. admit waiting requests into free slots (FIFO);
  2. prefill: up to `prefill_chunks_per_step` calls (as many as it takes when no slot is
     decoding), each a jitted call over a [rows, chunk] batch: the next chunk (at most
     `chunk_size` prompt tokens) of up to `prefill_rows` waiting prompts, one row each, written
     into their slots' cache rows [start, start + chunk); on a prompt's last chunk the call also
     samples its first token. Chunk lengths are padded up to a power of two
     (`EngineConfig.chunk_buckets`) and row counts too (`EngineConfig.row_buckets`), so prompts
     of any length and number compile nothing new. While some slot decodes, a call holds at most
     `chunk_size` padded tokens (rows x chunk), so admission never stalls decoding for longer
     than one full chunk;
  3. decode: one jitted call advances every slot by `decode_steps` tokens (a lax.scan; slots
     without a request compute on padding and their results are dropped). It is dispatched
     before the previous decode call's tokens are read back: a slot that was in that call
     continues from its last token on device, and the host checks the previous call's stop
     conditions token by token (dropping what follows a stop), streams its text and prepares
     the next inputs while the device computes. A request certain to reach max_tokens or the
     context within the call in flight is not decoded again; one that stops early (EOS, a stop
     string) costs one dropped call row. The call reads only the first `kv_len` cache rows, the
     smallest of `Engine.kv_buckets` (16, 24, 32, 48, 64, 96, ..., cache_len) at or above
     every slot's length plus `decode_steps`, so short sequences do not pay attention over the
     whole context on the XLA path.
A prefill call holds only prompts' first chunks ("fresh": attention over the chunk alone, no
cache read) or only later chunks (each row reads its slot's cache row; always padded to
`chunk_size`). Every program has a variant with logprobs and one without (used when no request
in the call asked for them), so the number of compiled programs is at most
2 x (len(row_buckets) x (len(chunk_buckets) + 1) + len(kv_buckets)), whatever the traffic
(`Engine.max_compiled_shapes()`; tested). `Engine.warmup()` compiles all of them before serving,
`Engine.warm_in_background()` while serving whenever no request runs, and with
`configure_compilation_cache` they are compiled once per machine and loaded from disk afterwards.

Sampling runs on device, per slot, from per-slot parameter arrays: temperature (0 = greedy), then
top-k, then top-p on the renormalised top-k distribution, then min-p relative to the most likely
token. The random key of a request's i-th token is fold_in(key(seed), i), so a seeded request draws
the same tokens whichever slot it lands in and whatever else is running. Logprobs are those of the
model's own distribution (log_softmax of the fp32 logits, before temperature and filtering), the
numbers an evaluator computes; the top `MAX_TOP_LOGPROBS` alternatives of every position come back
with them, computed only in calls where some request asked for logprobs.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llm.data.objectives import EOS_ID, PAD_ID
from llm.model.config import ModelConfig
from llm.parallel.rules import activation_sharding
from llm.serve.sampler import init_caches

log = logging.getLogger(__name__)

BOS_ID = PAD_ID  # position 0 of every training document reads PAD_ID (objectives.shift_right)

MAX_TOP_LOGPROBS = 20  # alternatives computed per position (OpenAI's chat limit is 20)


# ---------------------------------------------------------------------------- requests

@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request is continued (OpenAI / vLLM semantics).

    temperature 0 is greedy. top_k 0 and top_p 1 and min_p 0 disable those filters.
    seed None draws a fresh seed per request. stop: strings that end the completion (not included
    in the text); stop_token_ids: ids that end it (EOS always does unless ignore_eos).
    logprobs: None for none, else the number (0..MAX_TOP_LOGPROBS) of top alternatives returned
    beside each generated token's logprob. echo: also return the prompt's per-token logprobs.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    echo: bool = False

    def validate(self) -> None:
        """ValueError naming the field for any value out of range."""
        checks = [
            (self.max_tokens >= 0, f"max_tokens must be >= 0, got {self.max_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0 (0 = off), got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.logprobs is None or 0 <= self.logprobs <= MAX_TOP_LOGPROBS,
             f"logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {self.logprobs}"),
            (all(isinstance(s, str) and s for s in self.stop),
             "stop strings must be non-empty strings"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@dataclasses.dataclass
class TokenLogprob:
    """One position: the token, its logprob (None for a prompt's first token) and the top-n
    alternatives as (token id, logprob), most likely first."""

    token_id: int
    logprob: float | None
    top: list[tuple[int, float]]


@dataclasses.dataclass
class Request:
    """A request's state inside the engine; the engine thread owns every field but `cancelled`."""

    id: int
    prompt: list[int]
    params: SamplingParams
    tokens: list[int]       # what the model reads: BOS + prompt
    on_event: Callable[[Request, str], None] | None = None
    arrival: float = dataclasses.field(default_factory=time.monotonic)
    seed: int = 0
    slot: int | None = None
    prefilled: int = 0
    output: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    text: str = ""          # decoded output, cut at a stop string once finished
    emitted: int = 0        # characters of `text` already safe to stream (see `stream_text`)
    finish_reason: str | None = None
    first_token_time: float | None = None
    cancelled: bool = False
    done: threading.Event = dataclasses.field(default_factory=threading.Event)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


# ---------------------------------------------------------------------------- device functions

def _filter_threshold(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """[rows, vocab], [rows], [rows] -> [rows]: the smallest scaled logit that top-k then top-p
    keep (a sort of every row, the expensive part of sampling on CPU)."""
    ranked = -jnp.sort(-scaled, axis=-1)
    rank = jnp.arange(scaled.shape[-1])[None, :]
    keep = (top_k[:, None] <= 0) | (rank < top_k[:, None])
    probs = jax.nn.softmax(jnp.where(keep, ranked, -jnp.inf), axis=-1)
    keep &= (jnp.cumsum(probs, axis=-1) - probs) < top_p[:, None]  # the top token always stays
    last = jnp.sum(keep, axis=-1) - 1
    return jnp.take_along_axis(ranked, last[:, None], axis=-1)[:, 0]


def sample_tokens(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array,
                  top_p: jax.Array, min_p: jax.Array) -> jax.Array:
    """Per-row sampling. logits [rows, vocab] fp32; keys [rows] (typed PRNG keys); temperature,
    top_p, min_p [rows] fp32; top_k [rows] int32 (0 = off). Returns token ids [rows] int32.

    Temperature scales the logits, then top-k, then top-p over the renormalised top-k
    distribution, then min-p (keep tokens with p >= min_p * p_max); a row with temperature 0 takes
    the argmax. Filters become one threshold per row on the scaled logits (tokens tied with the
    last kept one stay too), and the draw is made in vocabulary order with the row's own key, so
    a row's token depends on nothing but its logits, parameters and key. The sort that top-k and
    top-p need runs only when some sampled row asks for them.
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw():
        scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
        needs_sort = jnp.any((temperature > 0) & ((top_k > 0) | (top_p < 1)))
        threshold = jax.lax.cond(needs_sort, _filter_threshold,
                                 lambda s, k, p: jnp.full(s.shape[:1], -jnp.inf, s.dtype),
                                 scaled, top_k, top_p)
        top = jnp.max(scaled, axis=-1, keepdims=True)
        keep = (scaled >= threshold[:, None]) & (scaled - top >= jnp.log(min_p)[:, None])
        masked = jnp.where(keep, scaled, -jnp.inf)
        sampled = jax.vmap(jax.random.categorical)(keys, masked).astype(jnp.int32)
        return jnp.where(temperature > 0, sampled, greedy)

    # An all-greedy batch skips the random draw altogether.
    return jax.lax.cond(jnp.any(temperature > 0), draw, lambda: greedy)


def _request_keys(seeds: jax.Array, counters: jax.Array) -> jax.Array:
    """seeds [rows] uint32, counters [rows] int32 -> keys [rows]: fold_in(key(seed), counter)."""
    return jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seeds, counters)


def _sample(logits: jax.Array, seeds: jax.Array, counters: jax.Array, temperature: jax.Array,
            top_k: jax.Array, top_p: jax.Array, min_p: jax.Array) -> jax.Array:
    """`sample_tokens` with the keys fold_in(key(seeds), counters) [rows]; an all-greedy batch
    takes the argmax without deriving any key (the per-row threefry hashes cost as much as a
    small model's step on CPU)."""
    return jax.lax.cond(
        jnp.any(temperature > 0),
        lambda: sample_tokens(logits, _request_keys(seeds, counters), temperature, top_k, top_p,
                              min_p),
        lambda: jnp.argmax(logits, axis=-1).astype(jnp.int32))


def _top_logprobs(logp: jax.Array) -> tuple[jax.Array, jax.Array]:
    """logp [..., vocab] -> (values, ids) [..., MAX_TOP_LOGPROBS], most likely first."""
    k = min(MAX_TOP_LOGPROBS, logp.shape[-1])
    values, ids = jax.lax.top_k(logp, k)
    return values, ids.astype(jnp.int32)


def _forward(graphdef, cache_graphdef, cache_treedef, params, cache, tokens, positions,
             cache_lengths, last=None):
    """Logits [rows, seq, vocab] (with `last` [rows]: only those positions', [rows, vocab]) and
    the new cache leaves."""
    # Merged inside each trace: nnx objects must not be mutated across trace levels. The cache
    # travels as a flat list of arrays (cheap to pass on every call), rebuilt into KVCaches here.
    model = nnx.merge(graphdef, params)
    caches = nnx.merge(cache_graphdef, jax.tree.unflatten(cache_treedef, cache))
    if last is None:
        logits = model(tokens, positions=positions, caches=list(caches),
                       cache_lengths=cache_lengths)
    else:  # the vocabulary projection of one position per row, not of the whole chunk
        hidden = model.features(tokens, positions=positions, caches=list(caches),
                                cache_lengths=cache_lengths)
        hidden = jnp.take_along_axis(hidden, last[:, None, None], axis=1)
        logits = model.logits(hidden)[:, 0]
    return logits, jax.tree.leaves(nnx.state(caches))


def _prefill_rows(graphdef, cache_graphdef, cache_treedef, params, cache, slots, tokens, targets,
                  starts, valid, sampling, *, fresh: bool, logprobs: bool):
    """Run one prompt chunk of each of `rows` slots through the model in one call, writing their
    cache rows.

    slots, starts, valid [rows] int32: row r holds prompt tokens [starts[r], starts[r] + valid[r])
    of slot slots[r] in tokens[r, :valid[r]], padding after. tokens, targets [rows, chunk] int32:
    targets[r, i] is the prompt token after tokens[r, i] (anything past the prompt). Padding rows
    (the row count is padded to a bucket) repeat row 0, so they write the very values row 0
    writes. fresh (static): every row is a prompt's first chunk (starts all 0), so nothing in the
    cache is read and attention runs over the chunk alone; otherwise each row reads its slot's
    whole cache row. sampling: (seeds, counters, temperature, top_k, top_p, min_p) [rows].
    Returns the new
    cache state and each row's first sampled token [rows] (meaningful on a prompt's last chunk);
    with `logprobs` (static) also its logprob [rows] and top alternatives [rows, MAX_TOP_LOGPROBS],
    and per position the target's logprob [rows, chunk] with the top alternatives
    [rows, chunk, MAX_TOP_LOGPROBS].
    """
    rows, chunk = tokens.shape
    window = chunk if fresh else cache[0].shape[1]
    gathered = [jnp.take(c[:, :window], slots, axis=0) for c in cache]  # [rows, window, ...]
    positions = starts[:, None] + jnp.arange(chunk)[None, :]
    logits, gathered = _forward(graphdef, cache_graphdef, cache_treedef, params, gathered, tokens,
                                positions, starts, last=None if logprobs else valid - 1)
    # Write back only the chunk's rows of each slot, with one scatter per cache array: an update
    # of whole slot rows (read from the same buffer) makes XLA copy the entire cache on every
    # call, and a loop of per-row updates costs one pass over the cache per row on XLA:CPU.
    # Padding rows repeat row 0, so duplicate indices carry identical values.
    cols = starts[:, None] + jnp.arange(chunk)[None, :]                # [rows, chunk]

    def write(c, g):
        new = jnp.take_along_axis(g, cols.reshape(cols.shape + (1,) * (g.ndim - 2)), axis=1)
        return c.at[slots[:, None], cols].set(new, mode="promise_in_bounds")

    cache = [write(c, g) for c, g in zip(cache, gathered)]
    seeds, counters, temperature, top_k, top_p, min_p = sampling
    if not logprobs:
        return cache, _sample(logits, seeds, counters, temperature, top_k, top_p, min_p)
    last = jnp.take_along_axis(logits, (valid - 1)[:, None, None], axis=1)[:, 0]  # [rows, vocab]
    token = _sample(last, seeds, counters, temperature, top_k, top_p, min_p)
    logp = jax.nn.log_softmax(logits, axis=-1)                       # [rows, chunk, vocab]
    target_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    top_values, top_ids = _top_logprobs(logp)
    last_logp = jnp.take_along_axis(logp, (valid - 1)[:, None, None], axis=1)[:, 0]
    chosen = jnp.take_along_axis(last_logp, token[:, None], axis=-1)[:, 0]
    return (cache, token, chosen, *_top_logprobs(last_logp), target_logp, top_values, top_ids)


def _decode_steps(graphdef, cache_graphdef, cache_treedef, params, cache, tokens, prev, use_prev,
                  lengths, live, sampling, *, kv_len: int, steps: int, logprobs: bool):
    """Advance every slot by `steps` tokens in one call (a lax.scan over single-token steps).

    tokens, lengths [slots] int32: the last token and the number of cached positions before it;
    prev [steps, slots] int32: the tokens of the previous decode call, still on device; a slot
    with use_prev [slots] = 1 continues from prev[-1] instead of `tokens` (the host has not read
    the previous call's tokens yet when it dispatches this one, see `Engine._decode`);
    live [slots] int32: 1 for a decoding slot, 0 for one whose results are dropped (its length
    stays put). sampling: per-slot (seeds, counters, temperature, top_k, top_p, min_p) [slots];
    step j of slot i uses the key fold_in(key(seeds[i]), counters[i] + j), the key a one-step
    call would use for that token. Returns (cache state, tokens [steps, slots]) and with
    `logprobs` (static) also their logprobs [steps, slots] and the top alternatives' logprobs and
    ids [steps, slots, MAX_TOP_LOGPROBS]. The host drops what follows a slot's stop.
    """
    # Attend over the first kv_len cache rows only (a bucket above every slot's last row).
    view = [c[:, :kv_len] for c in cache]
    seeds, counters, temperature, top_k, top_p, min_p = sampling
    tokens = jnp.where(use_prev > 0, prev[-1], tokens)

    def one(carry, j):
        view, tokens, lengths = carry
        logits, view = _forward(graphdef, cache_graphdef, cache_treedef, params, view,
                                tokens[:, None], lengths[:, None], lengths)
        logits = logits[:, 0]
        nxt = _sample(logits, seeds, counters + j, temperature, top_k, top_p, min_p)
        out = (nxt,)
        if logprobs:
            logp = jax.nn.log_softmax(logits, axis=-1)
            out += (jnp.take_along_axis(logp, nxt[:, None], axis=-1)[:, 0], *_top_logprobs(logp))
        return (view, nxt, lengths + live), out

    (view, _, _), out = jax.lax.scan(one, (view, tokens, lengths), jnp.arange(steps))
    cache = [jax.lax.dynamic_update_slice_in_dim(c, v, 0, axis=1) for c, v in zip(cache, view)]
    return (cache, *out)


# ---------------------------------------------------------------------------- compilation cache

_CACHE_EVENTS = {"/jax/compilation_cache/cache_hits": "hits",
                 "/jax/compilation_cache/cache_misses": "misses"}
compilation_cache_stats = {"hits": 0, "misses": 0}  # this process's persistent-cache lookups
_listening = False


def _count_cache_event(event: str, **kwargs) -> None:
    if event in _CACHE_EVENTS:
        compilation_cache_stats[_CACHE_EVENTS[event]] += 1


def default_compilation_cache() -> str:
    """Where compiled programs persist by default: $JAX_COMPILATION_CACHE_DIR when set, else
    $XDG_CACHE_HOME/llm/xla (~/.cache/llm/xla). A local directory; nothing is fetched."""
    env = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if env:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "llm", "xla")


def configure_compilation_cache(path: str | None) -> None:
    """Turn on JAX's persistent compilation cache in directory `path` (created if missing) for
    every program, however fast it compiled; None turns it off. Call before the first jit
    compile. A later process with the same model, engine config, devices and jax/XLA versions
    loads each program from disk instead of compiling it; the lookups are counted in
    `compilation_cache_stats`."""
    if path is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    global _listening
    if not _listening:
        jax.monitoring.register_event_listener(_count_cache_event)
        _listening = True


# ---------------------------------------------------------------------------- the engine

@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """slots: decode slots (the most requests decoding at once). max_context: longest prompt +
    completion, in tokens (default: the model's max_seq_len). chunk_size: most prompt tokens per
    prefill call, a power of two >= min_chunk. prefill_chunks_per_step: prefill calls between two
    decode steps while some slot is decoding (more admits new requests faster, fewer keeps
    inter-token latency low; with no slot decoding every waiting chunk is prefilled at once).
    decode_steps: tokens each decode call advances every slot by before returning to the host
    (stop conditions, streaming, admission and cancellation are handled between calls; tokens
    sampled past a stop are dropped). More amortises the host round trip and dispatch; fewer
    delivers streamed tokens in smaller bursts and admits new requests sooner.
    max_queue: waiting requests beyond which `submit` raises QueueFull. prefill_rows: most
    prompts prefilled together in one call (each its own next chunk, one row of a [rows, chunk]
    batch); while some slot is decoding a call is further held to rows x chunk <= chunk_size
    padded tokens, the cost of one full chunk, so admitting prompts never stalls decoding more
    than a single-prompt chunk did. kv_cache_dtype: "model" (the compute dtype) or "int8" (one
    scale per position and kv head; `llm.model.attention.KVCache`)."""

    slots: int = 8
    max_context: int | None = None
    chunk_size: int = 256
    min_chunk: int = 16
    prefill_chunks_per_step: int = 1
    decode_steps: int = 8
    max_queue: int = 256
    prefill_rows: int = 32
    kv_cache_dtype: str = "model"

    def chunk_buckets(self) -> tuple[int, ...]:
        """The padded chunk lengths: min_chunk, 2*min_chunk, ..., chunk_size."""
        sizes, c = [], self.min_chunk
        while c < self.chunk_size:
            sizes.append(c)
            c *= 2
        return (*sizes, self.chunk_size)

    def row_buckets(self) -> tuple[int, ...]:
        """The padded row counts of a prefill call: 1, 2, 4, ... up to min(prefill_rows, slots)."""
        most = min(self.prefill_rows, self.slots)
        return (*(b for b in (2**i for i in range(32)) if b < most), most)



class QueueFull(RuntimeError):
    """More than `EngineConfig.max_queue` requests are waiting."""


class Engine:
    """Continuous batching over a fixed set of slots. Thread model: `submit` / `cancel` may be
    called from any thread; `step` (or the loop of `start`) runs in one thread."""

    def __init__(self, graphdef: nnx.GraphDef, params: dict, cfg: ModelConfig, tokenizer,
                 config: EngineConfig = EngineConfig(), *, mesh=None, rules=None,
                 eos_id: int = EOS_ID, bos_id: int | None = BOS_ID):
        if config.chunk_size & (config.chunk_size - 1) or config.chunk_size < config.min_chunk:
            raise ValueError(f"EngineConfig.chunk_size={config.chunk_size} must be a power of two "
                             f">= min_chunk={config.min_chunk}.")
        if config.prefill_rows < 1:
            raise ValueError(f"EngineConfig.prefill_rows={config.prefill_rows} must be >= 1.")
        if config.decode_steps < 1:
            raise ValueError(f"EngineConfig.decode_steps={config.decode_steps} must be >= 1.")
        self.graphdef, self.params, self.cfg = graphdef, params, cfg
        self.tokenizer, self.config, self.eos_id, self.bos_id = tokenizer, config, eos_id, bos_id
        self.mesh, self.rules = mesh, rules
        self.max_context = config.max_context or cfg.max_seq_len
        if cfg.position == "learned" and self.max_context > cfg.max_seq_len:
            raise ValueError(f"EngineConfig.max_context={self.max_context} exceeds the learned "
                             f"position table (ModelConfig.max_seq_len={cfg.max_seq_len}).")
        # Headroom past the context: a padded last chunk writes (ignored) rows up to one chunk
        # beyond it, and a decode call up to decode_steps rows beyond a slot's last token.
        headroom = max(config.chunk_size, config.decode_steps + 1)
        cache_len = -(-(self.max_context + headroom) // 128) * 128
        cache_graphdef, cache_state = init_caches(cfg, config.slots, cache_len,
                                                  config.kv_cache_dtype)
        # Placed like the step outputs that replace it (replicated on the params' mesh), so the
        # first call compiles nothing that later calls do not reuse.
        param_sharding = jax.tree.leaves(params)[0].sharding
        if mesh is None and isinstance(param_sharding, jax.sharding.NamedSharding):
            mesh = param_sharding.mesh
        where = (jax.devices()[0] if mesh is None else
                 jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
        cache, cache_treedef = jax.tree.flatten(jax.device_put(cache_state, where))
        self.cache: list[jax.Array] = cache
        # Jitted per engine with the model structure bound (nothing hashed per call); the cache
        # (argument 1) is donated so it is updated in place.
        statics = (graphdef, cache_graphdef, cache_treedef)
        self._prefill_fn = jax.jit(functools.partial(_prefill_rows, *statics),
                                   donate_argnums=(1,), static_argnames=("fresh", "logprobs"))
        self._decode_fn = jax.jit(functools.partial(_decode_steps, *statics), donate_argnums=(1,),
                                  static_argnames=("kv_len", "steps", "logprobs"))
        # Attention reads (and on XLA:CPU copies) all kv_len rows, a large part of a small
        # model's decode step, so the buckets grow by 1.5x and 1.33x in turn, not 2x.
        self.kv_buckets = tuple(sorted(
            {b for i in range(32) for b in (16 << i, 24 << i) if b < cache_len})) + (cache_len,)
        self.slots: list[Request | None] = [None] * config.slots
        self.waiting: deque[Request] = deque()
        self.prefilling: deque[Request] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._ids = itertools.count()
        self._seed_rng = np.random.default_rng()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._token_text: dict[int, str] = {}
        self._inflight: dict | None = None  # the decode call dispatched and not yet read back
        # What a decode call reads as the previous call's tokens when there is none, placed like
        # the tokens a call returns.
        self._no_prev = jax.device_put(np.zeros((config.decode_steps, config.slots), np.int32),
                                       where)
        # Counters read by the server's /metrics.
        self.stats = {"prompt_tokens": 0, "generated_tokens": 0, "decode_steps": 0,
                      "prefill_chunks": 0, "prefill_calls": 0, "finished": 0,
                      "compile_steps": 0, "compile_seconds": 0.0, "warmed_programs": 0}
        self._warm_queue: collections.deque[tuple] = collections.deque()

    # ------------------------------------------------------------------ public API

    def submit(self, prompt: Sequence[int], params: SamplingParams,
               on_event: Callable[[Request, str], None] | None = None) -> Request:
        """Queue a request. on_event(request, kind) is called from the engine thread with kind
        "token" after each new token and "finished" once (then request.done is set).
        Raises ValueError for a bad prompt or parameters, QueueFull when the queue is full."""
        params.validate()
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("the prompt is empty: it needs at least one token")
        if any(not 0 <= t < self.cfg.vocab_size for t in prompt):
            raise ValueError(f"prompt token ids must be in [0, {self.cfg.vocab_size})")
        # Positions read: BOS + prompt + all but the last new token (BOS + prompt if none).
        if len(prompt) + max(params.max_tokens, 1) > self.max_context:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) "
                             f"= {len(prompt) + params.max_tokens} exceeds the context of "
                             f"{self.max_context} tokens")
        seed = params.seed if params.seed is not None else int(self._seed_rng.integers(2**32))
        req = Request(next(self._ids), prompt, params, on_event=on_event, seed=seed % 2**32,
                      tokens=prompt if self.bos_id is None else [self.bos_id, *prompt])
        with self._lock:
            if len(self.waiting) >= self.config.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting "
                                f"(EngineConfig.max_queue={self.config.max_queue})")
            self.waiting.append(req)
            self._wake.notify()
        return req

    def cancel(self, req: Request) -> None:
        """Stop a request (client gone); its slot is freed at the next step."""
        req.cancelled = True
        with self._lock:
            self._wake.notify()

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams
                 ) -> list[Request]:
        """Submit every prompt and step until all finish (no background thread needed)."""
        reqs = [self.submit(p, params) for p in prompts]
        if self._thread is not None:
            for r in reqs:
                r.done.wait()
        else:
            while not all(r.finished for r in reqs):
                self.step()
        return reqs

    def start(self) -> None:
        """Run the engine loop in a daemon thread."""
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def queue_depth(self) -> int:
        return len(self.waiting)

    def active_slots(self) -> int:
        return sum(r is not None for r in self.slots)

    def idle(self) -> bool:
        return not self.waiting and self.active_slots() == 0

    def compiled_shapes(self) -> int:
        """Programs compiled (or loaded from the persistent cache) so far by this engine: one per
        (row bucket, chunk bucket, logprobs) for first-chunk prefills, one per (row bucket,
        logprobs) for later-chunk prefills (padded to `chunk_size`) and one per (kv bucket,
        logprobs) for decode, logprobs being whether the call computes logprobs (only when some
        request in it asked for them). At most `max_compiled_shapes()`."""
        return self._prefill_fn._cache_size() + self._decode_fn._cache_size()

    def max_compiled_shapes(self) -> int:
        """The bound on `compiled_shapes()`, whatever the traffic: 2 (logprobs or not) x
        (len(row_buckets) x len(chunk_buckets) first-chunk prefills + len(row_buckets)
        later-chunk prefills (always `chunk_size` long) + len(kv_buckets) decodes)."""
        c = self.config
        rows = len(c.row_buckets())
        return 2 * (rows * len(c.chunk_buckets()) + rows + len(self.kv_buckets))

    def warmup_calls(self) -> list[tuple]:
        """Every program traffic can meet, as (kind, rows, size, fresh, logprobs): a prefill at
        every (row bucket, chunk bucket) for first chunks and for later chunks of long prompts,
        and the decode call at every kv bucket, each with and without logprobs --
        `max_compiled_shapes()` of them."""
        c, n = self.config, len(self.slots)
        calls = [("prefill", rows, chunk, True, lp) for rows in c.row_buckets()
                 for chunk in c.chunk_buckets() for lp in (False, True)]
        calls += [("prefill", rows, c.chunk_size, False, lp) for rows in c.row_buckets()
                  for lp in (False, True)]
        calls += [("decode", n, kv_len, None, lp) for kv_len in self.kv_buckets
                  for lp in (False, True)]
        return calls

    def _warm(self, call: tuple) -> None:
        """Run one program of `warmup_calls()` on dummy inputs (compiling it, or loading it from
        the persistent cache). Only while no request is in the engine: it writes cache rows that
        no request owns."""
        kind, rows, size, fresh, lp = call
        row = (np.uint32(0), np.int32(0), np.float32(0), np.int32(0), np.float32(1),
               np.float32(0))
        sampling = tuple(np.array(col) for col in zip(*[row] * rows))
        zeros = np.zeros((rows,), np.int32)
        with self._sharding():
            if kind == "prefill":
                tokens = np.full((rows, size), PAD_ID, np.int32)
                out = self._prefill_fn(self.params, self.cache, zeros, tokens,
                                       np.zeros_like(tokens), zeros, zeros + 1, sampling,
                                       fresh=fresh, logprobs=lp)
            else:
                out = self._decode_fn(self.params, self.cache, zeros, self._no_prev, zeros,
                                      zeros + size - 1, zeros, sampling, kv_len=size,
                                      steps=self.config.decode_steps, logprobs=lp)
            self.cache = out[0]
            jax.block_until_ready(self.cache)
        self.stats["warmed_programs"] += 1

    def warmup(self, progress: bool = False) -> int:
        """Compile, before serving, every program of `warmup_calls()`, so no request waits on a
        compile (seconds on CPU) in the middle of a load. With JAX's persistent compilation
        cache configured (`configure_compilation_cache`) the programs are compiled once per
        machine and loaded from disk on later starts. Call it before start(); `progress` shows a
        tqdm bar. Returns the number of programs it added to the jit caches. (The server's
        default instead warms in the background: `warm_in_background`.)"""
        if not self.idle() or self._inflight is not None or self._thread is not None:
            raise RuntimeError("Engine.warmup() needs an idle engine (call it before start()).")
        before, calls = self.compiled_shapes(), self.warmup_calls()
        if progress:
            from tqdm import tqdm

            calls = tqdm(calls, desc="warm-up (compile or load from cache)", unit="program")
        for call in calls:
            self._warm(call)
        return self.compiled_shapes() - before

    def warm_in_background(self) -> int:
        """Queue every program of `warmup_calls()` for the engine thread, which runs them one at
        a time whenever no request is in the engine: serving starts at once, a request that
        arrives meanwhile waits for at most the one program being compiled, and programs it needs
        that are not yet warm compile inside it (as without warm-up). Progress:
        `stats["warmed_programs"]` of the returned count. Call before start()."""
        with self._lock:
            self._warm_queue.extend(self.warmup_calls())
            return len(self._warm_queue)

    def warm_pending(self) -> int:
        """Programs queued by `warm_in_background` and not yet run."""
        return len(self._warm_queue)

    def token_text(self, token_id: int) -> str:
        """The text of one token on its own (byte pieces of a split character give U+FFFD)."""
        text = self._token_text.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id]) if token_id != self.eos_id else ""
            self._token_text[token_id] = text
        return text

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stop and self.idle() and not (
                        self._warm_queue and self._inflight is None):
                    self._wake.wait()
                if self._stop:
                    return
                warm = (self._warm_queue.popleft() if self.idle() and self._inflight is None
                        and self._warm_queue else None)
            if warm is not None:  # background warm-up: one program while no request waits
                try:
                    self._warm(warm)
                except Exception:
                    log.exception("warm-up of %s failed; it will compile on first use", warm)
                continue
            try:
                self.step()
            except Exception:  # a failed step must not leave clients waiting forever
                log.exception("engine step failed; failing the running requests")
                self._inflight = None
                for r in [*self.slots, *self.waiting]:
                    if r is not None and not r.finished:
                        self._finish(r, "error")
                with self._lock:
                    self.waiting.clear()

    def step(self) -> None:
        """Admit, prefill one budget of chunks, dispatch the next decode call, then read back and
        process the previous one (so the device computes while the host checks stops, streams
        text and prepares the next inputs)."""
        compiled, start = self.compiled_shapes(), time.perf_counter()
        self._step()
        if self.compiled_shapes() > compiled:  # a bucket met for the first time: compiled here
            self.stats["compile_steps"] += 1
            self.stats["compile_seconds"] += time.perf_counter() - start

    def _step(self) -> None:
        self._drop_cancelled()
        with self._lock:
            for i in range(len(self.slots)):
                if self.slots[i] is None and self.waiting:
                    req = self.waiting.popleft()
                    req.slot = i
                    self.slots[i] = req
                    self.prefilling.append(req)
        with self._sharding():
            # Prefill a budget of calls; with no slot decoding nobody waits on the prefill, so
            # every admitted prompt is prefilled now (a burst of arrivals starts decoding together).
            calls, burst, pending = 0, not self._decoding(), []
            while self.prefilling and (calls < self.config.prefill_chunks_per_step or burst):
                pending.extend(self._prefill(self._prefill_batch(burst)))
                calls += 1
            if pending:
                self._read_prefills(pending)
            previous = self._inflight
            self._inflight = self._decode() if self._decodable() else None
            if previous is not None:
                self._read_decode(previous)

    def _decoding(self) -> bool:
        return any(r is not None and r.prefilled == len(r.tokens) and not r.finished
                   for r in self.slots)

    def _in_flight(self, req: Request) -> int:
        """Tokens of `req` sampled by the decode call in flight and not yet read back."""
        flight = self._inflight
        if flight is None or flight.get("slots", {}).get(req.slot) is not req:
            return 0
        return flight["steps"]

    def _decodable(self) -> list[int]:
        """Slots whose request needs more tokens than it has plus those in flight: decoding, not
        finished, and not certain to reach max_tokens or the context within the call in flight
        (those are not decoded again; their slot frees when that call is read back)."""
        out = []
        for i, r in enumerate(self.slots):
            if r is None or r.prefilled < len(r.tokens) or r.finished:
                continue
            have = len(r.output) + self._in_flight(r)
            if have < r.params.max_tokens and len(r.tokens) + have <= self.max_context:
                out.append(i)
        return out

    def _sharding(self):
        if self.mesh is None:
            return contextlib.nullcontext()
        return activation_sharding(self.mesh, self.rules)

    def _drop_cancelled(self) -> None:
        with self._lock:
            for r in [r for r in self.waiting if r.cancelled]:
                self.waiting.remove(r)
                self._finish(r, "cancelled")
        for r in self.slots:
            if r is not None and r.cancelled and not r.finished:
                self._finish(r, "cancelled")

    def _sampling_row(self, req: Request, ahead: int = 0) -> tuple:
        """(seed, counter, temperature, top_k, top_p, min_p) of `req`'s next token; the counter
        (the token's index in the completion) counts `ahead` tokens not read back yet."""
        p = req.params
        return (np.uint32(req.seed), np.int32(len(req.output) + ahead), np.float32(p.temperature),
                np.int32(p.top_k), np.float32(p.top_p), np.float32(p.min_p))

    def _prefill_batch(self, burst: bool) -> list[Request]:
        """The prompts of the next prefill call, in FIFO order: up to `prefill_rows`, all first
        chunks or all later chunks (`_prefill_rows`'s `fresh`), and while some slot is decoding
        (not `burst`) only as many as keep rows x chunk bucket within `chunk_size` padded tokens
        (always at least one)."""
        c = self.config
        batch, longest = [], 0
        for req in self.prefilling:
            if len(batch) == c.row_buckets()[-1]:
                break
            valid = min(c.chunk_size, len(req.tokens) - req.prefilled)
            rows = next(b for b in c.row_buckets() if b >= len(batch) + 1)
            size = self._chunk_bucket(max(longest, valid), fresh=req.prefilled == 0)
            if batch and ((req.prefilled == 0) != (batch[0].prefilled == 0) or
                          (not burst and rows * size > c.chunk_size)):
                break
            batch.append(req)
            longest = max(longest, valid)
        return batch

    def _chunk_bucket(self, tokens: int, fresh: bool) -> int:
        """The padded length of a prefill call's chunks: the smallest chunk bucket holding
        `tokens` for first chunks; always `chunk_size` for later chunks of long prompts (only
        their last chunk is shorter, so one shape serves them all)."""
        if not fresh:
            return self.config.chunk_size
        return next(b for b in self.config.chunk_buckets() if b >= tokens)

    def _prefill(self, batch: list[Request]) -> list[tuple]:
        """Dispatch the next prompt chunk of every request in `batch` as one call; returns, per
        row that has something to read back (a last chunk's first token, echoed prompt
        logprobs), what `_read_prefills` needs."""
        c = self.config
        valid = [min(c.chunk_size, len(r.tokens) - r.prefilled) for r in batch]
        size = self._chunk_bucket(max(valid), fresh=batch[0].prefilled == 0)
        rows = next(b for b in c.row_buckets() if b >= len(batch))
        tokens = np.full((rows, size), PAD_ID, np.int32)
        targets = np.zeros((rows, size), np.int32)
        starts = np.zeros((rows,), np.int32)
        nexts = []
        for i, (req, n) in enumerate(zip(batch, valid)):
            start = req.prefilled
            tokens[i, :n] = req.tokens[start:start + n]
            nxt = req.tokens[start + 1:start + n + 1]
            targets[i, :len(nxt)] = nxt
            starts[i] = start
            nexts.append(nxt)
        # Padding rows repeat row 0 (same slot, same rows written with the same values).
        tokens[len(batch):], targets[len(batch):], starts[len(batch):] = (
            tokens[0], targets[0], starts[0])
        slot_ids = np.array([r.slot for r in batch] + [batch[0].slot] * (rows - len(batch)),
                            np.int32)
        valids = np.array(valid + [valid[0]] * (rows - len(batch)), np.int32)
        sampling = [self._sampling_row(r) for r in batch]
        sampling += [sampling[0]] * (rows - len(batch))
        sampling = tuple(np.array(col) for col in zip(*sampling))
        want = any(r.params.logprobs is not None for r in batch)
        out = self._prefill_fn(self.params, self.cache, slot_ids, tokens, targets, starts, valids,
                               sampling, fresh=bool(starts.max() == 0), logprobs=want)
        self.cache = out[0]
        self.stats["prefill_chunks"] += len(batch)
        self.stats["prefill_calls"] += 1
        pending, results = [], out[1:]
        for i, (req, n) in enumerate(zip(batch, valid)):
            start = req.prefilled
            req.prefilled = start + n
            last = req.prefilled == len(req.tokens)
            if last:
                self.prefilling.remove(req)
            if last or (req.params.logprobs is not None and req.params.echo):
                pending.append((req, start, nexts[i], last, i, results))
        return pending

    def _read_prefills(self, pending: list) -> None:
        """Read back the results of a run of prefill calls with one transfer (the calls were
        dispatched without waiting), then record prompt logprobs and first tokens in order."""
        outs = {id(p[-1]): p[-1] for p in pending}
        got = dict(zip(outs, jax.device_get(list(outs.values()))))
        for req, start, nxt, last, row, out in pending:
            self._prefill_done(req, start, nxt, last, tuple(x[row] for x in got[id(out)]),
                               want=len(out) > 1)

    def _prefill_done(self, req: Request, start: int, nxt: list[int], last: bool,
                      got: tuple, want: bool) -> None:
        """Record one row of a prefill call; `want`: the call computed logprobs."""
        if want:
            token, logprob, top_v, top_i, target_logp, prompt_top_v, prompt_top_i = got
        else:
            (token,), logprob, top_v, top_i = got, None, None, None
        if req.params.logprobs is None:
            logprob, top_v, top_i = None, None, None
        if req.params.echo and req.params.logprobs is not None:
            k = req.params.logprobs
            if start == 0 and self.bos_id is None:
                req.prompt_logprobs.append(TokenLogprob(req.prompt[0], None, []))
            for i in range(len(nxt)):
                req.prompt_logprobs.append(TokenLogprob(
                    nxt[i], float(target_logp[i]),
                    list(zip(prompt_top_i[i, :k].tolist(), prompt_top_v[i, :k].tolist()))))
        if not last or req.finished:
            return
        self.stats["prompt_tokens"] += len(req.prompt)
        if req.params.max_tokens == 0:
            self._finish(req, "length")
            return
        self._append(req, int(token), None if logprob is None else float(logprob), top_v, top_i)
        self._update_text(req)

    def _decode(self) -> dict:
        """Dispatch one decode call over every decodable slot without waiting for it. A slot that
        was in the call still in flight continues from that call's last token on device (its
        length and key counter advanced by the call's steps); the results are read back by
        `_read_decode` after the next call is dispatched. Returns the in-flight record."""
        slots, steps = len(self.slots), self.config.decode_steps
        live = self._decodable()
        tokens = np.zeros((slots,), np.int32)
        use_prev = np.zeros((slots,), np.int32)
        # The call reads and writes cache rows [0, kv_len): the smallest bucket above every row a
        # live slot writes in its `steps` tokens (its last token's row + steps - 1) and above
        # every occupied slot's rows. Slots not decoding (free, or mid-prefill) keep writing
        # their dummy token into row kv_len - 1, past all of those.
        used = max(len(r.tokens) + len(r.output) + self._in_flight(r)
                   for r in self.slots if r is not None)
        kv_len = next(b for b in self.kv_buckets if b >= used + steps)
        lengths = np.full((slots,), kv_len - 1, np.int32)
        live_mask = np.zeros((slots,), np.int32)
        rows = [(np.uint32(0), np.int32(0), np.float32(0), np.int32(0), np.float32(1),
                 np.float32(0))] * slots
        previous = self._inflight
        for i in live:
            r = self.slots[i]
            ahead = self._in_flight(r)
            if ahead:
                use_prev[i] = 1
            else:
                tokens[i] = r.output[-1]
            lengths[i] = len(r.tokens) + len(r.output) + ahead - 1
            live_mask[i] = 1
            rows[i] = self._sampling_row(r, ahead)
        want = any(self.slots[i].params.logprobs is not None for i in live)
        sampling = tuple(np.array(col) for col in zip(*rows))
        prev = previous["out"][1] if previous is not None else self._no_prev
        out = self._decode_fn(self.params, self.cache, tokens, prev, use_prev, lengths,
                              live_mask, sampling, kv_len=kv_len, steps=steps, logprobs=want)
        self.cache = out[0]
        self.stats["decode_steps"] += steps
        return {"out": out, "slots": {i: self.slots[i] for i in live}, "steps": steps,
                "want": want}

    def _read_decode(self, flight: dict) -> None:
        """Read back a decode call's tokens (and logprobs) and record them, stop by stop; the
        rows of requests that finished meanwhile (a stop read from the call before, a cancel)
        are dropped."""
        out = flight["out"]
        if flight["want"]:
            nxt, chosen, top_v, top_i = jax.device_get(out[1:])
        else:
            nxt, chosen, top_v, top_i = np.asarray(out[1]), None, None, None
        for i, req in flight["slots"].items():
            for j in range(flight["steps"]):
                if req.finished:
                    break  # tokens past a stop are dropped
                if req.params.logprobs is None:
                    self._append(req, int(nxt[j, i]), None, None, None)
                else:
                    self._append(req, int(nxt[j, i]), float(chosen[j, i]), top_v[j, i],
                                 top_i[j, i])
            if not req.finished:
                self._update_text(req)

    def _append(self, req: Request, token: int, logprob: float | None, top_v, top_i) -> None:
        """Record a sampled token and check the stop conditions; the text is brought up to date
        here only when a stop string must be searched (else once per decode call, by
        `_update_text`), and a request that stops is finished (its slot freed) at once."""
        p = req.params
        if req.first_token_time is None:
            req.first_token_time = time.monotonic()
        req.output.append(token)
        self.stats["generated_tokens"] += 1
        if p.logprobs is not None:
            req.logprobs.append(TokenLogprob(token, logprob, list(
                zip(top_i[:p.logprobs].tolist(), top_v[:p.logprobs].tolist()))))
        stop_token = (token == self.eos_id and not p.ignore_eos) or token in p.stop_token_ids
        reason = "stop" if stop_token else None
        if p.stop or stop_token:
            req.text = self._decode_text(req, drop_last=stop_token)
        if p.stop:
            hits = [at for at in (req.text.find(s) for s in p.stop) if at >= 0]
            if hits:
                req.text, reason = req.text[:min(hits)], "stop"
        if reason is None and (len(req.output) >= p.max_tokens or
                               len(req.tokens) + len(req.output) > self.max_context):
            req.text, reason = self._decode_text(req), "length"
        if reason is not None:
            self._finish(req, reason)
        elif req.on_event is not None and p.stop:
            self._update_text(req, decoded=True)

    def _decode_text(self, req: Request, drop_last: bool = False) -> str:
        ids = req.output[:-1] if drop_last else req.output
        if req.params.ignore_eos:  # the tokenizer's decode stops at the first EOS
            ids = [t for t in ids if t != self.eos_id]
        return self.tokenizer.decode(ids)

    def _update_text(self, req: Request, decoded: bool = False) -> None:
        """Bring an unfinished request's text up to date and announce its new tokens: stream only
        text that cannot become part of a stop string or an unfinished character."""
        if req.finished:
            return
        if not decoded:
            req.text = self._decode_text(req)
        text = req.text
        hold = max((len(s) - 1 for s in req.params.stop), default=0)
        safe = len(text) - hold
        while safe > req.emitted and text[safe - 1] == "\ufffd":
            safe -= 1
        req.emitted = max(req.emitted, safe)
        if req.on_event is not None:
            req.on_event(req, "token")

    def _finish(self, req: Request, reason: str) -> None:
        req.finish_reason = reason
        req.emitted = len(req.text)
        if req.slot is not None and self.slots[req.slot] is req:
            self.slots[req.slot] = None
        if req in self.prefilling:
            self.prefilling.remove(req)
        self.stats["finished"] += 1
        if req.on_event is not None:
            req.on_event(req, "finished")
        req.done.set()


def from_run_dir(run_dir: str, config: EngineConfig = EngineConfig(), *, step: int | None = None,
                 mesh=None, rules=None) -> Engine:
    """An engine over the checkpoint of `run_dir` (the latest step unless `step`), loaded by
    `llm.runs.load_run` (sharded on `mesh` with `rules` when given)."""
    from llm.runs import load_run

    run = load_run(run_dir, step=step, mesh=mesh, rules=rules)
    engine = Engine(run.graphdef, run.params, run.cfg, run.tokenizer, config, mesh=mesh,
                    rules=rules)
    engine.run = run
    return engine
