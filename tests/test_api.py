"""The public API is typed: every public function (and public method of a public class)
annotates each parameter and its return value, and the annotations resolve."""

import inspect
import pathlib
import typing

import pytest

import optaxclip


def _public_callables():
    for name in optaxclip.__all__:
        obj = getattr(optaxclip, name)
        if inspect.isfunction(obj):
            yield name, obj
        elif inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if inspect.isfunction(member) and not attr.startswith("_"):
                    yield f"{name}.{attr}", member


PUBLIC = dict(_public_callables())


def test_all_names_exist_and_are_unique():
    assert len(set(optaxclip.__all__)) == len(optaxclip.__all__)
    for name in optaxclip.__all__:
        assert hasattr(optaxclip, name), name
    assert len(PUBLIC) >= 15  # every transform, norm, stats and diagnose


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_public_function_is_fully_annotated(name):
    fn = PUBLIC[name]
    signature = inspect.signature(fn)
    missing = [
        p.name
        for p in signature.parameters.values()
        if p.name not in ("self", "cls") and p.annotation is inspect.Parameter.empty
    ]
    assert not missing, f"{name}: parameters without a type annotation: {missing}"
    assert signature.return_annotation is not inspect.Signature.empty, (
        f"{name}: no return annotation"
    )
    # The annotations name real objects (no typos hidden by `from __future__ import
    # annotations`).
    typing.get_type_hints(fn)


def test_package_ships_its_typing_marker():
    assert (pathlib.Path(optaxclip.__file__).parent / "py.typed").is_file()
