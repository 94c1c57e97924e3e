"""Command line for `llm.data.prepare`: corpus -> SentencePiece -> ArrayRecord shards.

    python -m tools.prepare_data --data_dir=data/embedded [--gin_file=...] [--gin_param=...]
"""

import sys

from llm.data.prepare import main

if __name__ == "__main__":
    sys.exit(main())
