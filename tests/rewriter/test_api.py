"""The public entry point's docstring example runs as written."""
from __future__ import annotations

import doctest

import peftfx.api


def test_compile_docstring_example_runs():
    result = doctest.testmod(peftfx.api, raise_on_error=False)
    assert result.attempted >= 3 and result.failed == 0
