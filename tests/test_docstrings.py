"""The examples in the public docstrings run and print what they claim."""

import doctest
import importlib

import pytest

MODULES = [
    "fxfuse", "fxfuse._trace", "fxfuse._models", "fxfuse.passes._partition",
    "fxfuse._fuse", "fxfuse._export", "fxfuse.data", "fxfuse._grouping", "fxfuse.passes._spaces",
    "fxfuse._baselines", "fxfuse._npmerge", "fxfuse._importance", "fxfuse._recipe", "fxfuse.passes._depth",
    "fxfuse._finetune", "fxfuse.passes._affine", "fxfuse._blocks", "fxfuse._solve", "fxfuse._collect",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0
