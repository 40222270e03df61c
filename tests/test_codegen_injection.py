"""Generated code cannot be injected. For each string that could end a string, a comment or a bracket, and a payload that
would create a file if it ran, put in every value from pyproject.toml and the notebooks that lands in apps/serve.py or a
page (project name, registered model, aliases, pre/postprocess, app title, notebook heading and path, parameter defaults
and labels, markdown): `nbprod apps` writes files that compile, import (serve.py) or run (pages, in AppTest) without
creating the file and hold each value exactly, and `nbprod check` passes right after and fails after a one-byte edit,
naming the file and `nbprod apps`. Values that cannot be what they name (a URL segment, an app's name) are refused."""
import ast, json, subprocess, sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from conftest import NBPROD, Project

BREAKERS = ['"""', "'''", "'", '"', '\\', '\r', '\n', ')', ']', '}', '\u2028']
CASES = [*BREAKERS, 'payload']
toml = json.dumps   # a JSON string is a TOML basic string


def payload(marker: Path) -> str:
    return f'"""; import os; os.system("touch {marker}") #'


def write_project(root: Path, bad: str):
    "A project whose every generated value holds `bad`: a served model, an app titled in pyproject.toml, an app titled by its heading."
    root.mkdir(parents=True)
    b = lambda s: s.replace('BAD', bad)
    (root/'pyproject.toml').write_text(
        f'[project]\nname = {toml(b("projBAD"))}\n\n[tool.nbdev]\nlib_path = "proj"\nnbs_path = "nbs"\njupyter_hooks = false\nallowed_cell_metadata_keys = ["tags"]\n\n'
        f'[tool.nbprod]\nexperiment = "proj"\n\n[tool.nbprod.serve.models.bikes]\nregistered_model = {toml(b("mBADm"))}\n'
        f'champion = {toml(b("cBADc"))}\nchallenger = {toml(b("nBADn"))}\nchallenger_weight = 0.25\n'
        f'preprocess = {toml(b("proj.f:preBADx"))}\npostprocess = {toml(b("proj.f:postBADx"))}\n\n'
        f'[tool.nbprod.apps.inj]\nnotebook = "nbs/01_inj.ipynb"\ntitle = {toml(b("TBAD"))}\n\n'
        f'[tool.nbprod.apps.head]\nnotebook = {toml(head_path(bad))}\n', encoding='utf-8')
    (root/'settings.ini').write_text('[DEFAULT]\n')
    flat = bad.replace('\n', ' ').replace('\r', ' ').replace('\u2028', ' ')     # what a comment can hold
    params = (f"from pathlib import Path\ns = {bad_literal('v', bad)}  # say {flat}\n"
              f"d = ['a#',\n     {bad_literal('', bad)}, 1]\np = Path({bad_literal('', bad)})")
    for rel in ('nbs/01_inj.ipynb', head_path(bad)):
        nb = new_notebook(cells=[new_markdown_cell(b("# HBADx")), new_code_cell(params, metadata={'tags': ['parameters']}),
                                 new_markdown_cell(b("Note BAD here"), metadata={'tags': ['app']}),
                                 new_code_cell("#| app\nst.code(repr((s, d, str(p))))")])
        nb.metadata.kernelspec = {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'}
        (root/rel).parent.mkdir(exist_ok=True)
        nbformat.write(nb, root/rel)


def bad_literal(prefix, bad): return repr(prefix + bad)   # how the notebook's author writes the string


def head_path(bad: str) -> str:
    "The second app's notebook: its name holds `bad` too (not / or {}: a folder, and papermill formats paths)."
    return f"nbs/02_{'' if set('/{}') & set(bad) else bad}x.ipynb"


@pytest.fixture(scope='module')
def projects(tmp_path_factory):
    "`{case: (root, bad, marker)}`, each project generated with `nbprod apps` and exported with nbdev."
    base = tmp_path_factory.mktemp('inject')
    marker = base/'PWNED'
    out = {}
    for i, case in enumerate(CASES):
        bad = payload(marker) if case == 'payload' else case
        root = base/f'p{i}'
        write_project(root, bad)
        p = Project(root)
        for cmd in ('nbdev-export', 'nbdev-clean'):   # `nbprod check` compares the package with the notebooks' export too
            r = subprocess.run([str(Path(sys.executable).parent/cmd)], cwd=root, capture_output=True, text=True)
            assert r.returncode == 0, (cmd, r.stdout, r.stderr)
        r = p.cli('apps')
        assert r.returncode == 0, (case, r.stdout, r.stderr)
        out[case] = (root, bad, marker)
    assert not marker.exists()
    return out


def expected_models(bad):
    return {'bikes': {'route': 'POST /v1/models/bikes/predict', 'registered_model': f'm{bad}m', 'champion': f'c{bad}c',
                      'challenger': f'n{bad}n', 'challenger_weight': 0.25, 'preprocess': f'proj.f:pre{bad}x', 'postprocess': f'proj.f:post{bad}x'}}


IMPORT = '''
import importlib.util, json, sys
from pathlib import Path
out = {}
for path in sys.argv[1:]:
    spec = importlib.util.spec_from_file_location('serve_' + str(len(out)), path)
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    out[path] = {'PROJECT': mod.PROJECT, 'MODELS': mod.MODELS, 'app': type(mod.app).__name__}
print(json.dumps(out))
'''


def test_serve_py_imports_without_running_injected_code_and_holds_each_value(projects):
    paths = {case: root/'apps'/'serve.py' for case, (root, _, _) in projects.items()}
    for case, path in paths.items():
        text = path.read_bytes().decode('utf-8')
        assert [type(n).__name__ for n in ast.parse(text).body] == ['Expr', 'ImportFrom', 'ImportFrom', 'ImportFrom', 'Assign', 'Assign', 'Assign'], case
    r = subprocess.run([sys.executable, '-c', IMPORT, *map(str, paths.values())], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    marker = next(iter(projects.values()))[2]
    assert not marker.exists(), "importing a generated apps/serve.py ran injected code"
    for case, (root, bad, _) in projects.items():
        assert got[str(paths[case])] == {'PROJECT': f'proj{bad}', 'MODELS': expected_models(bad), 'app': 'Application'}, case


def test_pages_run_without_running_injected_code_and_show_each_value(projects):
    from streamlit.testing.v1 import AppTest
    for case, (root, bad, marker) in projects.items():
        for page, title in [('inj', f'T{bad}'), ('head', f'H{bad}x'.split('\n')[0])]:
            path = root/'apps'/'pages'/f'{page}.py'
            text = path.read_bytes().decode('utf-8')
            first = text.split('\n', 1)[0]
            assert first.endswith('DO NOT EDIT: change the notebook,') and len(text.splitlines()[0]) == len(first), (case, first)
            [arg] = [n.args[0] for n in ast.walk(ast.parse(text)) if isinstance(n, ast.Call) and ast.unparse(n.func) == 'st.title']
            assert ast.literal_eval(arg) == title, case
            at = AppTest.from_file(str(path), default_timeout=60).run()
            assert not at.exception, (case, at.exception)
            assert not marker.exists(), f"running the page generated for {case!r} ran injected code"
            assert ast.literal_eval(at.code[0].value) == ('v' + bad, ['a#', bad, 1], str(Path(bad))), case
            assert at.title[0].value == title.strip() and at.markdown[0].value == f'Note {bad} here', case   # Streamlit strips a title's ends
            if '\n' not in bad and '\r' not in bad and '\u2028' not in bad and '#' not in bad:
                assert at.text_input(key='s').label == f'say {bad}'.strip(' :-'), case


def check(root):
    return subprocess.run([NBPROD, 'check'], cwd=root, capture_output=True, text=True, timeout=300,
                          env=Project(root).env())


@pytest.mark.parametrize('case', CASES)
def test_check_passes_then_fails_after_a_one_byte_edit(projects, case):
    root, bad, _ = projects[case]
    r = check(root)
    assert r.returncode == 0, (case, r.stdout, r.stderr)
    for rel in ('apps/serve.py', 'apps/pages/inj.py'):
        path = root/rel
        data = path.read_bytes()
        i = data.index(b'\n')
        path.write_bytes(data[:i] + b'\r' + data[i:])           # one byte: invisible to read_text
        r = check(root)
        source = '[tool.nbprod.serve]' if rel == 'apps/serve.py' else 'its notebook'
        assert r.returncode == 1 and f'{rel} differs from {source} (run nbprod apps)' in ' '.join(r.stderr.split()), (case, r.stderr)
        path.write_bytes(data)
    assert check(root).returncode == 0


def test_values_that_cannot_be_names_are_refused(project):
    "A served model's name is a URL segment and an app's a file name: refused, naming the file, the table and what is allowed."
    root = project.root
    base = (root/'pyproject.toml').read_text()
    (root/'pyproject.toml').write_text(base + '\n[tool.nbprod.serve.models."bikes\\"\\"\\"; import os #"]\nregistered_model = "m"\n')
    r = project.cli('apps')
    msg = ' '.join(r.stderr.split())
    assert r.returncode == 2 and "a served model's name must be letters, digits, - and _" in msg and 'pyproject.toml' in msg, r.stderr
    assert not (root/'apps'/'serve.py').exists()
    (root/'nbs').mkdir()
    nbformat.write(new_notebook(cells=[new_code_cell("#| app\nx = 1")]), root/'nbs'/'01_a.ipynb')
    (root/'pyproject.toml').write_text(base + '\n[tool.nbprod.apps."a\\n"]\nnotebook = "nbs/01_a.ipynb"\n')
    r = project.cli('apps')
    msg = ' '.join(r.stderr.split())
    assert r.returncode == 2 and 'bad app name' in msg and "value 'a\\n'" in msg and 'allowed: lowercase letters, digits and _' in msg, r.stderr
    assert not (root/'apps').exists()
