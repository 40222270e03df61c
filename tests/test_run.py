"""`nbprod run` end to end: a real Jupyter kernel, papermill, MLflow on SQLite, the CLI in a subprocess."""
import re, signal, time
from pathlib import Path

import nbformat
import pytest

from conftest import pid_alive, sigint_ignored
from nbprod.store import notebook_hash

PARAMS = "n = 3  # how many\nrate = 0.5\nname = 'x'\nflag = False"


def stored_paths(client, run_id):
    "Local paths of every artifact of a run."
    from nbprod.store import local_path
    root = local_path(client.get_run(run_id).info.artifact_uri)
    return sorted(p for p in root.rglob('*') if p.is_file())


def test_run_records_params_metrics_tags_and_output(project):
    nb = project.notebook('count', PARAMS,
                          "from nbprod import track\ntrack.log_metric('total', n * rate)",
                          "import sys\nassert 'mlflow' not in sys.modules, 'logging a metric imported MLflow in the kernel'",
                          "print(f'{name}:{n}:{flag}')")
    commit = project.commit()
    r = project.cli('run', 'nbs/count.ipynb', '-p', 'n=4', '-p', 'flag=true')
    assert r.returncode == 0, r.stderr
    [run] = project.runs()
    assert run.info.status == 'FINISHED' and run.info.run_id in r.stdout
    assert run.data.params == {'n': '4', 'flag': 'True'}
    assert run.data.metrics == {'total': 2.0}
    tags = run.data.tags
    assert tags['nbprod.git_commit'] == commit and tags['nbprod.git_dirty'] == 'false'
    assert tags['nbprod.notebook'] == 'nbs/count.ipynb'
    assert tags['nbprod.notebook_hash'] == notebook_hash(nbformat.read(nb, as_version=4))
    assert tags['nbprod.profile'] == 'DEFAULT' and tags['nbprod.version']
    names = [p.name for p in stored_paths(project.client(), run.info.run_id)]
    assert set(names) - {'kernel.log'} == {'count.html', 'count.ipynb'}
    out = nbformat.read(re.search(r'output notebook\s+(\S+)', r.stdout).group(1), as_version=4)
    assert out.cells[-1].outputs[0]['text'] == 'x:4:True\n'
    injected = [c for c in out.cells if 'injected-parameters' in c.metadata.get('tags', [])]
    assert 'n = 4' in injected[0].source
    assert 'total=2' in r.stdout


def test_in_notebook_api_logs_and_registers_a_model(project):
    project.notebook('train', "alpha = 1.0",
        "from sklearn.datasets import load_diabetes\nfrom sklearn.linear_model import Ridge\n"
        "X, y = load_diabetes(return_X_y=True, as_frame=True)\nmodel = Ridge(alpha=alpha).fit(X, y)",
        "from nbprod import track\ntrack.log_metric('r2', model.score(X, y))\n"
        "info = track.log_model(model, X_example=X, registered_name='diabetes', alias='champion')\n"
        "v = track.register_model('diabetes')\ntrack.set_alias('diabetes', 'challenger', v.version)")
    r = project.cli('run', 'nbs/train.ipynb', '-p', 'alpha=0.5')
    assert r.returncode == 0, r.stderr
    [run] = project.runs()
    c = project.client()
    champion = c.get_model_version_by_alias('diabetes', 'champion')
    challenger = c.get_model_version_by_alias('diabetes', 'challenger')
    assert (int(champion.version), int(challenger.version)) == (1, 2)
    assert champion.run_id == run.info.run_id == challenger.run_id
    import mlflow
    from mlflow.models import get_model_info
    mlflow.set_tracking_uri(project.settings().tracking_uri)
    mlflow.set_registry_uri(project.settings().registry_uri)   # models:/ URIs go to the registry (another test may have set it)
    info = get_model_info('models:/diabetes@champion')
    assert 'bmi' in info.signature.inputs.input_names()
    assert info.saved_input_example_info is not None
    model = mlflow.pyfunc.load_model('models:/diabetes@champion')
    from sklearn.datasets import load_diabetes
    X, _ = load_diabetes(return_X_y=True, as_frame=True)
    assert model.predict(X.head(2)).shape == (2,)
    assert not list(project.root.rglob('mlruns')), "models must land in the project's store"
    assert list((project.root/'.nbprod'/'artifacts').rglob('MLmodel'))


@pytest.mark.parametrize('args,message', [
    (['-p', 'nn=4'], "does not declare a parameter 'nn'"),
    (['-p', 'n=four'], "parameter 'n' of nbs/p.ipynb must be int, not 'four'"),
    (['-p', 'rate=fast'], "must be float, not 'fast'"),
    (['-p', 'flag=perhaps'], "must be bool, not 'perhaps'"),
    (['-p', 'n'], "write each parameter as -p name=value"),
])
def test_bad_parameters_are_refused_before_anything_starts(project, args, message):
    project.notebook('p', PARAMS, "open('kernel-started', 'w').write('yes')")
    r = project.cli('run', 'nbs/p.ipynb', *args)
    assert r.returncode == 2
    err = ' '.join(r.stderr.split())
    assert message in err, r.stderr
    if 'declare' in message or 'must be' in message:
        for line in ('n: int = 3 # how many', 'rate: float = 0.5', "name: str = 'x'", 'flag: bool = False'):
            assert line in err
    assert 'Traceback' not in r.stderr
    assert project.runs() == [] and not (project.root/'nbs'/'kernel-started').exists()


def test_missing_notebook_and_notebook_without_parameters(project):
    r = project.cli('run', 'nbs/nope.ipynb')
    assert r.returncode == 2 and 'no notebook at nbs/nope.ipynb' in r.stderr
    project.notebook('plain', None, "x = 1")
    r = project.cli('run', 'nbs/plain.ipynb', '-p', 'x=2')
    assert r.returncode == 2 and "has no parameters cell" in r.stderr and "tag the cell" in r.stderr
    assert project.runs() == []


def failed_run(project, r, ename):
    "Check what every failed run must leave behind; return the run and its stored notebook."
    assert r.returncode == 1, r.stdout + r.stderr
    assert 'Traceback' not in r.stderr
    [run] = project.runs()
    assert run.info.status == 'FAILED'
    assert run.data.tags['nbprod.error.ename'] == ename
    path = re.search(r'output notebook: (\S+)', r.stderr).group(1)
    nb = nbformat.read(path, as_version=4)
    assert nb.metadata.nbprod == {'run_id': run.info.run_id, 'status': 'FAILED'}
    assert 'papermill-error-cell-tag' in nb.cells[0].metadata.tags
    assert Path(path).with_suffix('.html').exists()
    return run, nb


def test_failing_cell_is_marked_and_reported(project):
    project.notebook('fail', "d = 1", "x = 10", "x / d", "print('never')")
    r = project.cli('run', 'nbs/fail.ipynb', '-p', 'd=0')
    run, nb = failed_run(project, r, 'ZeroDivisionError')
    assert 'cell:  3' in r.stderr and 'ZeroDivisionError: division by zero' in r.stderr
    assert run.data.tags['nbprod.error.cell_index'] == '3'
    failing = [c for c in nb.cells if c.cell_type == 'code' and any(o.output_type == 'error' for o in c.outputs)]
    assert [c.source for c in failing] == ['x / d']
    assert not nb.cells[-1].outputs  # the cell after the failure did not run


def test_kernel_death_is_recorded(project):
    project.notebook('die', "code = 3", "print('before')", "import os; os._exit(code)", "print('after')")
    r = project.cli('run', 'nbs/die.ipynb')
    run, nb = failed_run(project, r, 'DeadKernelError')
    assert 'the kernel died' in r.stderr and run.data.tags['nbprod.error.cell_index'] == '3'
    assert nb.cells[3].outputs[0]['text'] == 'before\n'


def test_cell_over_timeout_is_recorded(project):
    project.notebook('slow', "t = 60", "import time; time.sleep(t)")
    r = project.cli('run', 'nbs/slow.ipynb', env=project.env(NBPROD_CELL_TIMEOUT='3'))
    run, _ = failed_run(project, r, 'CellTimeoutError')
    assert 'past its timeout' in r.stderr
    assert run.info.end_time - run.info.start_time < 45_000


def _start_sleeper(project, ignore_sigint=False):
    "Start `nbprod run` on a notebook that writes its kernel's pid, then sleeps; return (process, kernel pid)."
    project.notebook('sleep', "t = 120", "import os; open('work.path', 'w').write(os.path.dirname(os.environ['NBPROD_RUN_FILE']))\n"
                     "from nbprod import track; track.log_metric('epoch_loss', 0.5, step=1); track.log_param('rows', 10)\n"
                     "print('started'); open('kernel.pid', 'w').write(str(os.getpid()))",
                     "import time; time.sleep(t)", "print('woke')")
    marker = project.root/'nbs'/'kernel.pid'
    proc = project.popen('run', 'nbs/sleep.ipynb', ignore_sigint=ignore_sigint)
    deadline = time.time() + 90
    while not (marker.exists() and marker.read_text()) and time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    while not project.runs() and time.time() < deadline:  # nbprod records the run while the kernel starts
        time.sleep(0.2)
    time.sleep(1)  # let the sleeping cell start
    return proc, int(marker.read_text())


@pytest.mark.parametrize('sig,name,ignored', [(signal.SIGINT, 'Ctrl-C', False), (signal.SIGTERM, 'SIGTERM', False),
                                               (signal.SIGINT, 'Ctrl-C', True)])   # started as a script's background job: SIGINT ignored
def test_interrupt_ends_killed_with_notebook_stored(project, sig, name, ignored):
    proc, kernel_pid = _start_sleeper(project, ignore_sigint=ignored)
    assert not sigint_ignored(proc.pid)        # nbprod listens for Ctrl-C even when it was started with SIGINT ignored
    deadline = time.time() + 20   # the kernel's metrics and parameters reach the run while it runs (two batches: one may come first)
    while not ((run := project.runs()[0]).data.metrics and run.data.params) and time.time() < deadline: time.sleep(0.2)
    assert run.info.status == 'RUNNING' and run.data.metrics == {'epoch_loss': 0.5} and run.data.params == {'rows': '10'}
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert f'run stopped by {name}' in err and 'Traceback' not in err
    [run] = project.runs()
    assert run.info.status == 'KILLED'
    nb = nbformat.read(re.search(r'output notebook: (\S+)', err).group(1), as_version=4)
    assert nb.metadata.nbprod['status'] == 'KILLED'
    deadline = time.time() + 20
    while pid_alive(kernel_pid) and time.time() < deadline: time.sleep(0.2)
    assert not pid_alive(kernel_pid), "the kernel outlived the run"


def _children(pid):
    "Process ids of the children of `pid` (from /proc)."
    from pathlib import Path
    return [int(c) for c in Path(f'/proc/{pid}/task/{pid}/children').read_text().split()]


def _wait_status(project, status, seconds=60):
    deadline = time.time() + seconds
    while time.time() < deadline:
        [run] = project.runs()
        if run.info.status == status: return run
        time.sleep(0.3)
    return run


def test_run_killed_outright_is_ended_by_its_recorder(project):
    import os
    proc, kernel_pid = _start_sleeper(project)
    proc.kill()  # SIGKILL: nbprod run cannot finish anything itself
    proc.communicate(timeout=30)
    run = _wait_status(project, 'KILLED')
    assert run.info.status == 'KILLED' and 'ended KILLED by its recorder' in run.data.tags['nbprod.reconciled']
    assert run.data.metrics == {'epoch_loss': 0.5}   # logged before the kill: kept
    names = {p.name: p for p in stored_paths(project.client(), run.info.run_id)}
    nb = nbformat.read(names['sleep.ipynb'], as_version=4)  # the notebook as papermill last saved it
    assert nb.metadata.nbprod['status'] == 'KILLED' and any('started' in str(c.get('outputs')) for c in nb.cells)
    work = Path((project.root/'nbs'/'work.path').read_text())
    deadline = time.time() + 30
    while work.exists() and time.time() < deadline: time.sleep(0.2)
    assert not work.exists(), "the private work folder (unscrubbed output) must not outlive the run"
    if pid_alive(kernel_pid): os.kill(kernel_pid, signal.SIGKILL)  # the orphaned kernel we started


def test_run_whose_processes_all_died_is_reconciled_by_runs(project):
    import os
    proc, kernel_pid = _start_sleeper(project)
    for pid in [*_children(proc.pid), proc.pid]:   # the recorder, the kernel, then nbprod run itself
        os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    [run] = project.runs()
    assert run.info.status == 'RUNNING'
    r = project.cli('runs')
    assert r.returncode == 0 and 'KILLED' in r.stdout
    [run] = project.runs()
    assert run.info.status == 'KILLED' and 'ended KILLED by nbprod' in run.data.tags['nbprod.reconciled']


def test_runs_lists_recent_runs(project):
    project.notebook('m', "v = 1.0", "from nbprod import track\ntrack.log_metric('score', v)")
    assert project.cli('runs').stdout.startswith('no runs yet')
    for v in ('0.25', '0.75'):
        assert project.cli('run', 'nbs/m.ipynb', '-p', f'v={v}').returncode == 0
    r = project.cli('runs', '--limit', '5')
    lines = [l for l in r.stdout.splitlines() if 'nbs/m.ipynb' in l]
    assert len(lines) == 2 and 'score=0.75' in lines[0] and 'score=0.25' in lines[1]
    assert all('FINISHED' in l for l in lines)
