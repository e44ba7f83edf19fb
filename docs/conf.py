"""Sphinx configuration for optaxclip's documentation.

Build with ``sphinx-build -W -b html docs docs/_build/html`` (``tests/test_docs.py`` does
the same with ``--keep-going`` and checks that every public name has an API entry).
The notebooks are rendered with the outputs stored in them and never executed here:
``tests/test_notebooks.py`` executes them.
"""

from __future__ import annotations

import optaxclip

project = "optaxclip"
author = "the optaxclip authors"
copyright = "the optaxclip authors"  # noqa: A001 (Sphinx's name for it)
release = optaxclip.__version__
version = release

extensions = [
    "myst_nb",  # MyST markdown pages and .ipynb notebooks (it registers myst-parser)
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",  # Google-style Args/Returns/References/Examples
    "sphinx.ext.mathjax",
]

# docs/notebooks is a link to ../notebooks, so the notebooks have one home.
exclude_patterns = ["_build", "**/.ipynb_checkpoints", "Thumbs.db", ".DS_Store"]
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}
root_doc = "index"

# MyST: $math$ in the notebooks, ::: fences, and #anchors for headings down to level 3.
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3

# myst-nb: render the stored outputs and pictures; never run a notebook here.
nb_execution_mode = "off"
nb_merge_streams = True

# autodoc + napoleon: the docstrings are Google style.
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True
add_module_names = False

html_theme = "sphinx_book_theme"
html_title = "optaxclip"
html_theme_options = {
    "show_toc_level": 2,
    "navigation_with_keys": False,
}
html_static_path = ["_static"]
html_css_files = ["custom.css"]
