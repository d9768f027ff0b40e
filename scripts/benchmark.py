"""Benchmark fedtwin and write the figures to one JSON file.

The benchmarks live in `benchmarks/` at the repository root, one module per part; this
script is kept for existing users and is the same as `python -m benchmarks`:

    python scripts/benchmark.py --out runs/benchmark.json [--quick] [--parts ...] ...
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.run import main

if __name__ == "__main__":
    sys.exit(main())
