"""Shared fixtures: deterministic seeds, one torch thread, and the tiny model zoo."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # the zoo module beside the tests

torch.set_num_threads(1)  # tests measure nothing; one thread keeps two-core CI steady


@pytest.fixture(autouse=True)
def seed() -> Iterator[None]:
    torch.manual_seed(0)
    yield
