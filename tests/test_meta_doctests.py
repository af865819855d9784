"""The Examples of the meta engine's docstrings run as written."""

import doctest

import pytest

import msr_loss.meta
import msr_loss.metamask
import msr_loss.virtual_step


@pytest.mark.parametrize("module", [msr_loss.meta, msr_loss.metamask, msr_loss.virtual_step])
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0
