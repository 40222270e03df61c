"""`nbprod new`: a scaffolded project passes its own `make test` (on nbprod's own venv), and bad targets write nothing."""
import os, subprocess, sys
from pathlib import Path

import pytest

from nbprod.errors import ScaffoldError
from nbprod.scaffold import new_project

VENV = Path(sys.executable).parent.parent


def snapshot(d: Path):
    return sorted((str(p.relative_to(d)), p.stat().st_mtime_ns) for p in d.rglob('*'))


@pytest.fixture(scope='module')
def made(tmp_path_factory):
    "A project scaffolded into a fresh folder, after `make test VENV=<this venv>` ran in it."
    root = new_project(tmp_path_factory.mktemp('new')/'bike-share')
    env = {k: v for k, v in os.environ.items() if not k.startswith('NBPROD_') and k not in ('IN_TEST', 'MAKEFLAGS', 'MFLAGS')}
    r = subprocess.run(['make', 'test', f'VENV={VENV}'], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    return root, r


def test_scaffold_passes_its_own_make_test(made):
    root, r = made
    assert r.returncode == 0, f"make test failed in {root}:\n{r.stdout}\n{r.stderr}"
    assert 'package matches the notebooks' in r.stdout
    assert '1 passed' in r.stdout


def test_scaffold_runs_stay_in_its_store(made):
    "Runs, models and artifacts go to the project's .nbprod/ store: nothing else appears in the project."
    root, r = made
    assert r.returncode == 0
    out = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=normal'], cwd=root, capture_output=True, text=True).stdout
    found = sorted(line[3:].rstrip('/') for line in out.splitlines())
    assert found == ['.gitignore', 'Makefile', 'README.md', 'apps', 'bike_share', 'docs', 'nbs', 'pyproject.toml',
                     'settings.ini', 'tests'], (
        f"unexpected files after make test: {found}" + ("; mlruns/ means MLflow wrote outside the store (a logged model "
        "in the Default experiment 0, whose artifacts live in ./mlruns): the run's experiment must be the active one "
        "when nbprod.track.log_model logs" if 'mlruns' in found else ""))
    assert (root/'.nbprod'/'mlflow.db').exists()


def test_existing_nonempty_folder_is_refused(tmp_path):
    (tmp_path/'proj').mkdir()
    (tmp_path/'proj'/'notes.txt').write_text('mine')
    before = snapshot(tmp_path)
    with pytest.raises(ScaffoldError, match='already exists and is not empty') as e:
        new_project(tmp_path/'proj')
    assert 'choose another name or pass --force' in str(e.value)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize('name, message', [('Bike Share', "'Bike Share' is not a valid project name; allowed: lowercase letters"),
                                           ('2fast', "'2fast' is not a valid project name"),
                                           ('import', 'shadows a Python keyword'),
                                           ('json', 'shadows a standard-library module'),
                                           ('nbprod', 'shadows nbprod itself')])
def test_bad_names_are_refused(tmp_path, name, message):
    with pytest.raises(ScaffoldError, match=message):
        new_project(tmp_path/name)
    assert list(tmp_path.iterdir()) == []


def test_force_writes_into_a_nonempty_folder(tmp_path):
    (tmp_path/'demo').mkdir()
    (tmp_path/'demo'/'notes.txt').write_text('mine')
    root = new_project(tmp_path/'demo', force=True)
    assert (root/'notes.txt').read_text() == 'mine'
    assert (root/'demo'/'features.py').exists() and (root/'nbs'/'train.ipynb').exists()
