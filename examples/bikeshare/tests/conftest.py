"""The replay runs once per test session, in a copy of the project: tests/test_replay.py checks what it printed and
recorded, tests/test_dashboard.py shows the store it filled in the dashboard (AppTest and a real browser)."""
import os, shutil, subprocess, sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith('NBPROD_')}
    env.update(COLUMNS='200', NO_COLOR='1', **extra)
    return env


@pytest.fixture(scope='session')
def replayed(tmp_path_factory):
    "`(project root, the replay's CompletedProcess)`: July and August 2011 served to a real endpoint (`nbprod serve`), labels a week late."
    from nbprod.serving import free_port
    root = tmp_path_factory.mktemp('replay')/'bikeshare'
    shutil.copytree(ROOT, root, ignore=shutil.ignore_patterns('.nbprod', '.nbprod-replay', 'processed', 'reports', '__pycache__', 'output',
                                                              '.pytest_cache', '.ipynb_checkpoints', '.venv', 'build'))
    r = subprocess.run([sys.executable, 'scripts/replay.py', '--months', '7,8'], cwd=root, capture_output=True, text=True,
                       timeout=1200, env=clean_env(NBPROD_SERVE_PORT=str(free_port())))
    assert r.returncode == 0, r.stdout + r.stderr
    return root, r
