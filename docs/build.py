"""Build the offline documentation site: clean the notebooks into docs/api/, then run Sphinx strictly."""
from __future__ import annotations

import argparse, re, shutil, subprocess, sys
from pathlib import Path

import nbformat

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
API, OUT = DOCS/"api", DOCS/"_build"

# An nbdev/Quarto directive line: `#| name`, `#|name: value`, `# | name` ...
_DIRECTIVE = re.compile(r"^\s*#\s*\|\s*([^\s:]+)\s*:?\s*(.*?)\s*$")
_HIDE_LINE = re.compile(r"#\s*\|\s*hide_line\s*$")
_FALSE = {"false", "False", "no"}
# nbdev's title cell: `# Title`, `> description`, optional `- key: value` frontmatter lines
_TITLE, _SUBTITLE, _FRONTMATTER = re.compile(r"^#\s+\S"), re.compile(r"^>\s*(.*)$"), re.compile(r"^-\s+\S.*:.*\S\s*$")
_ASSETS = {".png", ".jpg", ".jpeg", ".gif", ".svg", ".webp"}
# A page resource (not a plain hyperlink) fetched from the network: the site must work offline
_REMOTE = re.compile(r"<(?:script|img|link|iframe|source|video|audio)\b[^>]*?\b(?:src|href)=[\"'](?:https?:)?//[^\"']*", re.I)
_LANG = {"name": "python", "pygments_lexer": "ipython3"}
_KERNEL = {"name": "python3", "display_name": "Python 3", "language": "python"}


class BuildError(Exception):
    """A problem reported as one line, without a traceback."""


def split_directives(source: str) -> tuple[dict, str]:
    """Return the `#|` directives of a code cell and its source without them."""
    directives, kept = {}, []
    for line in source.splitlines():
        if m := _DIRECTIVE.match(line):
            directives[m[1]] = m[2]
        elif not _HIDE_LINE.search(line):
            kept.append(line)
    return directives, "\n".join(kept).strip("\n")


def clean_code_cell(cell):
    """Apply nbdev's directives to a code cell; None when the cell is dropped."""
    d, cell.source = split_directives(cell.source)
    if "hide" in d or d.get("include") in _FALSE or not cell.source.strip():
        return None
    if d.get("output") in _FALSE:
        cell.outputs, cell.execution_count = [], None
    if d.get("echo") in _FALSE:
        tags = cell.metadata.setdefault("tags", [])
        if "remove-input" not in tags:
            tags.append("remove-input")
    return cell


def clean_title(cells: list, fallback: str) -> list:
    """Keep nbdev's `# Title` as the H1, turn `> subtitle` into a paragraph and drop `- key: value` lines."""
    first = next((c for c in cells if c.cell_type == "markdown"), None)
    lines = first.source.splitlines() if first else []
    if not any(_TITLE.match(l) for l in lines):  # no title: the page still needs one
        return [nbformat.v4.new_markdown_cell(f"# {fallback}")] + cells
    out, described = [], False
    for line in lines:
        if (m := _SUBTITLE.match(line)) and not described:
            out.append(m[1])
            described = True
        elif not _FRONTMATTER.match(line):
            out.append(line)
    first.source = "\n".join(out)
    return cells


def clean_notebook(nb, fallback_title: str):
    """Return `nb` cleaned the way nbdev's Quarto processors would render it."""
    cells = []
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell = clean_code_cell(cell)
        elif cell.cell_type == "raw" and cell.source.strip().startswith("---"):
            cell = None  # a raw YAML frontmatter cell is Quarto metadata, not content
        if cell is not None:
            cells.append(cell)
    nb.cells = clean_title(cells, fallback_title)
    # a lexer for the code cells (myst-nb warns without one) and a kernelspec for the page
    nb.metadata["language_info"] = {**_LANG, **nb.metadata.get("language_info", {})}
    nb.metadata.setdefault("kernelspec", _KERNEL)
    return nb


def find_notebooks(nbs: Path) -> list[Path]:
    """Notebooks under `nbs`, in file order, skipping checkpoints and `_`/`.` names like nbdev does."""
    if not nbs.is_dir():
        raise BuildError(f"notebook folder {nbs} does not exist (pass --nbs PATH)")
    found = [p for p in nbs.rglob("*.ipynb")
             if not any(part.startswith(("_", ".")) for part in p.relative_to(nbs).parts)]
    if not found:
        raise BuildError(f"no notebooks found under {nbs}")
    # nbdev's index.ipynb is the project's home page: list it first
    return sorted(found, key=lambda p: (p.relative_to(nbs) != Path("index.ipynb"), p.relative_to(nbs).as_posix()))


def title_from(path: Path) -> str:
    """A fallback page title from a file name: `02_run_notebook` -> `Run notebook`."""
    name = re.sub(r"^\d+[_-]", "", path.stem).replace("_", " ")
    return name[:1].upper() + name[1:]


def write_api(nbs: Path) -> list[str]:
    """Write cleaned copies of the notebooks (and their images) to docs/api/; return the doc names."""
    shutil.rmtree(API, ignore_errors=True)
    docnames = []
    for src in find_notebooks(nbs):
        rel = src.relative_to(nbs)
        if rel == Path("index.ipynb"):
            rel = Path("overview.ipynb")  # docs/api/index.md is the API table of contents
        try:
            nb = nbformat.read(src, as_version=4)
        except Exception as e:
            raise BuildError(f"cannot read notebook {src}: {e}") from None
        dest = API/rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(clean_notebook(nb, title_from(src)), dest)
        docnames.append(rel.with_suffix("").as_posix())
    # images the notebooks reference with relative paths
    for src in nbs.rglob("*"):
        rel = src.relative_to(nbs)
        if src.suffix.lower() in _ASSETS and not any(p.startswith(".") for p in rel.parts):
            (API/rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, API/rel)
    return docnames


def write_index(docnames: list[str]) -> None:
    """Write docs/api/index.md: a toctree of the cleaned notebooks in file order."""
    entries = "\n".join(docnames)
    (API/"index.md").write_text(
        "# API reference\n\n"
        "One page per notebook under `nbs/`: the prose, the exported code and the examples that\n"
        "`nbdev-test` runs. Pages show code as written; they are not executed during the build.\n\n"
        f"```{{toctree}}\n:maxdepth: 1\n\n{entries}\n```\n")


def leftover_directives() -> list[str]:
    """Cleaned pages whose code still holds an nbdev `#|` line (a check on the cleaning itself)."""
    found = []
    for page in sorted(API.rglob("*.ipynb")):
        for cell in nbformat.read(page, as_version=4).cells:
            if cell.cell_type == "code" and any(_DIRECTIVE.match(l) for l in cell.source.splitlines()):
                found.append(f"{page.relative_to(ROOT)}: {cell.source.splitlines()[0]}")
    return found


def sphinx() -> int:
    """Run Sphinx with warnings as errors on a fresh output folder; return its exit code."""
    shutil.rmtree(OUT, ignore_errors=True)  # a fresh build re-reads every page, so no warning is skipped
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-n", "-b", "html", str(DOCS), str(OUT/"html")]
    return subprocess.run(cmd, cwd=ROOT).returncode


def remote_resources(html: Path) -> list[str]:
    """Pages that load scripts, styles or images from the network, with the first such tag."""
    found = []
    for page in sorted(html.rglob("*.html")):
        if m := _REMOTE.search(page.read_text(encoding="utf-8")):
            found.append(f"{page.relative_to(ROOT)}: {m[0]}")
    return found


def main(argv=None) -> int:
    """Entry point of `make docs`."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--nbs", type=Path, default=ROOT/"nbs", help="notebook folder (default: nbs/ at the repo root)")
    args = ap.parse_args(argv)
    try:
        docnames = write_api(args.nbs.resolve())
    except BuildError as e:
        print(f"docs: error: {e}", file=sys.stderr)
        return 2
    write_index(docnames)
    if leftover := leftover_directives():
        print("docs: error: nbdev directives left in the site's code:", *leftover, sep="\n  ", file=sys.stderr)
        return 1
    print(f"docs: cleaned {len(docnames)} notebook(s) into {API.relative_to(ROOT)}/")
    if rc := sphinx():
        print("docs: error: sphinx-build failed (warnings are errors); see the messages above", file=sys.stderr)
        return rc
    if remote := remote_resources(OUT/"html"):
        print("docs: error: the site must work offline, but these pages load remote resources:",
              *remote, sep="\n  ", file=sys.stderr)
        return 1
    print(OUT/"html"/"index.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
