"""pytest-benchmark files for fastlm: ``pytest benchmarks --benchmark-enable``. Knobs: see _bench_env.py."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
