"""Sphinx configuration of the nbprod documentation site; build it with `make docs` (docs/build.py)."""

project = "nbprod"
author = "nbprod developers"
copyright = "nbprod developers"

# Only local extensions: the build must work offline (no intersphinx, nothing fetched).
extensions = ["myst_nb"]
exclude_patterns = ["_build", "**.ipynb_checkpoints", "Thumbs.db", ".DS_Store"]

# Notebooks are executed by nbdev-test elsewhere; the site shows their code, prose and stored outputs.
# (docs/build.py gives each cleaned notebook a kernelspec and a python `language_info`, the lexer
# myst-nb needs for code cells; fences without a language use Sphinx's default: python, else plain.)
nb_execution_mode = "off"
# No remote scripts: MathJax would come from a CDN, so LaTeX outputs show their text/plain form.
nb_mime_priority_overrides = [("html", "text/latex", None)]

# `[text](#a-heading)` links inside pages, as Quarto allows.
myst_heading_anchors = 3

html_theme = "furo"
html_title = "nbprod"
