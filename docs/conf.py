"""Sphinx configuration of the nbprod documentation site; build it with `make docs` (docs/build.py)."""

project = "nbprod"
author = "nbprod developers"
copyright = "nbprod developers"

# Only local extensions: the build must work offline (no intersphinx, nothing fetched).
extensions = ["myst_nb"]
exclude_patterns = ["_build", "**.ipynb_checkpoints", "Thumbs.db", ".DS_Store"]

# Notebooks are executed by nbdev-test elsewhere; the site shows their code, prose and stored outputs.
nb_execution_mode = "off"
# Lexer of code cells: docs/build.py gives every cleaned notebook a python `language_info` (myst-nb
# warns without one). Fences without a language keep Sphinx's "default": python, else plain text.

# `[text](#a-heading)` links inside pages, as Quarto allows.
myst_heading_anchors = 3

html_theme = "furo"
html_title = "nbprod"
