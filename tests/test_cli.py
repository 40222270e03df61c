"""The CLI's own surface: version, help with examples, export and check on a real nbdev project."""
import subprocess
from conftest import NBPROD
import nbprod


def cli(*args, cwd=None):
    return subprocess.run([NBPROD, *args], capture_output=True, text=True, cwd=cwd, env={'COLUMNS': '200', 'PATH': '/usr/bin:/bin'})


def test_version_and_help():
    assert cli('--version').stdout.strip() == f'nbprod {nbprod.__version__}'
    r = cli('--help')
    assert r.returncode == 0
    for cmd in ('run', 'runs', 'new', 'export', 'check'): assert cmd in r.stdout
    assert 'nbprod run nbs/train.ipynb -p alpha=0.5' in r.stdout
    r = cli('run', '--help')
    assert '-p' in r.stdout and '--profile' in r.stdout


def test_export_and_check_find_drift(tmp_path):
    r = cli('new', 'drift', '--dir', str(tmp_path))
    assert r.returncode == 0, r.stderr
    root = tmp_path/'drift'
    assert cli('check', cwd=root).returncode == 0
    mod = root/'drift'/'features.py'
    mod.write_text(mod.read_text() + '\nEXTRA = 1\n')
    r = cli('check', cwd=root)
    assert r.returncode == 1 and 'drift/features.py differs from what the notebooks export' in r.stderr
    assert cli('export', cwd=root).returncode == 0
    assert 'EXTRA' not in mod.read_text() and cli('check', cwd=root).returncode == 0
