"""Every public function documents Args, Returns and a runnable example, and cites its paper.

A References section belongs where a paper (or a reference implementation) is the
function's source, and only there: ``PAPERS`` lists those functions with a string that
identifies the paper (an arXiv id or a DOI), which the section must contain. A function
outside the list must not have one (``stats()`` citing Pascanu et al. for "monitoring the
gradient norm" sent readers to a paper that says nothing about it). A new public function
with a paper gets a line here.
"""

import inspect

import pytest

import optaxclip

PAPERS = {
    "adagc": "2502.11034",  # Wang et al. 2025
    "adaptive_grad_clip": "2102.06171",  # Brock et al. 2021
    "autoclip": "2007.14469",  # Seetharaman et al. 2020
    "clip_by_block_norm": "1211.5063",  # Pascanu et al. 2013, per block (Keras clipnorm)
    "clip_by_block_rms": "1804.04235",  # Shazeer & Stern 2018
    "clip_by_global_norm": "1211.5063",  # Pascanu et al. 2013
    "clip_by_value": "Mikolov",  # Mikolov 2012 (a thesis, no arXiv id)
    "clip_tree_by_global_norm": "1607.00133",  # Abadi et al. 2016 (per-example use)
    "diagnose": "1211.5063",  # Pascanu et al. 2013: a threshold set from observed norms
    "global_norm": "10.1145/355769.355771",  # Blue 1978: the overflow-safe norm
    "per_example_global_norm_clip": "1607.00133",  # Abadi et al. 2016
    "per_example_layer_norm_clip": "1710.06963",  # McMahan et al. 2018
    "skip_nonfinite": "1710.03740",  # Micikevicius et al. 2018
    "skip_nonfinite_microbatch": "1710.03740",  # Micikevicius et al. 2018
    "skip_spikes": "2204.02311",  # Chowdhery et al. 2022
    "spike_aware_clip": "2501.06842",  # Huang et al. 2025
    "unitwise_norm": "2102.06171",  # Brock et al. 2021
    "zclip": "2504.02507",  # Kumar et al. 2025
}

PUBLIC_FUNCTIONS = [
    name for name in optaxclip.__all__ if inspect.isfunction(getattr(optaxclip, name))
]
PUBLIC_METHODS = [
    f"{cls}.{name}"
    for cls in optaxclip.__all__
    if inspect.isclass(getattr(optaxclip, cls))
    for name, member in vars(getattr(optaxclip, cls)).items()
    if inspect.isfunction(member) and not name.startswith("_")
]


def _doc(name: str) -> str:
    obj = optaxclip
    for part in name.split("."):
        obj = getattr(obj, part)
    return inspect.getdoc(obj) or ""


def _references(doc: str) -> str | None:
    """The References section's text, or None when there is none."""
    if "References:" not in doc:
        return None
    return doc.split("References:", 1)[1].split("Examples:", 1)[0]


def test_there_are_public_functions():
    assert "clip_by_global_norm" in PUBLIC_FUNCTIONS and "stats" in PUBLIC_FUNCTIONS


def test_every_function_with_a_paper_is_public():
    assert not sorted(set(PAPERS) - set(PUBLIC_FUNCTIONS) - set(PUBLIC_METHODS))


@pytest.mark.parametrize("name", PUBLIC_FUNCTIONS)
def test_public_function_docstring_has_the_required_sections(name):
    doc = _doc(name)
    for section in ("Args:", "Returns:", "Examples:", ">>> "):
        assert section in doc, f"optaxclip.{name}'s docstring lacks {section!r}"


@pytest.mark.parametrize("name", PUBLIC_FUNCTIONS + PUBLIC_METHODS)
def test_references_cite_the_source_paper_and_appear_only_where_there_is_one(name):
    references = _references(_doc(name))
    if name in PAPERS:
        assert references is not None, f"optaxclip.{name}'s docstring lacks 'References:'"
        assert PAPERS[name] in references, (
            f"optaxclip.{name}'s References do not cite its paper ({PAPERS[name]})"
        )
    else:
        assert references is None, (
            f"optaxclip.{name} cites a paper but is not in PAPERS: if the paper is its "
            "source, add it to PAPERS in tests/test_docstrings.py; otherwise drop the "
            "References section"
        )
