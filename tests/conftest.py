"""pytest fixtures; the shared helpers live in tests/helpers.py."""

import pytest

from helpers import QUICK


@pytest.fixture
def quick():
    return list(QUICK)
