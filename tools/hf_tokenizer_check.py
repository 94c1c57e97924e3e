"""Does the exported `tokenizer.json` (`llm.interop.hf.hf_tokenizer`) give a run's SentencePiece
ids on a whole corpus?

    python -m tools.hf_tokenizer_check --run_dir=runs/quickstart [--out=DIR]

Builds the HF tokenizer from the run's SentencePiece model, saves it (to --out or a temporary
directory), loads it back with `transformers.AutoTokenizer`, and encodes every document of the
embedded corpus (stdlib + docs, the quickstart's data) both ways. Prints JSON: documents with
identical ids, documents whose decode of our ids is identical, and for the documents that differ
whether the two id lists have the same length and the same multiset of pieces (a re-ordering of
equal-score pieces, not a different vocabulary use).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.hf_tokenizer_check",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--run_dir", required=True)
    parser.add_argument("--out", default=None, help="where to save the HF tokenizer")
    args = parser.parse_args(argv)
    import transformers
    from tqdm import tqdm

    from llm.config import ConfigError
    from llm.data.sources import DataError, embedded_corpus
    from llm.data.tokenizer import load_tokenizer
    from llm.interop.hf import hf_tokenizer
    from llm.runs import tokenizer_path

    try:
        with open(f"{args.run_dir}/manifest.json") as f:
            path = tokenizer_path(args.run_dir, json.load(f)["data"])
        ours = load_tokenizer(path)
        out = args.out or tempfile.mkdtemp(prefix="hf_tokenizer_")
        hf_tokenizer(path).save_pretrained(out)
    except (OSError, KeyError, ConfigError, DataError) as e:
        print(f"hf_tokenizer_check: error: {e}", file=sys.stderr)
        return 2
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    docs = list(embedded_corpus(include_docs=True, include_tests=False))
    tokens, same_ids, same_decode, differing = 0, 0, 0, []
    for doc in tqdm(docs, desc="documents"):
        a = ours.encode(doc.text)
        b = theirs(doc.text, add_special_tokens=False)["input_ids"]
        tokens += len(a)
        same_ids += a == b
        same_decode += theirs.decode(a) == ours.decode(a)
        if a != b:
            differing.append({"doc": doc.id, "same_length": len(a) == len(b),
                              "same_multiset": Counter(a) == Counter(b),
                              "positions_differing": sum(x != y for x, y in zip(a, b))})
    print(json.dumps({"documents": len(docs), "characters": sum(len(d.text) for d in docs),
                      "tokens": tokens, "identical_ids": same_ids,
                      "identical_decode": same_decode, "differing": differing}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
