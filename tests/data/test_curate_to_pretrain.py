"""Curate -> prepare -> pretrain on your own data, end to end: a two-domain corpus with planted
duplicates and PII is curated (`llm.data.curate.curate`), read directly by `prepare`
(corpus.name='curated'), and pretrained on a 2-domain mixture by `experiments.pretrain_ntp`.

Checks: no planted duplicate or PII string reaches the shards; the domain token shares seen in
training match the rates within sampling error; a SIGKILL and resume gives the same batches
(bitwise-equal losses and per-step domain counts)."""

import json
import math
import os
import random
import signal

import numpy as np
import pytest

from llm.data import shards, tokenizer
from llm.train.metrics import read_metrics
from tests.conftest import run_experiment
from tests.curate.corpus import prose, vocab, write_jsonl

pytestmark = pytest.mark.slow

RATES = {"code": 0.3, "web": 0.7}
PII = ["jane.doe@example.com", "+44 20 7946 0958", "bob.smith@corp.example.org"]


def code_doc(rng: random.Random, words: list[str], i: int) -> str:
    lines = [f'"""Module {i}: {rng.choice(words)} helpers."""', "", "import os", ""]
    for f in range(rng.randint(2, 5)):
        a, b = rng.choice(words), rng.choice(words)
        lines += [f"def {a}_{f}({b}, n={rng.randint(1, 99)}):",
                  f"    total = {b} * n + {rng.randint(0, 9)}",
                  f"    for k in range({rng.randint(2, 20)}):",
                  f"        total += k * {rng.randint(1, 7)}",
                  "    return total", ""]
    return "\n".join(lines)


def make_corpus(root: str) -> dict:
    rng = random.Random(0)
    words = vocab(800)
    web = [prose(rng, words) for _ in range(60)]
    code = [code_doc(rng, words, i) for i in range(60)]
    planted = {"exact_web": web[3], "near_web": (web[2], web[2].replace(" the ", " a ", 2)),
               "exact_code": code[4]}
    web[5] = web[3]                                         # exact duplicate
    web[7] = planted["near_web"][1]                         # near duplicate (2 words differ)
    web[9] += f"\nWrite to {PII[0]} or call {PII[1]} today."
    code[6] = code[4]                                       # exact duplicate
    code[8] = code[8].replace("import os", f"import os  # maintainer: {PII[2]}")
    for name, docs in (("web", web), ("code", code)):
        os.makedirs(os.path.join(root, name))
        for f in range(2):
            write_jsonl(os.path.join(root, name, f"{name}-{f}.jsonl"),
                        [{"text": d} for d in docs[f::2]])
    return planted


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    from llm.data.curate.run import curate

    root = str(tmp_path_factory.mktemp("e2e"))
    planted = make_corpus(os.path.join(root, "raw"))
    out = os.path.join(root, "curated")
    curate(out_dir=out, quiet=True, steps=["exact_dedup", "pii", "minhash_dedup"], sources=[
        {"kind": "jsonl", "path": os.path.join(root, "raw", d, "*.jsonl"), "domain": d}
        for d in ("web", "code")])
    return root, out, planted


def args(root, curated_dir, run_dir, *extra):
    return ["--gin_file=gin_configs/debug/tiny.gin", "--gin_param=corpus.name='curated'",
            f"--gin_param=curated.path='{curated_dir}'", "--gin_param=prepare.vocab_size=400",
            "--gin_param=prepare.validation_fraction=0.15", "--gin_param=prepare.num_workers=2",
            f"--gin_param=make_dataset.mixture={RATES!r}",
            f"--gin_param=pretrain.data_dir='{os.path.join(root, 'data')}'",
            f"--gin_param=pretrain.run_dir='{run_dir}'", "--gin_param=pretrain.sample_prompt=''",
            "--gin_param=TrainConfig.steps=12", "--gin_param=checkpoint_manager.save_every=3",
            "--gin_param=TrainConfig.eval_batches=2", *extra]


def records(path):
    return read_metrics(os.path.join(path, "metrics.jsonl"))


@pytest.fixture(scope="module")
def straight(curated):
    root, out, _ = curated
    run_dir = os.path.join(root, "straight")
    run_experiment("experiments.pretrain_ntp", args(root, out, run_dir))
    return run_dir


def test_no_duplicate_or_pii_reaches_the_shards(curated, straight):
    root, _, planted = curated
    info = shards.load_dataset_info(os.path.join(root, "data"))
    tok = tokenizer.load_tokenizer(info.tokenizer_path)
    texts, domains = [], {}
    for s in info.splits.values():
        for d, paths in s.domain_shards().items():
            got = [tok.decode(r) for r in shards.read_all([os.path.join(info.data_dir, p)
                                                          for p in paths])]
            texts += got
            domains[d] = domains.get(d, 0) + len(got)
    assert domains == {"code": 59, "web": 58}  # 60 + 60 minus one exact copy each, one near copy
    for s in PII:
        assert not any(s in t for t in texts), s
    assert sum(t == planted["exact_web"] for t in texts) == 1
    assert sum(t == planted["exact_code"] for t in texts) == 1
    assert sum(t in planted["near_web"] for t in texts) == 1


def test_domain_shares_match_the_rates(curated, straight):
    root, _, _ = curated
    info = shards.load_dataset_info(os.path.join(root, "data"))
    last = records(straight)[-1]
    shares = {d: last[f"mixture/{d}"] for d in RATES}
    assert sum(shares.values()) == pytest.approx(1.0)
    # Documents are drawn in exact proportion (rate / mean length); the token share then varies
    # with the lengths of the documents drawn. Delta method for s = A / (A + B), A the sum of
    # the n_a = r T / mean_a web document lengths: var(s) = ((1-r)^2 n_a var_a + r^2 n_b var_b)
    # / T^2 with T the tokens trained on.
    total = 12 * 8 * 64
    train = info.splits["train"]
    var = 0.0
    for d, rate in RATES.items():
        lengths = np.array([len(r) for r in shards.read_all(
            [os.path.join(info.data_dir, p) for p in train.domain_shards()[d]])], np.float64)
        n = total * rate / lengths.mean()
        var += (1 - rate) ** 2 * n * lengths.var() / total ** 2
    sigma = math.sqrt(var)
    print(f"shares {shares}, sigma {sigma:.4f}")
    assert 0.002 < sigma < 0.1
    assert abs(shares["web"] - RATES["web"]) < 4 * sigma, (shares, sigma)


def test_sigkill_and_resume_give_the_same_batches(curated, straight, tmp_path):
    root, out, _ = curated
    run_dir = str(tmp_path)
    killed = run_experiment("experiments.pretrain_ntp", args(
        root, out, run_dir, "--gin_param=TrainConfig.fault_injection='sigkill_after_save:6'"),
        check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = run_experiment("experiments.pretrain_ntp", args(root, out, run_dir))
    assert "resumed from step 6" in resumed.stdout
    keys = ["loss", *[f"mixture/{d}" for d in RATES]]
    expect = [[r[k] for k in keys] for r in records(straight)]
    assert [[r[k] for k in keys] for r in records(run_dir)] == expect  # bit for bit
    evals = []
    for d in (run_dir, straight):
        with open(os.path.join(d, "eval.json")) as f:
            evals.append(json.load(f)["loss"])
    assert evals[0] == evals[1]
