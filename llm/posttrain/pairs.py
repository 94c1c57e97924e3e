"""Preference pairs: the chosen/rejected JSONL format, its token rows, and pairs built by sampling
a policy and ranking the samples by a task reward.

One pair per line (TRL's "explicit prompt" preference format; `prompt` may be omitted, then
chosen/rejected are whole texts)::

    {"prompt": ">>> 12 + 30\\n", "chosen": "42\\n", "rejected": "4\\n"}

Any other keys (rewards, reviewer, item id) are kept in `Pair.meta`. The human-review export
(`python -m tools.review pairs`) and `TaskPairs.build` (<run_dir>/pairs/) write this format; the
reward model (`experiments.reward`) and DPO (`experiments.rlhf`, algorithm "dpo") read it.

A pair becomes two token rows of `seq_len` tokens, laid out as in pretraining:

    [BOS] prompt tokens, response tokens [EOS] PAD ...     (BOS = PAD_ID, as in pretraining)

with the prompt and the response tokenized separately (so a sampled response keeps the tokens the
policy produced), the prompt cut from the left and the response from the right when a row is too
long.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Sequence

import gin
import numpy as np

from llm.config import ConfigError
from llm.data.objectives import EOS_ID, PAD_ID
from llm.data.sources import DataError
from llm.posttrain import tasks


@dataclasses.dataclass(frozen=True)
class Pair:
    """prompt: shared context ("" when the texts are complete). chosen / rejected: the preferred
    and the dispreferred continuation. meta: the line's other fields."""

    prompt: str
    chosen: str
    rejected: str
    meta: dict = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict:
        return {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected,
                **self.meta}


def read_pairs(path: str) -> list[Pair]:
    """The pairs of a JSONL file. DataError (one line, naming file:line) for a missing file, a
    line that is not a JSON object, a missing or non-string `chosen` / `rejected` / `prompt`."""
    if not os.path.isfile(path):
        raise DataError(f"preference file {path!r} does not exist; export human ratings with "
                        "`python -m tools.review pairs`, or leave the setting empty to sample "
                        "pairs from the base run (TaskPairs.*).")
    pairs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno} is not valid JSON ({e.msg}).") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno} is a JSON {type(row).__name__}, not an object "
                                "with 'chosen' and 'rejected'.")
            for key in ("chosen", "rejected"):
                if key not in row:
                    raise DataError(f"{path}:{lineno} has no {key!r} field; a preference line "
                                    "needs 'chosen' and 'rejected' strings (and optionally "
                                    "'prompt').")
            for key in ("prompt", "chosen", "rejected"):
                if key in row and not isinstance(row[key], str):
                    raise DataError(f"{path}:{lineno}: {key!r} is a "
                                    f"{type(row[key]).__name__}, not a string (conversational "
                                    "message lists must be rendered to text first).")
            meta = {k: v for k, v in row.items() if k not in ("prompt", "chosen", "rejected")}
            pairs.append(Pair(row.get("prompt", ""), row["chosen"], row["rejected"], meta))
    if not pairs:
        raise DataError(f"preference file {path!r} holds no pairs.")
    return pairs


def write_pairs(pairs: Sequence[Pair], path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for p in pairs:
            f.write(json.dumps(p.to_json()) + "\n")
    return path


def layout_row(prompt_ids: Sequence[int], response_ids: Sequence[int], seq_len: int
               ) -> tuple[np.ndarray, np.ndarray, int, bool]:
    """One row: (tokens [seq_len] int32, response mask [seq_len] fp32 (1 on response tokens and
    the EOS), index of the EOS, whether anything was cut)."""
    budget = seq_len - 2  # BOS and EOS
    response = list(response_ids)[:budget]
    keep = budget - len(response)
    prompt = list(prompt_ids)[-keep:] if keep > 0 else []
    cut = len(response) < len(response_ids) or len(prompt) < len(prompt_ids)
    ids = [PAD_ID, *prompt, *response, EOS_ID]
    tokens = np.full(seq_len, PAD_ID, np.int32)
    tokens[:len(ids)] = ids
    mask = np.zeros(seq_len, np.float32)
    mask[1 + len(prompt):len(ids)] = 1.0
    return tokens, mask, len(ids) - 1, cut


def encode_pairs(tokenizer, pairs: Sequence[Pair], seq_len: int) -> tuple[dict[str, np.ndarray],
                                                                          int]:
    """Token rows of n pairs and the number of pairs that were cut to fit. Fields, each
    [n, seq_len]: `chosen` / `rejected` int32 token ids; `chosen_mask` / `rejected_mask` fp32,
    1 on response tokens and the EOS (DPO's log-probability mask); `chosen_last` /
    `rejected_last` fp32, one-hot at the EOS (where the reward model reads its score)."""
    n = len(pairs)
    out = {k: np.zeros((n, seq_len), np.int32 if k in ("chosen", "rejected") else np.float32)
           for k in ("chosen", "rejected", "chosen_mask", "rejected_mask", "chosen_last",
                     "rejected_last")}
    cut_pairs = 0
    for i, p in enumerate(pairs):
        prompt = tokenizer.encode(p.prompt) if p.prompt else []
        cut_any = False
        for side, text in (("chosen", p.chosen), ("rejected", p.rejected)):
            tokens, mask, last, cut = layout_row(prompt, tokenizer.encode(text), seq_len)
            out[side][i], out[f"{side}_mask"][i] = tokens, mask
            out[f"{side}_last"][i, last] = 1.0
            cut_any |= cut
        cut_pairs += cut_any
    return out, cut_pairs


def pad_to_multiple(rows: dict[str, np.ndarray], multiple: int) -> dict[str, np.ndarray]:
    """Append all-zero pairs (masks 0: they weigh nothing in any loss or count) up to a multiple
    of `multiple` rows."""
    n = next(iter(rows.values())).shape[0]
    extra = -n % multiple
    if not extra:
        return rows
    return {k: np.concatenate([v, np.zeros((extra, *v.shape[1:]), v.dtype)])
            for k, v in rows.items()}


def wilson_interval(successes: float, n: float, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval (95% by default) of a proportion successes / n."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(centre - half), float(centre + half)


def split_heldout(pairs: Sequence[Pair], fraction: float) -> tuple[list[Pair], list[Pair]]:
    """(train, heldout) by a sha256 of each pair's prompt: every pair of one prompt lands on the
    same side, so held-out prompts are unseen in training."""
    train, heldout = [], []
    for p in pairs:
        h = int.from_bytes(hashlib.sha256(p.prompt.encode()).digest()[:8], "big") / 2.0 ** 64
        (heldout if h < fraction else train).append(p)
    return train, heldout


def pair_dataset(rows: dict[str, np.ndarray], batch: int, seed: int):
    """Endless shuffled batches of pair rows: a grain dataset, whose iterator position is
    checkpointed with the model (`llm.train.checkpoint`), so a resumed run sees the same
    batches."""
    import grain

    n = next(iter(rows.values())).shape[0]
    records = [{k: v[i] for k, v in rows.items()} for i in range(n)]
    ds = grain.MapDataset.source(records).shuffle(seed=seed).repeat(None)
    return ds.batch(batch, drop_remainder=True)


# ----------------------------------------------------------------- pairs from sampled completions

PROMPT_FORMATS = ("raw", "chat")  # and "auto" in TaskPairs: chat for an SFT base run


def format_prompt(prompt: str, prompt_format: str) -> str:
    """The text the policy is given for a task prompt: the prompt itself ("raw", a pretrained
    model), or a one-turn user message rendered with the chat template ("chat", an SFT model;
    `llm.serve.chat_template`)."""
    if prompt_format == "raw":
        return prompt
    if prompt_format == "chat":
        from llm.serve.chat_template import render_chat

        return render_chat([{"role": "user", "content": prompt}])
    raise ConfigError(f"prompt format {prompt_format!r} is not one of "
                      f"{', '.join(map(repr, PROMPT_FORMATS))}.")


def cut_completion(text: str, prompt_format: str) -> str:
    """A chat completion ends where the model opens the next turn (`CHAT_STOP`); the newline the
    template puts after a turn's content is dropped. Raw completions are kept whole."""
    if prompt_format != "chat":
        return text
    from llm.serve.chat_template import CHAT_STOP

    ends = [text.find(tag) for tag in CHAT_STOP if tag in text]
    return text[:min(ends)].removesuffix("\n") if ends else text


def sample_completions(graphdef, params, cfg, tokenizer, prompts: Sequence[str], *,
                       samples: int, max_new_tokens: int, temperature: float, seed: int,
                       batch_size: int = 64, max_prompt_len: int = 256, top_p: float = 1.0,
                       prompt_format: str = "raw", progress: bool = True) -> list[list[str]]:
    """`samples` completions per task prompt (decoded, cut before EOS and by `cut_completion`)
    from the KV-cache sampler (`llm.posttrain.rollout`), in fixed-shape batches (one
    compilation). Each policy input is [BOS] + the formatted prompt, as the training rows."""
    import jax
    from tqdm import tqdm

    from llm.posttrain.rollout import rollout

    encoded = [tokenizer.encode(format_prompt(p, prompt_format)) for p in prompts]
    flat = [(i, encoded[i]) for i in range(len(prompts)) for _ in range(samples)]
    out: list[list[str]] = [[] for _ in prompts]
    key = jax.random.key(seed)
    for start in tqdm(range(0, len(flat), batch_size), desc="sample", unit="batch",
                      disable=not progress):
        chunk = flat[start:start + batch_size]
        ids = [[PAD_ID, *p] for _, p in chunk]
        ids += [[PAD_ID]] * (batch_size - len(ids))  # fixed batch shape
        key, sub = jax.random.split(key)
        ro = rollout(graphdef, params, cfg, ids, max_prompt_len=max_prompt_len,
                     max_new_tokens=max_new_tokens, rng=sub, temperature=temperature,
                     top_p=top_p)
        for (i, _), resp in zip(chunk, ro.responses):
            out[i].append(cut_completion(tokenizer.decode(resp), prompt_format))
    return out


def rank_into_pairs(prompts: Sequence[str], completions: Sequence[Sequence[str]],
                    rewards: Sequence[Sequence[float]], ids: Sequence[str] | None = None
                    ) -> list[Pair]:
    """Per prompt: chosen = the highest-reward completion, rejected = the lowest (first of equals
    in sample order); prompts whose samples all score the same give no pair."""
    pairs = []
    for k, (prompt, comps, rs) in enumerate(zip(prompts, completions, rewards)):
        rs = list(rs)
        hi, lo = int(np.argmax(rs)), int(np.argmin(rs))
        if rs[hi] == rs[lo]:
            continue
        meta = {"chosen_reward": float(rs[hi]), "rejected_reward": float(rs[lo])}
        if ids is not None:
            meta["id"] = ids[k]
        pairs.append(Pair(prompt, comps[hi], comps[lo], meta))
    return pairs


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TaskPairs:
    """Preference pairs from a policy's own samples ranked by a task reward (gin: TaskPairs.*).

    task / reward: a task of `llm.posttrain.tasks.TASKS` and a reward name ("" = the task's
    default). train_prompts / heldout_prompts: prompts drawn from the task's train / heldout
    split. samples: completions per prompt (chosen = best, rejected = worst; ties give no pair).
    prompt_format: "raw" (a pretrained model), "chat" (an SFT model, `format_prompt`) or "auto"
      (chat when the base run's objective is "sft"; `resolved_format`).
    max_new_tokens, temperature, top_p, batch_size, max_prompt_len: the sampler's.
    """

    task: str = "code"
    reward: str = ""
    train_prompts: int = 256
    heldout_prompts: int = 64
    samples: int = 4
    prompt_format: str = "auto"
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 64
    max_prompt_len: int = 256
    seed: int = 0

    def __post_init__(self):
        tasks.default_reward(self.task)  # ConfigError for an unknown task
        if self.reward:
            tasks.get_reward(self.reward)
        if self.prompt_format not in (*PROMPT_FORMATS, "auto"):
            raise ConfigError(f"TaskPairs.prompt_format={self.prompt_format!r} is not one of "
                              f"{', '.join(map(repr, (*PROMPT_FORMATS, 'auto')))}.")
        for field in ("train_prompts", "heldout_prompts", "max_new_tokens", "batch_size"):
            if getattr(self, field) < 1:
                raise ConfigError(f"TaskPairs.{field}={getattr(self, field)} must be >= 1.")
        if self.samples < 2:
            raise ConfigError(f"TaskPairs.samples={self.samples} must be >= 2 to rank samples.")

    def resolved_format(self, base_manifest: dict) -> str:
        """"chat" or "raw": "auto" is chat for an SFT base run (its manifest's objective)."""
        if self.prompt_format != "auto":
            return self.prompt_format
        return "chat" if base_manifest.get("objective") == "sft" else "raw"

    @property
    def reward_name(self) -> str:
        return self.reward or tasks.default_reward(self.task)

    def examples(self, split: str, round_index: int = 0):
        """The task examples of a split; round r > 0 of iterative DPO draws the next
        `train_prompts` train problems (fresh prompts each round, as online DPO)."""
        if split != "train":
            return tasks.make_examples(self.task, split, self.heldout_prompts, seed=self.seed)
        if round_index == 0:
            return tasks.make_examples(self.task, split, self.train_prompts, seed=self.seed)
        pool = tasks.make_examples(self.task, split, None, seed=self.seed)
        start = (round_index * self.train_prompts) % len(pool)
        return [pool[(start + i) % len(pool)] for i in range(self.train_prompts)]

    def build_round(self, graphdef, params, cfg, tokenizer, out_dir: str, round_index: int
                    ) -> dict:
        """Round `round_index` (>= 1) of iterative DPO: train pairs from `params` (the policy as
        the previous round left it) on fresh train prompts, sampled with this config's
        temperature and `samples`, written to <out_dir>/train.jsonl with stats.json (reused when
        both exist, so a resumed run trains on the same pairs). Returns the stats."""
        path, stats_path = (os.path.join(out_dir, n) for n in ("train.jsonl", "stats.json"))
        if os.path.isfile(path) and os.path.isfile(stats_path):
            with open(stats_path) as f:
                return json.load(f)
        pairs, st = task_pairs(graphdef, params, cfg, tokenizer,
                               self.examples("train", round_index), self.reward_name,
                               samples=self.samples, max_new_tokens=self.max_new_tokens,
                               temperature=self.temperature, top_p=self.top_p,
                               seed=self.seed * 2 + 1000 * round_index,
                               batch_size=self.batch_size, max_prompt_len=self.max_prompt_len,
                               prompt_format=self.prompt_format)
        if not pairs:
            raise DataError(f"TaskPairs: in DPO round {round_index} every train prompt's "
                            f"{self.samples} samples got the same {self.reward_name!r} reward, "
                            "so there are no pairs; raise TaskPairs.samples or "
                            "TaskPairs.temperature, or lower DPOConfig.rounds.")
        write_pairs(pairs, path)
        stats = {"round": round_index, "train": st}
        with open(stats_path, "w") as f:
            json.dump(stats, f, indent=2)
        return stats

    def build(self, graphdef, params, cfg, tokenizer, out_dir: str) -> dict:
        """Write <out_dir>/train.jsonl and heldout.jsonl (reused when both exist, so a resumed
        run trains on the same pairs) and stats.json; returns the stats (mean sample reward,
        prompts and pairs per split)."""
        paths = {s: os.path.join(out_dir, f"{s}.jsonl") for s in ("train", "heldout")}
        stats_path = os.path.join(out_dir, "stats.json")
        if all(os.path.isfile(p) for p in [*paths.values(), stats_path]):
            with open(stats_path) as f:
                return json.load(f)
        stats = {"task": self.task, "reward": self.reward_name, **dataclasses.asdict(self)}
        for k, split in enumerate(("train", "heldout")):
            pairs, st = task_pairs(graphdef, params, cfg, tokenizer, self.examples(split),
                                   self.reward_name, samples=self.samples,
                                   max_new_tokens=self.max_new_tokens,
                                   temperature=self.temperature, top_p=self.top_p,
                                   seed=self.seed * 2 + k, batch_size=self.batch_size,
                                   max_prompt_len=self.max_prompt_len,
                                   prompt_format=self.prompt_format)
            if not pairs:
                raise DataError(f"TaskPairs: every {split} prompt's {self.samples} samples got "
                                f"the same {self.reward_name!r} reward, so there are no pairs; "
                                "raise TaskPairs.samples or TaskPairs.temperature.")
            write_pairs(pairs, paths[split])
            stats[split] = st
        os.makedirs(out_dir, exist_ok=True)
        with open(stats_path, "w") as f:
            json.dump(stats, f, indent=2)
        return stats


def task_pairs(graphdef, params, cfg, tokenizer, examples, reward: str | Callable, *,
               samples: int = 4, max_new_tokens: int = 64, temperature: float = 1.0,
               top_p: float = 1.0, seed: int = 0, batch_size: int = 64,
               max_prompt_len: int = 256, prompt_format: str = "raw"
               ) -> tuple[list[Pair], dict]:
    """Sample `samples` completions per task example, score them with the task reward
    (`tasks.score`: a failing reward is a RewardError naming it and the sample), and rank them
    into pairs whose prompt is the policy's (formatted) prompt. Returns (pairs, stats: mean
    reward of the samples, prompts, pairs)."""
    from llm.posttrain import tasks

    comps = sample_completions(graphdef, params, cfg, tokenizer, [e.prompt for e in examples],
                               samples=samples, max_new_tokens=max_new_tokens,
                               temperature=temperature, top_p=top_p, seed=seed,
                               batch_size=batch_size, max_prompt_len=max_prompt_len,
                               prompt_format=prompt_format)
    rewards = [tasks.score(reward, [e.prompt] * len(c), c, [e.reference] * len(c)).tolist()
               for e, c in zip(examples, comps)]
    # A chat turn ends with "\n" and then EOS (or the next role tag): the training row of a
    # response is the text the policy produced, turn end included.
    texts = [[c + "\n" for c in cs] for cs in comps] if prompt_format == "chat" else comps
    pairs = rank_into_pairs([format_prompt(e.prompt, prompt_format) for e in examples], texts,
                            rewards, [e.id for e in examples])
    stats = {"mean_sample_reward": float(np.mean(rewards)), "prompts": len(examples),
             "pairs": len(pairs),
             "mean_reward_gap": float(np.mean([p.meta["chosen_reward"] - p.meta["rejected_reward"]
                                               for p in pairs])) if pairs else 0.0}
    return pairs, stats


def mean_task_reward(graphdef, params, cfg, tokenizer, examples, reward: str | Callable, *,
                     samples: int = 1, max_new_tokens: int = 64, temperature: float = 1.0,
                     top_p: float = 1.0, seed: int = 0, batch_size: int = 64,
                     max_prompt_len: int = 256, prompt_format: str = "raw") -> dict:
    """A policy's task score: mean reward (and its standard error over prompts) of `samples`
    completions per example, and `per_prompt` (np.ndarray [examples]: each prompt's mean, for
    paired comparisons)."""
    from llm.posttrain import tasks

    comps = sample_completions(graphdef, params, cfg, tokenizer, [e.prompt for e in examples],
                               samples=samples, max_new_tokens=max_new_tokens,
                               temperature=temperature, top_p=top_p, seed=seed,
                               batch_size=batch_size, max_prompt_len=max_prompt_len,
                               prompt_format=prompt_format)
    per_prompt = np.array([tasks.score(reward, [e.prompt] * len(c), c,
                                       [e.reference] * len(c)).mean()
                           for e, c in zip(examples, comps)])
    return {"mean_reward": float(per_prompt.mean()),
            "stderr": float(per_prompt.std(ddof=1) / np.sqrt(len(per_prompt)))
            if len(per_prompt) > 1 else 0.0,
            "prompts": len(examples), "samples": samples, "per_prompt": per_prompt}
