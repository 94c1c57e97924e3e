"""Record types shared by every curation step and runner.

A document travels through the pipeline as `(ordinal, Document)`. The ordinal is a 64-bit
integer `unit << 32 | index` fixed at read time: it orders the corpus the same way whatever the
number of workers or the runner, so "which copy survives" and "which removed examples are
shown" never depend on scheduling.
"""

from __future__ import annotations

import dataclasses

from llm.data.sources import DataError, Document

SAMPLE_CHARS = 1000  # characters of a removed document kept for the audit sample


class CurationError(DataError):
    """A curation run cannot proceed (bad config, broken accounting, stale work dir)."""


@dataclasses.dataclass(frozen=True)
class Rejected:
    """An input unit that could not become a Document (bad bytes, bad JSON, a binary file...).

    It counts as one input document removed at the `read` step under `reason`.
    """

    id: str
    source: str
    reason: str
    sample: str = ""
    metadata: dict = dataclasses.field(default_factory=dict)


def ordinal(unit: int, index: int) -> int:
    """The global, runner-independent position of record `index` of input unit `unit`."""
    if index >= 1 << 32:
        raise CurationError(f"Input unit {unit} holds more than 2**32 records; split the file "
                            "into smaller files.")
    return (unit << 32) | index


def sample_of(text: str) -> str:
    """The first `SAMPLE_CHARS` characters of a removed document, for the audit sample."""
    return text if len(text) <= SAMPLE_CHARS else text[:SAMPLE_CHARS] + " [...]"
