"""Chat data for supervised fine-tuning: JSONL conversations -> packed rows with prompt masking.

Input: JSONL files, one conversation per line, in either form

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}, ...]}
    {"prompt": "...", "response": "...", "system": "..."}       # system optional

Each conversation is rendered with the serving chat template (`llm.serve.chat_template`; the role
tags are single special tokens) and tokenized piece by piece:

    <|user|> enc("\\n" + content + "\\n")                          loss 0
    <|assistant|> enc("\\n")                                      loss 0  (the generation prompt)
                  enc(content + "\\n")                             loss 1  (the response)
    <next tag> or EOS                                           loss 1  (the model learns to stop)

so the prompt a server sends (`render_chat(..., add_generation_prompt=True)` encoded whole) is
token for token what the model saw before each response. Multi-turn conversations supervise every
assistant turn. Rows are the pretraining batch fields (`llm.data.objectives`): inputs (per-segment
shift right of targets), targets, loss_mask (1 on response tokens only), segment_ids (1, 2, ...
per conversation, 0 = padding) and positions (restarting at 0 per conversation), each
[batch, seq_len]. Conversations are packed whole with grain's first-fit packer (a conversation is
never split across rows, so a response always sees its prompt); one longer than a row is cut at
`seq_len` tokens and counted (`ChatStats.truncated`).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
from collections.abc import Sequence

import grain
import numpy as np

from llm.config import ConfigError
from llm.data.objectives import EOS_ID, shift_right
from llm.data.pipeline import _PadBatchesIterDataset
from llm.data.sources import DataError
from llm.data.tokenizer import Tokenizer
from llm.serve.chat_template import ROLE_TAGS, ROLES, check_message


@dataclasses.dataclass(frozen=True)
class Conversation:
    """messages: [{"role", "content"}, ...] (checked); source: "file:line" it came from."""

    messages: tuple[dict, ...]
    source: str


def parse_record(record: object, source: str) -> Conversation:
    """One JSONL record -> a checked Conversation. DataError (naming `source`) for an unknown
    role, non-string content, an empty or missing response, or neither form."""
    if not isinstance(record, dict):
        raise DataError(f"{source}: a chat record must be a JSON object with `messages` or "
                        f"`prompt`/`response`, got {type(record).__name__}.")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{source}: `messages` must be a non-empty list of "
                            "{role, content} objects.")
    elif "prompt" in record and "response" in record:
        messages = [{"role": "user", "content": record["prompt"]},
                    {"role": "assistant", "content": record["response"]}]
        if record.get("system") is not None:
            messages.insert(0, {"role": "system", "content": record["system"]})
    else:
        raise DataError(f"{source}: a chat record needs `messages` (a list of {{role, content}}) "
                        f"or `prompt` and `response`; it has keys {sorted(record)}.")
    checked = []
    for i, m in enumerate(messages):
        try:
            role, content = check_message(i, m)
        except ValueError as e:
            raise DataError(f"{source}: {e}.") from None
        if role == "assistant" and not content.strip():
            raise DataError(f"{source}: messages[{i}] is an empty assistant response; remove the "
                            "record or give it a response.")
        checked.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in checked):
        raise DataError(f"{source}: the conversation has no assistant message, so nothing to "
                        "learn; add the response (role `assistant`).")
    return Conversation(tuple(checked), source)


def read_chat_jsonl(pattern: str, setting: str = "sft.train_data") -> list[Conversation]:
    """All conversations of the files matching `pattern` (a path or glob), file by file in
    sorted order. Blank lines are skipped; anything else that is not a chat record is a DataError
    naming file:line. `setting` names the gin setting in the error for a pattern matching no
    file."""
    paths = sorted(glob.glob(os.path.expanduser(pattern)))
    if not paths:
        raise DataError(f"{setting}={pattern!r} matches no file; pass a JSONL path or glob.")
    out = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: not JSON ({e.msg} at column {e.colno}); every "
                                    "line of a chat JSONL file is one conversation.") from None
                out.append(parse_record(record, f"{path}:{n}"))
    if not out:
        raise DataError(f"{setting}={pattern!r}: the file(s) hold no conversation.")
    return out


def write_chat_jsonl(path: str, records: Sequence[dict]) -> str:
    """Write `records` ({"messages": ...} or {"prompt", "response"}) one per line."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def chat_token_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """{role: id of its tag}. ConfigError if the tokenizer does not hold every tag as one token
    (extend it with `llm.posttrain.init.extend_tokenizer`, as experiments/sft.py does)."""
    out = {}
    for role, tag in zip(ROLES, ROLE_TAGS):
        ids = tokenizer.encode(tag)
        if len(ids) != 1:
            raise ConfigError(f"tokenizer {tokenizer.model_path} splits the chat tag {tag} into "
                              f"{len(ids)} tokens; reserve the tags (gin_configs/data/"
                              "chat_tokens.gin) or extend it "
                              "(llm.posttrain.init.extend_tokenizer).")
        out[role] = ids[0]
    return out


def encode_conversation(tokenizer: Tokenizer, messages: Sequence[dict],
                        tag_ids: dict[str, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32 [n], loss_mask float32 [n]) of one conversation, see the module docstring.
    The sequence ends with EOS (supervised when the last message is the assistant's)."""
    tag_ids = chat_token_ids(tokenizer) if tag_ids is None else tag_ids
    tokens: list[int] = []
    mask: list[float] = []
    after_assistant = False

    def add(ids: Sequence[int], weight: float) -> None:
        tokens.extend(ids)
        mask.extend([weight] * len(ids))

    for m in messages:
        add([tag_ids[m["role"]]], 1.0 if after_assistant else 0.0)
        if m["role"] == "assistant":
            add(tokenizer.encode("\n"), 0.0)
            add(tokenizer.encode(m["content"] + "\n"), 1.0)
        else:
            add(tokenizer.encode("\n" + m["content"] + "\n"), 0.0)
        after_assistant = m["role"] == "assistant"
    add([EOS_ID], 1.0 if after_assistant else 0.0)
    return np.asarray(tokens, np.int32), np.asarray(mask, np.float32)


@dataclasses.dataclass
class ChatStats:
    """Accounting of a tokenized set: every conversation is in exactly one row."""

    conversations: int = 0
    truncated: int = 0  # longer than a row: cut at seq_len tokens
    tokens: int = 0  # after truncation
    response_tokens: int = 0  # loss_mask == 1, after truncation
    response_bytes: int = 0  # UTF-8 bytes of the responses (untruncated)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def encode_conversations(tokenizer: Tokenizer, conversations: Sequence[Conversation],
                         seq_len: int) -> tuple[list[dict[str, np.ndarray]], ChatStats]:
    """Tokenize every conversation, cutting those longer than `seq_len`. Returns the examples
    ({"targets": tokens, "loss_mask": mask}) and their accounting."""
    tag_ids = chat_token_ids(tokenizer)
    stats = ChatStats()
    examples = []
    for c in conversations:
        tokens, mask = encode_conversation(tokenizer, c.messages, tag_ids)
        if len(tokens) > seq_len:
            stats.truncated += 1
            tokens, mask = tokens[:seq_len], mask[:seq_len]
        stats.conversations += 1
        stats.tokens += len(tokens)
        stats.response_tokens += int(mask.sum())
        stats.response_bytes += sum(len(m["content"].encode()) for m in c.messages
                                    if m["role"] == "assistant")
        examples.append({"targets": tokens, "loss_mask": mask})
    return examples, stats


def split_validation(conversations: Sequence[Conversation], fraction: float, seed: int
                     ) -> tuple[list[Conversation], list[Conversation]]:
    """(train, validation): a seeded random `fraction` of the conversations held out."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"sft.validation_fraction={fraction} must be in (0, 1) when "
                          "sft.validation_data is not set.")
    n = len(conversations)
    k = max(1, int(round(n * fraction)))
    if k >= n:
        raise DataError(f"{n} conversation(s) cannot be split into train and validation with "
                        f"sft.validation_fraction={fraction}; add data or set "
                        "sft.validation_data.")
    held = set(np.random.default_rng(seed).permutation(n)[:k].tolist())
    return ([c for i, c in enumerate(conversations) if i not in held],
            [c for i, c in enumerate(conversations) if i in held])


def _post_pack(f: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    seg = f["targets_segment_ids"].astype(np.int32)
    targets = f["targets"].astype(np.int32)
    return {"inputs": shift_right(targets, seg), "targets": targets,
            "loss_mask": (f["loss_mask"] * (seg > 0)).astype(np.float32), "segment_ids": seg,
            "positions": f["targets_positions"].astype(np.int32)}


def pad_row(seq_len: int) -> dict[str, np.ndarray]:
    """A padding row: segment 0, no loss."""
    zeros = np.zeros(seq_len, np.int32)
    return {"inputs": zeros, "targets": zeros, "loss_mask": np.zeros(seq_len, np.float32),
            "segment_ids": zeros, "positions": zeros}


def chat_dataset(examples: Sequence[dict[str, np.ndarray]], *, seq_len: int,
                 global_batch_size: int, seed: int, shuffle: bool = True,
                 num_epochs: int | None = None, process_index: int = 0, process_count: int = 1
                 ) -> grain.IterDataset:
    """Batches of packed chat rows: dicts of [global_batch_size // process_count, seq_len] arrays
    (inputs, targets, loss_mask, segment_ids, positions).

    examples: from `encode_conversations` (each at most seq_len tokens).
    shuffle: a new seeded permutation of the conversations every epoch.
    num_epochs: None repeats forever (training); a number makes a finite pass whose last batch
      is padded with pad rows, and every process yields the same number of batches (evaluation).
    Process p packs conversations p, p + P, ... of each epoch's order; its iterator
    checkpoints with `get_state()/set_state()` like `llm.data.pipeline.make_dataset`'s.
    """
    if global_batch_size % process_count:
        raise ConfigError(f"TrainConfig.global_batch_size={global_batch_size} must be a multiple "
                          f"of the process count {process_count}.")
    if len(examples) < process_count:
        raise DataError(f"{len(examples)} conversation(s) cannot feed {process_count} processes.")
    rows = global_batch_size // process_count
    docs = grain.MapDataset.source(list(examples))
    if shuffle:
        docs = docs.shuffle(seed=seed)
    docs = docs.repeat(num_epochs)

    def packed() -> grain.IterDataset:
        ds = docs[process_index::process_count].to_iter_dataset()
        ds = grain.experimental.FirstFitPackIterDataset(
            ds, length_struct={"targets": seq_len, "loss_mask": seq_len},
            num_packing_bins=rows, seed=seed, shuffle_bins=shuffle)
        return ds.map(_post_pack).filter(lambda r: bool(r["segment_ids"][0] > 0))

    num_batches = None
    if num_epochs is not None:  # the same number of batches on every process
        counts = []
        for p in range(process_count):
            part = docs[p::process_count].to_iter_dataset()
            part = grain.experimental.FirstFitPackIterDataset(
                part, length_struct={"targets": seq_len, "loss_mask": seq_len},
                num_packing_bins=rows, seed=seed, shuffle_bins=shuffle)
            counts.append(math.ceil(sum(1 for r in part if r["targets_segment_ids"][0] > 0)
                                    / rows))
        num_batches = max(counts)
    ds = packed().batch(rows, drop_remainder=False)
    return _PadBatchesIterDataset(ds, rows=rows, num_batches=num_batches, pad=pad_row(seq_len))
