"""Data curation: sources -> scrub -> dedup -> filter -> PII -> decontaminate -> balance.

One module per step (normalize, boilerplate, exact_dedup, minhash, quality, language, toxicity,
pii, decontam, balance), lenient readers (readers), the step registry (steps), and two runners
sharing the same per-unit code (local: multiprocessing; beam_runner: Apache Beam). The entry
point is `run.curate`, driven by `python -m tools.curate --gin_file=...`. See docs/curation.md.
"""
