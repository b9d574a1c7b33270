"""Shared test fixtures.

Tests that need the reference material in ``../shared`` (next to the checkout, or at
``$KPAC_SHARED``) skip with a clear reason when it is absent, as in a user's checkout.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _shared_root() -> Path | None:
    env = os.environ.get("KPAC_SHARED")
    for cand in ([Path(env)] if env else []) + [REPO.parent / "shared"]:
        if (cand / "reference").is_dir():
            return cand
    return None


SHARED = _shared_root()


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if SHARED is None:
        pytest.skip("reference material not found: place it at ../shared next to the checkout or set KPAC_SHARED")
    return SHARED


@pytest.fixture(autouse=True, scope="session")
def _few_threads():
    # The suite runs on small CI machines, often with xdist: keep each worker to one thread.
    torch.set_num_threads(1)
    yield
