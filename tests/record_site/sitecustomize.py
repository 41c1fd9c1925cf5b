"""Test machinery: with RECORD_BATCHES_DIR set, every Python process started with this folder on
PYTHONPATH records the batches its loader clients return (tests/record_batches.py), so that a
command from the README runs exactly as written (torchrun starts the ranks) and is still checked."""

import os
import sys

if os.environ.get("RECORD_BATCHES_DIR"):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from tests.record_batches import install

    install(os.environ["RECORD_BATCHES_DIR"])
