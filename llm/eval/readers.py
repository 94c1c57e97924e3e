"""Readers for published benchmark files, from a local path (nothing is downloaded).

Each reader takes the file exactly as its authors released it and returns documents with the
fields the default templates (`Reader.defaults`, lm-eval's prompts) use: `context`, `choices`,
`gold` for multiple choice; `contexts` + `continuation` for Winogrande's partial scoring;
`context` + `continuation` for LAMBADA. Bias sets (CrowS-Pairs, BBQ, StereoSet) keep their own
fields and are scored by llm/eval/bias.py. The original fields stay in every document.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import json
import os
import re
from collections.abc import Callable

from llm.data.sources import DataError
from llm.eval.tasks import read_jsonl


@dataclasses.dataclass(frozen=True)
class Reader:
    read: Callable[[str], list[dict]]
    defaults: dict
    release: str


def _need(doc: dict, keys, path: str):
    missing = [k for k in keys if k not in doc]
    if missing:
        raise DataError(f"{path}:{doc.get('_line', '?')}: missing field(s) "
                        f"{', '.join(missing)}; is this the right file for this reader?")


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def read_hellaswag(path: str) -> list[dict]:
    """HellaSwag (Zellers et al., ACL 2019), the release files hellaswag_{train,val}.jsonl of
    github.com/rowanz/hellaswag: fields ind, activity_label, ctx_a, ctx_b, ctx, endings (4),
    label, split, split_type, source_id. Prompt as lm-eval's hellaswag task (its preprocess)."""
    docs = read_jsonl(path)
    for d in docs:
        _need(d, ("activity_label", "ctx_a", "ctx_b", "endings", "label"), path)
        ctx = d["ctx_a"] + " " + d["ctx_b"].capitalize()
        d["context"] = _hellaswag_clean(d["activity_label"] + ": " + ctx)
        d["choices"] = [_hellaswag_clean(e) for e in d["endings"]]
        d["gold"] = int(d["label"])
    return docs


def read_piqa(path: str) -> list[dict]:
    """PIQA (Bisk et al., AAAI 2020), physicaliqa-train-dev release: train.jsonl / valid.jsonl
    (fields goal, sol1, sol2) with labels in the sibling train-labels.lst / valid-labels.lst
    (one 0/1 per line)."""
    docs = read_jsonl(path)
    labels_path = os.path.splitext(path)[0] + "-labels.lst"
    if not os.path.isfile(labels_path):
        raise DataError(f"PIQA labels {labels_path!r} not found; the release ships them beside "
                        "the .jsonl (train-labels.lst, valid-labels.lst).")
    with open(labels_path) as f:
        labels = [line.strip() for line in f if line.strip()]
    if len(labels) != len(docs):
        raise DataError(f"{labels_path} has {len(labels)} labels for {len(docs)} documents.")
    for d, label in zip(docs, labels):
        _need(d, ("goal", "sol1", "sol2"), path)
        d["context"] = f"Question: {d['goal']}\nAnswer:"
        d["choices"] = [d["sol1"], d["sol2"]]
        d["gold"] = int(label)
    return docs


def read_boolq(path: str) -> list[dict]:
    """BoolQ (Clark et al., NAACL 2019), github.com/google-research-datasets/boolean-questions
    train.jsonl / dev.jsonl: fields question, title, answer (true/false), passage. Prompt as
    lm-eval's super_glue boolq."""
    docs = read_jsonl(path)
    for d in docs:
        _need(d, ("question", "passage", "answer"), path)
        d["context"] = f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:"
        d["choices"] = ["no", "yes"]
        d["gold"] = int(bool(d["answer"]))
    return docs


def read_arc(path: str) -> list[dict]:
    """ARC (Clark et al. 2018), ARC-V1-Feb2018 release ARC-{Easy,Challenge}-{Train,Dev,Test}.jsonl:
    fields id, question {stem, choices [{text, label}]}, answerKey (a letter or digit)."""
    docs = read_jsonl(path)
    for d in docs:
        _need(d, ("question", "answerKey"), path)
        q = d["question"]
        labels = [c["label"] for c in q["choices"]]
        if d["answerKey"] not in labels:
            raise DataError(f"{path}:{d['_line']}: answerKey {d['answerKey']!r} not among the "
                            f"choice labels {labels}.")
        d["context"] = f"Question: {q['stem']}\nAnswer:"
        d["choices"] = [c["text"] for c in q["choices"]]
        d["gold"] = labels.index(d["answerKey"])
    return docs


def read_winogrande(path: str) -> list[dict]:
    """WinoGrande (Sakaguchi et al., AAAI 2020), winogrande_1.1 release train_*.jsonl / dev.jsonl:
    fields qID, sentence (one `_` blank), option1, option2, answer ("1"/"2"). Partial scoring as
    lm-eval: the continuation after the blank is scored after each filled-in prefix."""
    docs = read_jsonl(path)
    for d in docs:
        _need(d, ("sentence", "option1", "option2", "answer"), path)
        idx = d["sentence"].index("_")
        d["contexts"] = [d["sentence"][:idx] + d[f"option{k}"] for k in (1, 2)]
        d["continuation"] = d["sentence"][idx + 1:].strip()
        d["context"] = d["contexts"][0]
        d["gold"] = int(d["answer"]) - 1
    return docs


def read_mmlu(path: str) -> list[dict]:
    """MMLU (Hendrycks et al., ICLR 2021), the data.tar release: data/{dev,val,test}/
    <subject>_<split>.csv, no header, columns question, A, B, C, D, answer letter. `path` is one
    CSV or a directory of them (all subjects). Prompt as lm-eval's mmlu (default)."""
    files = sorted(glob.glob(os.path.join(path, "*.csv"))) if os.path.isdir(path) else [path]
    if not files or not os.path.isfile(files[0]):
        raise DataError(f"MMLU path {path!r} is neither a CSV nor a directory of CSVs.")
    docs = []
    for file in files:
        subject = re.sub(r"_(dev|val|test)$", "", os.path.splitext(os.path.basename(file))[0])
        with open(file, newline="", encoding="utf-8") as f:
            for number, row in enumerate(csv.reader(f), 1):
                if len(row) != 6 or row[5] not in "ABCD" or not row[5]:
                    raise DataError(f"{file}:{number}: expected 6 columns (question, A-D, "
                                    f"answer letter), got {len(row)}.")
                q, *opts, ans = row
                name = subject.replace("_", " ")
                docs.append({"_line": number, "subject": subject, "question": q,
                             "options": opts, "answer": ans,
                             "context": (f"The following are multiple choice questions (with "
                                         f"answers) about {name}.\n\n{q.strip()}\n"
                                         + "".join(f"{k}. {o}\n" for k, o in zip("ABCD", opts))
                                         + "Answer:"),
                             "choices": ["A", "B", "C", "D"], "gold": "ABCD".index(ans)})
    return docs


def read_lambada(path: str) -> list[dict]:
    """LAMBADA (Paperno et al., ACL 2016): the original lambada_test_plain_text.txt (one passage
    per line) or OpenAI's lambada_test.jsonl ({"text": ...}, the file lm-eval's
    lambada_openai uses). Target: the passage's last word, scored after the rest."""
    if path.endswith(".jsonl"):
        docs = read_jsonl(path)
    else:
        with open(path, encoding="utf-8") as f:
            docs = [{"_line": n, "text": line.rstrip("\n")} for n, line in enumerate(f, 1)
                    if line.strip()]
    for d in docs:
        _need(d, ("text",), path)
        context, _, last = d["text"].strip().rpartition(" ")
        d["context"], d["continuation"] = context, " " + last
    return docs


def read_crows_pairs(path: str) -> list[dict]:
    """CrowS-Pairs (Nangia et al., EMNLP 2020), crows_pairs_anonymized.csv from
    github.com/nyu-mll/crows-pairs: columns (row index), sent_more, sent_less,
    stereo_antistereo, bias_type, annotations, anon_writer, anon_annotators."""
    docs = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"sent_more", "sent_less", "bias_type"} - set(reader.fieldnames or ())
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(sorted(missing))}.")
        for number, row in enumerate(reader, 2):
            docs.append({"_line": number, **row})
    return docs


def read_bbq(path: str) -> list[dict]:
    """BBQ (Parrish et al., Findings of ACL 2022), github.com/nyu-mll/BBQ data/<Category>.jsonl:
    fields example_id, question_index, question_polarity, context_condition, category,
    answer_info, additional_metadata {stereotyped_groups, ...}, context, question, ans0-2, label.
    `path` is one file or the data/ directory."""
    files = sorted(glob.glob(os.path.join(path, "*.jsonl"))) if os.path.isdir(path) else [path]
    docs = []
    for file in files:
        for d in read_jsonl(file):
            _need(d, ("context", "question", "ans0", "ans1", "ans2", "label", "category",
                      "context_condition", "question_polarity", "answer_info",
                      "additional_metadata"), file)
            docs.append(d)
    return docs


def read_stereoset(path: str) -> list[dict]:
    """StereoSet (Nadeem et al., ACL 2021), dev.json of github.com/moinnadeem/StereoSet:
    {"version", "data": {"intrasentence": [...], "intersentence": [...]}}, each item id, target,
    bias_type, context, sentences [{sentence, id, labels, gold_label}]. One document per item,
    with `split` = intrasentence | intersentence."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)["data"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a StereoSet release file "
                        f"({type(e).__name__}: {e}).") from None
    docs = []
    for split in ("intrasentence", "intersentence"):
        for item in data.get(split, []):
            labels = {s["gold_label"] for s in item["sentences"]}
            if labels != {"stereotype", "anti-stereotype", "unrelated"}:
                raise DataError(f"{path}: item {item.get('id')} has gold labels {labels}.")
            docs.append({"split": split, **item})
    return docs


_MC = {"output_type": "multiple_choice", "doc_to_text": "{context}",
       "doc_to_choice": "choices", "doc_to_target": "{gold}"}

READERS: dict[str, Reader] = {
    "hellaswag": Reader(read_hellaswag, _MC, "rowanz/hellaswag hellaswag_val.jsonl"),
    "piqa": Reader(read_piqa, _MC, "physicaliqa-train-dev valid.jsonl + valid-labels.lst"),
    "boolq": Reader(read_boolq, _MC, "google-research-datasets/boolean-questions dev.jsonl"),
    "arc": Reader(read_arc, _MC, "ARC-V1-Feb2018 ARC-*-{Dev,Test}.jsonl"),
    "winogrande": Reader(read_winogrande, {**_MC, "doc_to_target": "{continuation}"},
                         "winogrande_1.1 dev.jsonl"),
    "mmlu": Reader(read_mmlu, {**_MC, "target_delimiter": " "}, "data.tar data/test/*.csv"),
    "lambada": Reader(read_lambada, {"output_type": "loglikelihood", "doc_to_text": "{context}",
                                     "doc_to_target": "{continuation}"},
                      "lambada_test_plain_text.txt or OpenAI lambada_test.jsonl"),
    "crows_pairs": Reader(read_crows_pairs, {}, "nyu-mll/crows-pairs crows_pairs_anonymized.csv"),
    "bbq": Reader(read_bbq, {}, "nyu-mll/BBQ data/<Category>.jsonl"),
    "stereoset": Reader(read_stereoset, {}, "moinnadeem/StereoSet dev.json"),
}
BIAS_FORMATS = ("crows_pairs", "bbq", "stereoset")
