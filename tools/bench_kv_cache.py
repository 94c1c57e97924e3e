"""The int8 KV cache against the model-dtype (fp32) cache: memory per token, held-out loss and
greedy agreement.

    python -m tools.bench_kv_cache --run_dir=runs/quickstart [--windows=16] [--out=kv.json]

Loss: `--windows` windows of `--seq` tokens from the validation-split stdlib files (see
tools/bench_router.py for the split), each run through the model in one cached forward
(prefill into an empty cache, as the engine does) with either cache; reported as mean nats per
token and the difference. Logits: max |int8 - fp32| over all positions. Greedy: 4 prompts x
`--new_tokens` tokens through `sampler.generate` with each cache, tokens equal position by
position.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", required=True)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from llm.data.sources import embedded_corpus, split_of
    from llm.runs import load_run
    from llm.serve.engine import BOS_ID
    from llm.serve.sampler import generate, init_caches

    run = load_run(args.run_dir)
    ids = []
    for doc in embedded_corpus(include_docs=False):
        if split_of(doc.id, 0.05) == "validation":
            tokens = run.tokenizer.encode(doc.text)
            if len(tokens) >= args.seq:
                ids.append([BOS_ID, *tokens[:args.seq - 1]])
        if len(ids) == args.windows:
            break
    ids = jnp.asarray(ids)
    model = nnx.merge(run.graphdef, run.params)

    def forward(cache_state, ids, graphdef):
        caches = nnx.merge(graphdef, cache_state)
        return model(ids, positions=jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape),
                     caches=list(caches), cache_lengths=jnp.zeros((ids.shape[0],), jnp.int32))

    out = {"run_dir": args.run_dir, "windows": int(ids.shape[0]), "seq": args.seq}
    logits = {}
    for dtype in ("model", "int8"):
        graphdef, state = init_caches(run.cfg, ids.shape[0], args.seq, dtype)
        out[f"{dtype}_cache_bytes_per_token"] = sum(
            x.size * x.dtype.itemsize for x in jax.tree.leaves(state)) / (ids.shape[0] * args.seq)
        logits[dtype] = forward(state, ids, graphdef)
        logp = jax.nn.log_softmax(logits[dtype][:, :-1], axis=-1)
        nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1).mean()
        out[f"{dtype}_nats_per_token"] = float(nll)
    out["delta_nats_per_token"] = out["int8_nats_per_token"] - out["model_nats_per_token"]
    out["max_abs_logit_diff"] = float(jnp.abs(logits["int8"] - logits["model"]).max())
    out["max_abs_logit"] = float(jnp.abs(logits["model"]).max())
    prompts = [[BOS_ID, *run.tokenizer.encode(p)] for p in
               ("def fibonacci(n):\n", "import os\n", "class Parser:\n", "# Copyright")]
    greedy = {d: generate(run.graphdef, run.params, run.cfg, prompts,
                          max_new_tokens=args.new_tokens, temperature=0.0, top_k=0, eos_id=-1,
                          kv_cache_dtype=d) for d in ("model", "int8")}
    agree = sum(a == b for x, y in zip(greedy["model"], greedy["int8"]) for a, b in zip(x, y))
    out["greedy_agreement"] = f"{agree}/{len(prompts) * args.new_tokens}"
    print(json.dumps(out, indent=1))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
