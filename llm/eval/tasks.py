"""Native task format: a JSONL file of documents plus a small YAML spec, and the task runner.

A task spec (YAML, keys as lm-eval's where they mean the same thing):

    name: my_qa                      # default: the file's stem
    output_type: multiple_choice     # | loglikelihood | loglikelihood_rolling | generate_until
    data: my_qa.jsonl                # relative to the YAML file
    format: jsonl                    # or a published format: hellaswag, piqa, boolq, arc, ...
    doc_to_text: "Question: {question}\\nAnswer:"   # str.format over the document's fields
    doc_to_choice: choices           # a field holding the list, or a list of templates
    doc_to_target: "{gold}"          # MC: index or choice text; generate: answer or list
    target_delimiter: " "
    fewshot_delimiter: "\\n\\n"
    num_fewshot: 0
    fewshot_seed: 1234               # the shots of document i: Random(seed, i) over the others
    generation_kwargs: {until: ["\\n"], max_gen_toks: 32}
    limit: null                      # first N documents

A template that is exactly "{field}" returns the field's value as it is (a list, an int).
A published format (`format:`) maps the authors' release onto fields and gives default
templates (llm/eval/readers.py), so `hellaswag=/path/hellaswag_val.jsonl` needs no YAML.

Multiple choice scores context + target_delimiter + choice for every choice; documents with a
`contexts` list instead (Winogrande's partial scoring) score each context + the shared
continuation. Every metric gets a bootstrap standard error (llm/eval/metrics.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
from collections.abc import Sequence

import yaml

from llm.config import ConfigError
from llm.data.sources import DataError
from llm.eval import metrics as M

OUTPUT_TYPES = ("multiple_choice", "loglikelihood", "loglikelihood_rolling", "generate_until")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    name: str
    output_type: str
    data: str
    format: str = "jsonl"
    doc_to_text: str = "{context}"
    doc_to_choice: str | list = "choices"
    doc_to_target: str | int = "{gold}"
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    description: str = ""
    num_fewshot: int = 0
    fewshot_seed: int = 1234
    generation_kwargs: dict = dataclasses.field(default_factory=dict)
    limit: int | None = None


def read_jsonl(path: str) -> list[dict]:
    """Documents of a JSONL file; a malformed line is a DataError naming file and line."""
    if not os.path.isfile(path):
        raise DataError(f"task data {path!r} does not exist.")
    docs = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: malformed JSON ({e.msg} at column "
                                f"{e.colno}).") from None
            if not isinstance(doc, dict):
                raise DataError(f"{path}:{number}: each line must be a JSON object, got "
                                f"{type(doc).__name__}.")
            doc.setdefault("_line", number)
            docs.append(doc)
    return docs


def load_spec(path: str) -> TaskSpec:
    """Parse a task YAML; unknown keys and bad values are ConfigErrors naming them."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"task spec {path!r} cannot be read ({e}).") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"task spec {path!r} must be a mapping of keys to values.")
    fields = {f.name for f in dataclasses.fields(TaskSpec)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ConfigError(f"task spec {path!r}: unknown key(s) {', '.join(unknown)}; valid: "
                          f"{', '.join(sorted(fields))}.")
    raw.setdefault("name", os.path.splitext(os.path.basename(path))[0])
    if "data" not in raw:
        raise ConfigError(f"task spec {path!r} has no `data:` (the JSONL or published file).")
    raw["data"] = os.path.join(os.path.dirname(os.path.abspath(path)), raw["data"])
    fmt = raw.get("format", "jsonl")
    if fmt != "jsonl":
        from llm.eval.readers import READERS

        if fmt not in READERS:
            raise ConfigError(f"task spec {path!r}: unknown format {fmt!r}; valid: jsonl, "
                              f"{', '.join(sorted(READERS))}.")
        defaults = READERS[fmt].defaults
        raw = {**defaults, **raw}
    if raw.get("output_type") not in OUTPUT_TYPES:
        raise ConfigError(f"task spec {path!r}: output_type={raw.get('output_type')!r}; valid: "
                          f"{', '.join(OUTPUT_TYPES)}.")
    return TaskSpec(**raw)


def load_docs(spec: TaskSpec) -> list[dict]:
    if spec.format == "jsonl":
        docs = read_jsonl(spec.data)
    else:
        from llm.eval.readers import READERS

        docs = READERS[spec.format].read(spec.data)
    if not docs:
        raise DataError(f"task {spec.name!r}: {spec.data} holds no documents.")
    return docs[: spec.limit] if spec.limit else docs


_FIELD = re.compile(r"\{(\w+)\}")


def render(template, doc: dict, task: str, what: str):
    """Fill a template from a document (see the module docstring)."""
    if not isinstance(template, str):
        return template
    m = _FIELD.fullmatch(template)
    where = f"task {task!r}, line {doc.get('_line', '?')}"
    try:
        if m:
            return doc[m.group(1)]
        return template.format(**doc)
    except KeyError as e:
        raise DataError(f"{where}: {what} template {template!r} needs field {e.args[0]!r}, "
                        f"which the document lacks (fields: {', '.join(sorted(doc))}).") from None
    except (IndexError, ValueError) as e:
        raise DataError(f"{where}: {what} template {template!r}: {e}.") from None


@dataclasses.dataclass
class Example:
    """One rendered document: text (no few-shot), choices, gold index or golds (answers)."""

    doc: dict
    text: str
    choices: list[str] | None = None
    contexts: list[str] | None = None
    gold: int | None = None
    answers: list[str] | None = None
    target: str = ""  # the text a few-shot example shows after the delimiter


def make_example(spec: TaskSpec, doc: dict) -> Example:
    where = f"task {spec.name!r}, line {doc.get('_line', '?')}"
    text = str(render(spec.doc_to_text, doc, spec.name, "doc_to_text"))
    ex = Example(doc=doc, text=text)
    if spec.output_type == "multiple_choice":
        if "contexts" in doc:
            ex.contexts = [str(c) for c in doc["contexts"]]
            choices = [str(render(spec.doc_to_target, doc, spec.name, "doc_to_target"))] * len(
                ex.contexts)
            gold = int(doc["gold"])
        else:
            choices = spec.doc_to_choice
            choices = (doc[choices] if isinstance(choices, str) and choices in doc
                       else render(choices, doc, spec.name, "doc_to_choice")
                       if isinstance(choices, str)
                       else [render(c, doc, spec.name, "doc_to_choice") for c in choices])
            if not isinstance(choices, list):
                raise DataError(f"{where}: doc_to_choice gives {type(choices).__name__}, not a "
                                "list of choices.")
            choices = [str(c) for c in choices]
            target = render(spec.doc_to_target, doc, spec.name, "doc_to_target")
            gold = _gold_index(target, choices, where)
        if not choices or any(c == "" for c in choices):
            raise DataError(f"{where}: empty choices ({choices!r}); every document needs at "
                            "least one non-empty choice.")
        if not 0 <= gold < len(choices):
            raise DataError(f"{where}: gold index {gold} is out of range for "
                            f"{len(choices)} choices.")
        ex.choices, ex.gold = choices, gold
        ex.target = choices[gold] if ex.contexts is None else choices[0]
        if ex.contexts is not None:  # a few-shot example shows the correct filling
            ex.text = ex.contexts[gold]
    elif spec.output_type == "generate_until":
        answers = render(spec.doc_to_target, doc, spec.name, "doc_to_target")
        ex.answers = [str(a) for a in (answers if isinstance(answers, list) else [answers])]
        ex.target = ex.answers[0]
    elif spec.output_type == "loglikelihood":
        ex.target = str(render(spec.doc_to_target, doc, spec.name, "doc_to_target"))
        if not ex.target:
            raise DataError(f"{where}: empty continuation.")
    return ex


def _gold_index(target, choices: list[str], where: str) -> int:
    if isinstance(target, bool):
        return int(target)
    if isinstance(target, int):
        return target
    if isinstance(target, str) and target.strip().lstrip("-").isdigit():
        return int(target)
    if target in choices:
        return choices.index(target)
    raise DataError(f"{where}: target {target!r} is neither an index nor one of the choices "
                    f"{choices!r}.")


def fewshot_context(spec: TaskSpec, examples: Sequence[Example], i: int) -> str:
    """description + k shots (chosen by Random((fewshot_seed, i)) among the other documents) +
    the document's text."""
    shots = ""
    if spec.num_fewshot:
        pool = [j for j in range(len(examples)) if j != i]
        if len(pool) < spec.num_fewshot:
            raise DataError(f"task {spec.name!r}: num_fewshot={spec.num_fewshot} but only "
                            f"{len(pool)} other documents to draw shots from.")
        rng = random.Random(f"{spec.fewshot_seed}/{i}")
        picked = rng.sample(pool, spec.num_fewshot)
        shots = "".join(examples[j].text + spec.target_delimiter + examples[j].target
                        + spec.fewshot_delimiter for j in picked)
    return spec.description + shots + examples[i].text


def evaluate_spec(lm, spec: TaskSpec, docs: list[dict] | None = None) -> dict:
    """Run a task: {"task", "output_type", "num_samples", "metrics": {name: {value, stderr}},
    "samples": [...]}."""
    docs = load_docs(spec) if docs is None else docs
    examples = [make_example(spec, d) for d in docs]
    contexts = [fewshot_context(spec, examples, i) for i in range(len(examples))]
    samples: list[dict] = []
    kind = spec.output_type
    if kind == "multiple_choice":
        requests, owner = [], []
        for i, (ex, ctx) in enumerate(zip(examples, contexts)):
            if ex.contexts is not None:
                shots = ctx[: len(ctx) - len(ex.text)]
                pairs = [(shots + c, spec.target_delimiter + ex.choices[0]) for c in ex.contexts]
            else:
                pairs = [(ctx, spec.target_delimiter + c) for c in ex.choices]
            requests += pairs
            owner += [i] * len(pairs)
        results = _loglikelihood(lm, requests, spec.name)
        lls: list[list[float]] = [[] for _ in examples]
        for i, (ll, _) in zip(owner, results):
            lls[i].append(ll)
        for i, ex in enumerate(examples):
            samples.append({"doc": i, "context": contexts[i], "choices": ex.choices,
                            "gold": ex.gold, "lls": lls[i],
                            **M.choice_metrics(lls[i], ex.choices, ex.gold)})
        aggregates = M.mean_aggregates("acc", "acc_norm", "acc_bytes")
    elif kind == "loglikelihood":
        results = _loglikelihood(lm, [(c, ex.target) for c, ex in zip(contexts, examples)],
                                 spec.name)
        for i, ((ll, greedy), ex) in enumerate(zip(results, examples)):
            samples.append({"doc": i, "context": contexts[i], "continuation": ex.target,
                            "ll": ll, "acc": float(greedy)})
        aggregates = {"perplexity": (M.exp_neg_mean("ll"), ["ll"]), "acc": (M.mean_of("acc"),
                                                                           ["acc"])}
    elif kind == "loglikelihood_rolling":
        texts = [ex.text for ex in examples]
        for i, (ll, text) in enumerate(zip(lm.loglikelihood_rolling(texts), texts)):
            samples.append({"doc": i, "ll": ll, "words": M.word_count(text),
                            "bytes": len(text.encode("utf-8"))})
        aggregates = {"word_perplexity": (M.exp_neg_ratio("ll", "words"), ["ll", "words"]),
                      "byte_perplexity": (M.exp_neg_ratio("ll", "bytes"), ["ll", "bytes"]),
                      "bits_per_byte": (M.bits_ratio("ll", "bytes"), ["ll", "bytes"])}
    else:
        outputs = _with_task(lambda: lm.generate_until(
            [(c, dict(spec.generation_kwargs)) for c in contexts]), spec.name)
        for i, (out, ex) in enumerate(zip(outputs, examples)):
            samples.append({"doc": i, "context": contexts[i], "output": out,
                            "answers": ex.answers, **M.generation_metrics(out, ex.answers)})
        aggregates = M.mean_aggregates("exact_match", "f1")
    return {"task": spec.name, "output_type": kind, "num_samples": len(samples),
            "num_fewshot": spec.num_fewshot, "data": spec.data, "format": spec.format,
            "metrics": M.summarize(samples, aggregates), "samples": samples}


def _with_task(fn, task: str):
    from llm.eval.lm import PromptTooLong

    try:
        return fn()
    except PromptTooLong as e:
        raise PromptTooLong(f"task {task!r}: {e}") from None


def _loglikelihood(lm, requests, task: str):
    return _with_task(lambda: lm.loglikelihood(requests), task)
