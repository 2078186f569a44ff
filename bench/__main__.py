"""`python -m bench`: the whole benchmark (bench/suite.py); `./run.sh bench` runs it in a private network namespace."""

import sys

from bench.suite import main

sys.exit(main())
