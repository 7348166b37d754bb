"""Tasks for bench.py, in a module of their own so workers import them (pickled by reference)."""

import time
from pathlib import Path


def noop(*args):
    return None


def echo(value):
    return value


def burn_cpu(iterations):
    """Keep one core busy for a while; return the number of loop turns."""
    total = 0
    for n in range(iterations):
        total += n & 7
    return iterations


def touch_then_sleep(path, seconds):
    Path(path).touch()
    time.sleep(seconds)
