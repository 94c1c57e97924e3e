"""Does the exported `tokenizer.json` (`llm.interop.hf.hf_tokenizer`) give a run's SentencePiece
ids on a whole corpus?

    python -m tools.hf_tokenizer_check --run_dir=runs/quickstart [--out=DIR]
    python -m tools.hf_tokenizer_check --tokenizer=data/embedded/tokenizer.model [--score_bits=3]
    python -m tools.hf_tokenizer_check --run_dir=runs/gpt2 --hf_dir=hf/gpt2   # an imported
                                                          # tokenizer.json vs AutoTokenizer

Builds the HF tokenizer from the run's SentencePiece model (or --tokenizer), saves it (to --out
or a temporary directory), loads it back with `transformers.AutoTokenizer`, and encodes every
document of the embedded corpus (stdlib + docs, the quickstart's data) both ways, then a set of
tie-prone and random texts (`stress_texts`: long runs of one character, random Unicode, random
bytes decoded as Latin-1, literal byte-piece spellings). Prints JSON: documents with identical
ids, documents whose decode of our ids is identical, bytes per token, and for the documents that
differ whether the two id lists have the same length and the same multiset of pieces (a
re-ordering of equal-score pieces, not a different vocabulary use).
--score_bits=K first rounds the model's scores to multiples of 2^-K (`quantize_scores`, what
`train_sentencepiece` does to every new model) and also reports the unrounded model's bytes per
token on the same documents, so the cost of the rounding is measured beside its effect.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from collections import Counter


def stress_texts(seed: int = 0) -> list[str]:
    """Texts where equal-score segmentations are common or the input is unusual: runs of one
    or two characters (5,000 '=', spaces, '-', '#', '0', 'ab'), random Unicode code points
    (surrogates left out), random bytes read as Latin-1, and spellings of special pieces."""
    rng = random.Random(seed)
    runs = ["=" * 5000, " " * 3000, "-" * 4097, "#" * 777, "0" * 1000, "ab" * 1500,
            "=" * 63 + "\n" + "  " * 40 + "x", "\t" * 100 + "=" * 100 + " " * 100]
    unicode = ["".join(chr(c) for c in rng.choices(
        [c for c in range(1, 0x3000) if not 0xD800 <= c < 0xE000], k=400)) for _ in range(20)]
    latin1 = [bytes(rng.randrange(1, 256) for _ in range(400)).decode("latin-1")
              for _ in range(20)]
    spelled = ["<0x41>", "x<0xFF>y<0x0A>", "</s><pad><unk>", "a</s>b", "\x00\x01<0x00>"]
    return runs + unicode + latin1 + spelled


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.hf_tokenizer_check",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--run_dir", default=None)
    parser.add_argument("--tokenizer", default=None,
                        help="a SentencePiece model to check instead of the run's")
    parser.add_argument("--score_bits", type=int, default=None,
                        help="round the scores to multiples of 2^-K before the check")
    parser.add_argument("--out", default=None, help="where to save the HF tokenizer")
    parser.add_argument("--hf_dir", default=None,
                        help="with --run_dir imported from it (a tokenizer.json source): compare "
                             "the run's tokenizer with AutoTokenizer on this directory, through "
                             "the recorded relabelling")
    args = parser.parse_args(argv)
    if args.hf_dir is not None:
        return _check_import(args.run_dir, args.hf_dir)
    import transformers
    from tqdm import tqdm

    from llm.config import ConfigError
    from llm.data.sources import DataError, embedded_corpus
    from llm.data.tokenizer import load_tokenizer, quantize_scores
    from llm.interop.hf import hf_tokenizer
    from llm.runs import tokenizer_path

    if (args.run_dir is None) == (args.tokenizer is None):
        print("hf_tokenizer_check: error: pass one of --run_dir=RUN or --tokenizer=MODEL",
              file=sys.stderr)
        return 2
    try:
        if args.tokenizer is not None:
            path = args.tokenizer
        else:
            with open(f"{args.run_dir}/manifest.json") as f:
                path = tokenizer_path(args.run_dir, json.load(f)["data"])
        original = load_tokenizer(path)
        out = args.out or tempfile.mkdtemp(prefix="hf_tokenizer_")
        if args.score_bits is not None:
            with open(path, "rb") as f:
                rounded = quantize_scores(f.read(), args.score_bits)
            path = os.path.join(out, "rounded.model")
            os.makedirs(out, exist_ok=True)
            with open(path, "wb") as f:
                f.write(rounded)
        ours = load_tokenizer(path)
        hf_tokenizer(path).save_pretrained(out)
    except (OSError, KeyError, ConfigError, DataError) as e:
        print(f"hf_tokenizer_check: error: {e}", file=sys.stderr)
        return 2
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    docs = [(d.id, d.text) for d in embedded_corpus(include_docs=True, include_tests=False)]
    stress = [(f"stress/{i}", t) for i, t in enumerate(stress_texts())]
    report = {}
    for name, texts in (("corpus", docs), ("stress", stress)):
        tokens, unrounded, same_ids, same_decode, differing = 0, 0, 0, 0, []
        for doc_id, text in tqdm(texts, desc=name):
            a = ours.encode(text)
            b = theirs(text, add_special_tokens=False)["input_ids"]
            tokens += len(a)
            if args.score_bits is not None:
                unrounded += len(original.encode(text))
            same_ids += a == b
            same_decode += theirs.decode(a) == ours.decode(a) == text
            if a != b:
                differing.append({"doc": doc_id, "same_length": len(a) == len(b),
                                  "same_multiset": Counter(a) == Counter(b),
                                  "positions_differing": sum(x != y for x, y in zip(a, b))})
        size = sum(len(t.encode()) for _, t in texts)
        report[name] = {"documents": len(texts), "characters": sum(len(t) for _, t in texts),
                        "bytes": size, "tokens": tokens,
                        "bytes_per_token": round(size / max(tokens, 1), 4),
                        "identical_ids": same_ids, "identical_decode": same_decode,
                        "differing": differing}
        if args.score_bits is not None:
            report[name]["unrounded_tokens"] = unrounded
            report[name]["unrounded_bytes_per_token"] = round(size / max(unrounded, 1), 4)
    print(json.dumps({"tokenizer": args.tokenizer or args.run_dir,
                      "score_bits": args.score_bits, **report}, indent=1))
    return 0


def _check_import(run_dir: str | None, hf_dir: str) -> int:
    """A run imported from a tokenizer.json source against `AutoTokenizer(hf_dir)`: on every
    embedded-corpus document and the stress texts, AutoTokenizer's ids relabelled by the
    manifest's permutation must equal the BOS this repo prepends (id 0, when the source's
    post-processor adds one) + the run's `encode`, and `decode` must give the text back."""
    import numpy as np
    import transformers
    from tqdm import tqdm

    from llm.data.sources import DataError, embedded_corpus
    from llm.data.tokenizer import load_tokenizer
    from llm.runs import tokenizer_path

    try:
        if run_dir is None:
            raise DataError("--hf_dir needs --run_dir=RUN, the run imported from it")
        with open(os.path.join(run_dir, "manifest.json")) as f:
            manifest = json.load(f)
        perm = (manifest.get("imported_from") or {}).get("token_permutation")
        if not perm:
            raise DataError(f"run {run_dir!r} was not imported with a relabelled tokenizer")
        ours = load_tokenizer(tokenizer_path(run_dir, manifest["data"]))
        theirs = transformers.AutoTokenizer.from_pretrained(hf_dir)
    except (OSError, KeyError, DataError) as e:
        print(f"hf_tokenizer_check: error: {e}", file=sys.stderr)
        return 2
    ours_of = np.argsort(perm)
    prefix = ours_of[theirs.encode("")].tolist()  # [0] when the source adds a BOS
    docs = [(d.id, d.text) for d in embedded_corpus(include_docs=True, include_tests=False)]
    stress = [(f"stress/{i}", t) for i, t in enumerate(stress_texts())]
    report = {}
    for name, texts in (("corpus", docs), ("stress", stress)):
        tokens, same_ids, same_decode, differing = 0, 0, 0, []
        for doc_id, text in tqdm(texts, desc=name):
            a = ours.encode(text)
            hf_ids = theirs.encode(text)
            tokens += len(a)
            same_ids += prefix + a == ours_of[hf_ids].tolist()
            same_decode += ours.decode(a) == theirs.decode(hf_ids, skip_special_tokens=True) \
                == text
            if prefix + a != ours_of[hf_ids].tolist():
                differing.append(doc_id)
        size = sum(len(t.encode()) for _, t in texts)
        report[name] = {"documents": len(texts), "bytes": size, "tokens": tokens,
                        "bytes_per_token": round(size / max(tokens, 1), 4),
                        "identical_ids": same_ids, "identical_decode": same_decode,
                        "differing": differing[:20]}
    print(json.dumps({"run_dir": run_dir, "hf_dir": hf_dir, "bos_prefix": prefix,
                      "vocab_size": ours.vocab_size, **report}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
