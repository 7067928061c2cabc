"""Fixtures shared by the test folders: the tiny model, loaded once (placeholder weights: contracts only)."""

import os
import shutil
import tempfile

import pytest
from hypothesis import settings

# Hypothesis fails an example that takes longer than 200 ms by default: a timed assertion,
# which a loaded 2-core CI machine trips at random. Tests check results, never speed.
settings.register_profile("loomlens", deadline=None)
settings.load_profile("loomlens")


def pytest_configure(config):
    """What loomlens keeps per machine (timed attention kernels) goes to a folder of this test
    session, inherited by the commands tests run, never to the user's ~/.cache."""
    os.environ["LOOMLENS_CACHE_DIR"] = tempfile.mkdtemp(prefix="loomlens-cache-")


def pytest_unconfigure(config):
    shutil.rmtree(os.environ.pop("LOOMLENS_CACHE_DIR", ""), ignore_errors=True)


@pytest.fixture(scope="session")
def tiny():
    """`(model, processor)` of the embedded tiny Florence-2."""
    from loomlens.model import load_model

    return load_model("tiny")
