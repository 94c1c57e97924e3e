"""Balance the mixture: token counts per bucket, then seeded up/down-sampling.

Buckets are tuples of metadata fields (`bucket_by`, default source, domain and language).
Tokens are whitespace words until a tokenizer is trained (`token_unit='bytes'` counts UTF-8
bytes/4 instead). Sampling rate per bucket r_b:
  * `weights` {bucket_name: weight}: r_b = w_b * T / tokens_b, with T the total tokens, so the
    output keeps T tokens split by the weights;
  * otherwise temperature sampling: w_b ∝ p_b^(1/temperature) with p_b the bucket's share
    (temperature 1 keeps the natural mixture; larger flattens it).
Rates are capped at `max_rate` (epochs of a bucket). Each document is emitted floor(r_b) times plus
once more with probability frac(r_b), decided by a hash of (seed, ordinal): the same documents
are picked whatever the number of workers. Dropped documents are counted as
`balance_downsampled`; extra copies are counted separately (they are not new input documents).
"""

from __future__ import annotations

import dataclasses
import hashlib

import gin

from llm.data.sources import Document


@gin.configurable("balance")
@dataclasses.dataclass(frozen=True)
class BalanceConfig:
    """See the module docstring. `weights` maps a bucket name ('web/en', joined with '/')
    to a weight; buckets not listed get weight 0 (dropped)."""

    bucket_by: tuple[str, ...] = ("source", "domain", "language")
    weights: tuple[tuple[str, float], ...] | None = None
    temperature: float = 1.0
    max_rate: float = 5.0
    seed: int = 0
    token_unit: str = "words"


def bucket(doc: Document, cfg: BalanceConfig) -> str:
    """The bucket name of a document, e.g. 'web/en'."""
    parts = []
    for f in cfg.bucket_by:
        v = doc.source if f == "source" else doc.metadata.get(f, "unknown")
        parts.append(str(v))
    return "/".join(parts)


def tokens(text: str, unit: str = "words") -> int:
    """Token estimate of a text."""
    if unit == "bytes":
        return (len(text.encode("utf-8")) + 3) // 4
    return len(text.split())


def analyze(docs: list[tuple[int, Document]], cfg: BalanceConfig = BalanceConfig()) -> dict:
    """{bucket: [documents, tokens]} of one unit."""
    out: dict[str, list[int]] = {}
    for _, d in docs:
        c = out.setdefault(bucket(d, cfg), [0, 0])
        c[0] += 1
        c[1] += tokens(d.text, cfg.token_unit)
    return out


def combine(partials, cfg: BalanceConfig = BalanceConfig()) -> dict:
    """{"before": {bucket: [docs, tokens]}, "rates": {bucket: rate}, "target": {bucket: share}}."""
    before: dict[str, list[int]] = {}
    for _, part in partials:
        for b, (n, t) in part.items():
            c = before.setdefault(b, [0, 0])
            c[0] += n
            c[1] += t
    total = sum(t for _, t in before.values()) or 1
    if cfg.weights:
        w = {b: float(dict(cfg.weights).get(b, 0.0)) for b in before}
    else:
        w = {b: (t / total) ** (1.0 / cfg.temperature) for b, (_, t) in before.items()}
    z = sum(w.values()) or 1.0
    target = {b: w[b] / z for b in before}
    rates = {b: min(cfg.max_rate, target[b] * total / t) if t else 0.0
             for b, (_, t) in before.items()}
    return {"before": before, "rates": rates, "target": target}


def copies(o: int, rate: float, seed: int) -> int:
    """How many times the document with ordinal `o` is emitted at sampling rate `rate`."""
    whole = int(rate)
    frac = rate - whole
    h = hashlib.blake2b(f"{seed}:{o}".encode(), digest_size=8).digest()
    u = int.from_bytes(h, "little") / 2**64
    return whole + (1 if u < frac else 0)


def apply(o: int, doc: Document, state: dict, cfg: BalanceConfig = BalanceConfig()
          ) -> Document | str | list[Document]:
    """The document 0..k times: `balance_downsampled` for 0, copies `id#k` for k > 1."""
    k = copies(o, state["rates"].get(bucket(doc, cfg), 1.0), cfg.seed)
    if k == 0:
        return "balance_downsampled"
    if k == 1:
        return doc
    return [doc] + [dataclasses.replace(doc, id=f"{doc.id}#copy{i}") for i in range(1, k)]
