"""`python -m benchmarks`: run the benchmark (see benchmarks/run.py) and exit with its code."""

import sys

from benchmarks.run import main

if __name__ == "__main__":
    sys.exit(main())
