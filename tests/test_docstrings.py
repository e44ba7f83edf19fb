"""Every public function documents Args, Returns, References and a runnable example."""

import inspect

import pytest

import optaxclip

PUBLIC_FUNCTIONS = [
    name
    for name in optaxclip.__all__
    if inspect.isfunction(getattr(optaxclip, name))
]


def test_there_are_public_functions():
    assert "clip_by_global_norm" in PUBLIC_FUNCTIONS and "stats" in PUBLIC_FUNCTIONS


@pytest.mark.parametrize("name", PUBLIC_FUNCTIONS)
def test_public_function_docstring_has_the_required_sections(name):
    doc = inspect.getdoc(getattr(optaxclip, name)) or ""
    for section in ("Args:", "Returns:", "References:", "Examples:", ">>> "):
        assert section in doc, f"optaxclip.{name}'s docstring lacks {section!r}"
