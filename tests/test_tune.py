"""`nbprod tune` on real Ray Tune and MLflow on SQLite: grid, random and Optuna searches, ASHA early stopping, failed trials,
resume after the driver is killed, GPU resources (Ray's logical GPUs), bad spaces, notebook targets.

The searches with a function target run in this process on one Ray shared by the module (`run_tune` connects to it);
the notebook target, the kill-and-resume and the bad spaces go through the `nbprod tune` CLI in a subprocess."""
import os, signal, subprocess, sys, time
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from conftest import Project, stop_ray_node

TRAIN = '''
import time
from nbprod import track

def quad(x: float = 0.0, y: int = 0, kind: str = "a"):
    if kind == "bad": raise ValueError(f"kind {kind!r} is not allowed")
    return {"loss": (x - 0.5) ** 2 + y}

def curve(x: float = 0.0, epochs: int = 8):
    for i in range(epochs):
        time.sleep(0.2)
        track.report({"loss": (x - 1) ** 2 + 1 / (i + 1)}, step=i)

def fit(alpha: float = 1.0):
    import numpy as np
    from sklearn.linear_model import Ridge
    X = np.arange(40.0).reshape(-1, 2)
    y = X @ [1.0, 2.0] + np.sin(X[:, 0])
    model = Ridge(alpha=alpha).fit(X, y)
    track.log_model(model, X_example=X)
    return {"rmse": float(np.sqrt(((model.predict(X) - y) ** 2).mean()))}

def slow(x: int = 0):
    time.sleep(2.0)
    return {"loss": float(x)}

def gpu(x: int = 0):
    import ray
    return {"loss": float(x), "gpus": float(len(ray.get_gpu_ids()))}
'''

TABLES = '''
[tool.nbprod.tune.grid]
target = "mypkg.train:quad"
metric = "loss"
search = "grid"
[tool.nbprod.tune.grid.space]
x = {grid = [0.0, 0.5, 1.0]}
kind = {grid = ["a", "bad"]}

[tool.nbprod.tune.ridge]
target = "mypkg.train:fit"
metric = "rmse"
search = "grid"
register = "ridge"
[tool.nbprod.tune.ridge.space]
alpha = {grid = [0.001, 10.0, 1000.0]}

[tool.nbprod.tune.random]
target = "mypkg.train:quad"
metric = "loss"
trials = 6
seed = 7
[tool.nbprod.tune.random.space]
x = {loguniform = [0.01, 2.0]}
y = {randint = [0, 3]}
kind = {choice = ["a"]}

[tool.nbprod.tune.optuna]
target = "mypkg.train:quad"
metric = "loss"
search = "optuna"
trials = 10
concurrency = 2
seed = 7
[tool.nbprod.tune.optuna.space]
x = {uniform = [-2.0, 2.0]}
y = {randint = [0, 2]}

[tool.nbprod.tune.asha]
target = "mypkg.train:curve"
metric = "loss"
trials = 8
scheduler = "asha"
asha = {max_t = 8, grace_period = 1, reduction_factor = 2}
[tool.nbprod.tune.asha.space]
x = {uniform = [-3.0, 3.0]}

[tool.nbprod.tune.slow]
target = "mypkg.train:slow"
metric = "loss"
search = "grid"
concurrency = 1
[tool.nbprod.tune.slow.space]
x = {grid = [5, 4, 3, 2, 1, 0]}

[tool.nbprod.tune.gpu]
target = "mypkg.train:gpu"
metric = "loss"
search = "grid"
[tool.nbprod.tune.gpu.space]
x = {grid = [1]}

[tool.nbprod.tune.nb]
target = "nbs/train.ipynb"
metric = "loss"
trials = 4
scheduler = "asha"
asha = {max_t = 4, grace_period = 1, reduction_factor = 2}
[tool.nbprod.tune.nb.space]
x = {uniform = [-3.0, 3.0]}
'''

NOTEBOOK_CELLS = ["from nbprod import track\nimport time\nassert abs(x) < 2.9, 'x is too far out'\n"
                  "for i in range(epochs):\n    time.sleep(0.5)\n    track.report({'loss': (x - 1) ** 2 + 1 / (i + 1)}, step=i)\n",
                  "track.log_param('done', 'yes')"]


def make_project(root: Path) -> Project:
    root.mkdir()
    (root/'pyproject.toml').write_text('[project]\nname = "proj"\n\n[tool.nbprod]\nexperiment = "proj"\n' + TABLES)
    (root/'settings.ini').write_text('[DEFAULT]\n\n[gpu]\ntune_gpus_per_trial = 1\n')
    (root/'.gitignore').write_text('.nbprod/\n')
    (root/'mypkg').mkdir()
    (root/'mypkg'/'__init__.py').write_text('')
    (root/'mypkg'/'train.py').write_text(TRAIN)
    nb = new_notebook(cells=[new_code_cell("x = 0.0\nepochs = 4", metadata={'tags': ['parameters']}),
                             *[new_code_cell(c) for c in NOTEBOOK_CELLS]])
    nb.metadata.kernelspec = {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'}
    (root/'nbs').mkdir()
    nbformat.write(nb, root/'nbs'/'train.ipynb')
    subprocess.run(['git', 'init', '-q', '-b', 'main'], cwd=root, check=True)
    return Project(root)


@pytest.fixture(scope='module')
def proj(tmp_path_factory):
    return make_project(tmp_path_factory.mktemp('tune')/'proj')


def children(proj, parent_id, profile=None):
    return [r for r in proj.runs(profile) if r.data.tags.get('mlflow.parentRunId') == parent_id]


def tune(proj, name, profile=None, **kw):
    from nbprod.tune import run_tune
    return run_tune(name, settings=proj.settings(profile), **kw)


def test_grid_search_records_every_trial_and_goes_on_after_failures(proj, ray_session):
    updates = []
    res = tune(proj, 'grid', on_update=lambda trials, note: updates.append([t.status for t in trials]))
    assert res.status == 'FINISHED' and len(res.trials) == 6
    assert sorted((t.params['x'], t.params['kind']) for t in res.trials) == sorted((x, k) for x in (0.0, 0.5, 1.0) for k in ('a', 'bad'))
    failed = [t for t in res.trials if t.status == 'FAILED']
    assert len(failed) == 3 and all(t.error == "ValueError: kind 'bad' is not allowed" for t in failed)
    assert res.best_trial.params == {'x': 0.5, 'kind': 'a'} and res.best_trial.value == 0.0
    assert updates and any('RUNNING' in u for u in updates)

    parent = proj.client().get_run(res.run_id)
    assert parent.info.status == 'FINISHED' and parent.data.tags['nbprod.kind'] == 'tune'
    assert parent.data.params['search'] == 'grid' and parent.data.params['space.x'] == 'grid [0.0, 0.5, 1.0]'
    assert parent.data.tags['nbprod.trials_failed'] == '3' and parent.data.tags['nbprod.best_run'] == res.best_trial.run_id
    assert parent.data.metrics['best_loss'] == 0.0
    kids = children(proj, res.run_id)
    assert len(kids) == 6 and {r.data.tags['nbprod.kind'] for r in kids} == {'trial'}
    by_status = {s: [r for r in kids if r.info.status == s] for s in ('FINISHED', 'FAILED')}
    assert len(by_status['FINISHED']) == 3 and len(by_status['FAILED']) == 3
    for r in by_status['FAILED']:
        assert r.data.params['kind'] == 'bad' and r.data.tags['nbprod.error.ename'] == 'ValueError'
        assert r.data.tags['nbprod.error.evalue'] == "kind 'bad' is not allowed"
    for r in by_status['FINISHED']:
        assert r.data.metrics['loss'] == (float(r.data.params['x']) - 0.5) ** 2


def test_best_trial_model_is_registered(proj, ray_session):
    res = tune(proj, 'ridge')
    assert res.ok and res.best_trial.params == {'alpha': 0.001}
    name, version = res.registered
    mv = proj.client().get_model_version(name, version)
    assert mv.run_id == res.best_trial.run_id or mv.tags['nbprod.run_id'] == res.best_trial.run_id
    assert mv.tags['nbprod.tune_run'] == res.run_id
    assert proj.client().get_run(res.run_id).data.tags['nbprod.registered'] == f"ridge version {version}"
    import mlflow
    model = mlflow.sklearn.load_model(f"models:/ridge/{version}")
    assert model.alpha == 0.001


def test_random_search_draws_within_the_space(proj, ray_session):
    res = tune(proj, 'random')
    assert res.ok and len(res.trials) == 6
    xs = [t.params['x'] for t in res.trials]
    assert len(set(xs)) == 6 and all(0.01 <= x <= 2.0 for x in xs)
    assert all(isinstance(t.params['y'], int) and 0 <= t.params['y'] <= 3 for t in res.trials)
    assert {t.params['kind'] for t in res.trials} == {'a'}
    assert all(t.status == 'FINISHED' and t.value == (t.params['x'] - 0.5) ** 2 + t.params['y'] for t in res.trials)
    assert proj.client().get_run(res.run_id).data.params['seed'] == '7'
    # seeded: a second search draws the same points (a search of its own, with its own runs)
    again = tune(proj, 'random')
    assert again.run_id != res.run_id
    assert sorted((t.params['x'], t.params['y']) for t in again.trials) == sorted((t.params['x'], t.params['y']) for t in res.trials)


def test_optuna_search(proj, ray_session):
    res = tune(proj, 'optuna')
    assert res.ok and len(res.trials) == 10
    assert all(-2.0 <= t.params['x'] <= 2.0 and t.params['y'] in (0, 1, 2) for t in res.trials)
    params = proj.client().get_run(res.run_id).data.params
    assert params['search'] == 'optuna' and params['seed'] == '7'
    assert len(children(proj, res.run_id)) == 10


def test_asha_stops_poor_trials_early(proj, ray_session):
    res = tune(proj, 'asha')
    assert res.ok and len(res.trials) == 8
    stopped = [t for t in res.trials if t.status == 'STOPPED']
    finished = [t for t in res.trials if t.status == 'FINISHED']
    assert stopped and finished
    assert all(t.steps < 8 for t in stopped) and all(t.steps == 8 for t in finished)
    c = proj.client()
    for t in stopped:
        run = c.get_run(t.run_id)
        assert run.info.status == 'KILLED' and run.data.tags['nbprod.trial.stopped_early'].startswith('stopped by ASHA after')
        assert len(c.get_metric_history(t.run_id, 'loss')) == t.steps < 8
    for t in finished:
        assert c.get_run(t.run_id).info.status == 'FINISHED'
        assert [m.step for m in c.get_metric_history(t.run_id, 'loss')] == list(range(8))
    # the best trial is one that ran to the end: a stopped one was stopped for being worse
    assert res.best_trial.status == 'FINISHED'


def test_the_local_ray_listens_on_loopback_only(ray_session):
    "The Ray nbprod starts itself (no ray_address) binds the loopback interface only, though ray was imported first."
    import psutil
    node = ray_session._private.worker._global_node
    pids = [p.process.pid for infos in node.all_processes.values() for p in infos]
    listening = [c.laddr for pid in pids for c in psutil.Process(pid).net_connections(kind='inet') if c.status == psutil.CONN_LISTEN]
    assert len(listening) >= 2, listening   # the GCS and the raylet at least
    assert all(a.ip in ('127.0.0.1', '::ffff:127.0.0.1') for a in listening), listening
    assert ray_session.util.get_node_ip_address() == '127.0.0.1'


def _ray_node(args, log, env):
    return subprocess.Popen([str(Path(sys.executable).parent/'ray'), 'start', '--block', '--node-ip-address=127.0.0.1',
                             '--disable-usage-stats', *args], stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)


def _stop_node(proc):
    stop_ray_node(proc)                # `ray start --block` stops the processes it started; what outlives it is ended


def test_gpu_trial_waits_for_a_gpu_and_runs_where_one_is_declared(tmp_path):
    """A cluster of Ray's logical resources on 127.0.0.1: a head with 2 CPUs and no GPU. A trial that asks for a GPU
    (tune_gpus_per_trial = 1, profile gpu) waits; once a node declaring one GPU joins, it runs there and gets that GPU."""
    from conftest import free_port
    p = make_project(tmp_path/'gpu')
    env = {**{k: v for k, v in os.environ.items() if k != 'RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER'}, 'RAY_AUTH_MODE': 'token'}
    port = free_port()
    address = f'127.0.0.1:{port}'
    head_log, node_log = open(tmp_path/'head.log', 'w'), open(tmp_path/'node.log', 'w')
    head = _ray_node(['--head', f'--port={port}', '--num-cpus=2', '--num-gpus=0', '--include-dashboard=false'], head_log, env)
    node = proc = None
    try:
        deadline = time.time() + 120
        while subprocess.run([str(Path(sys.executable).parent/'ray'), 'status', f'--address={address}'], capture_output=True, env=env).returncode:
            assert head.poll() is None and time.time() < deadline, (tmp_path/'head.log').read_text()[-3000:]
            time.sleep(1)
        proc = p.popen('tune', 'gpu', '--profile', 'gpu', env=p.env(NBPROD_RAY_ADDRESS=address, RAY_AUTH_MODE='token'))
        deadline = time.time() + 120
        while not [r for r in p.runs('gpu') if r.data.tags.get('nbprod.kind') == 'tune']:
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.5)
        time.sleep(10)   # the search is on, and its one trial waits for a GPU
        assert proc.poll() is None
        assert [r for r in p.runs('gpu') if r.data.tags.get('nbprod.kind') == 'trial'] == []
        node = _ray_node([f'--address={address}', '--num-cpus=1', '--num-gpus=1'], node_log, env)
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, out + err
        [trial] = [r for r in p.runs('gpu') if r.data.tags.get('nbprod.kind') == 'trial']
        assert trial.info.status == 'FINISHED' and trial.data.metrics['gpus'] == 1.0   # Ray gave the trial the node's GPU
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill(); proc.communicate()
        for n in (node, head):
            if n is not None: _stop_node(n)
        head_log.close(); node_log.close()


def test_bad_spaces_are_refused_before_anything_runs(tmp_path):
    p = make_project(tmp_path/'bad')
    base = (p.root/'pyproject.toml').read_text()
    cases = {'x = {normal = [0, 1]}': "parameter 'x': unknown distribution 'normal'",
             'x = {uniform = [2.0, 1.0]}': "parameter 'x': low 2.0 is above high 1.0",
             'x = {uniform = [0.0, 1.0]}\ndepth = {randint = [1, 8]}': "the target mypkg.train:quad declares no parameter 'depth'"}
    for space, message in cases.items():
        (p.root/'pyproject.toml').write_text(base + f'\n[tool.nbprod.tune.bad]\ntarget = "mypkg.train:quad"\nmetric = "loss"\n'
                                             f'[tool.nbprod.tune.bad.space]\n{space}\n')
        r = p.cli('tune', 'bad')
        assert r.returncode == 2, r.stderr
        assert message in ' '.join(r.stderr.split()), r.stderr
    assert p.runs() == [] and not (p.root/'.nbprod'/'tune').exists()


def test_notebook_target_cli(tmp_path):
    "Each trial is the notebook run by papermill: its output notebook stored; trials ASHA stops end KILLED, stored too."
    p = make_project(tmp_path/'nbproj')
    r = p.cli('tune', 'nb', timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    out = ' '.join(r.stdout.split())
    assert 'tune nb:' in out and 'run ' in out
    parent = [x for x in p.runs() if x.data.tags.get('nbprod.kind') == 'tune'][0]
    kids = children(p, parent.info.run_id)
    assert len(kids) == 4
    c = p.client()
    for k in kids:
        arts = {a.path for a in c.list_artifacts(k.info.run_id, 'notebook')}
        assert 'notebook/train.ipynb' in arts, arts          # the executed notebook, as nbprod run stores it
        assert k.data.tags['nbprod.kind'] == 'trial' and k.data.params['x']
        if 'nbprod.trial.stopped_early' in k.data.tags: assert k.info.status == 'KILLED'
        elif abs(float(k.data.params['x'])) >= 2.9:
            assert k.info.status == 'FAILED' and 'x is too far out' in k.data.tags['nbprod.error.evalue']
        else:
            assert k.info.status == 'FINISHED' and k.data.params['done'] == 'yes'
            assert [m.step for m in c.get_metric_history(k.info.run_id, 'loss')] == [0, 1, 2, 3]
    finished = [k for k in kids if k.info.status == 'FINISHED']
    assert finished, "no notebook trial ran to the end"
    assert f"{min(k.data.metrics['loss'] for k in finished):.5g}" in out


def test_resume_after_the_driver_is_killed(tmp_path):
    p = make_project(tmp_path/'resume')
    proc = p.popen('tune', 'slow')
    try:
        deadline = time.time() + 240
        while True:   # kill the driver once two trials finished and a third runs
            runs = [r for r in p.runs() if r.data.tags.get('nbprod.kind') == 'trial']
            if sum(r.info.status == 'FINISHED' for r in runs) >= 2 and any(r.info.status == 'RUNNING' for r in runs): break
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline, "the search did not get going"
            time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    time.sleep(3)   # Ray's reaper ends the killed driver's Ray
    before = {r.info.run_id: r for r in p.runs() if r.data.tags.get('nbprod.kind') == 'trial'}
    done_before = {r.data.params['x'] for r in before.values() if r.info.status == 'FINISHED'}
    assert len(done_before) >= 2
    parent = [r for r in p.runs() if r.data.tags.get('nbprod.kind') == 'tune'][0]
    assert parent.info.status == 'RUNNING'

    r = p.cli('tune', 'slow', '--resume', timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert '(resumed)' in r.stdout and '6 finished' in r.stdout
    after = [x for x in p.runs() if x.data.tags.get('nbprod.kind') == 'trial']
    finished = [x for x in after if x.info.status == 'FINISHED']
    # every point finished exactly once; the ones finished before the kill were not run again
    assert sorted(x.data.params['x'] for x in finished) == ['0', '1', '2', '3', '4', '5']
    assert {x.info.run_id for x in finished if x.data.params['x'] in done_before} <= set(before)
    orphans = [x for x in after if x.info.status == 'KILLED']
    assert orphans and all('driver was killed' in x.data.tags['nbprod.reconciled'] for x in orphans)
    assert p.client().get_run(parent.info.run_id).info.status == 'FINISHED'
    again = p.cli('tune', 'slow', '--resume')
    assert again.returncode == 2 and 'there is nothing to resume' in ' '.join(again.stderr.split())


def test_sigterm_stops_the_search_resumably(tmp_path):
    "SIGTERM (as a scheduler stops a job) ends the search KILLED and says how to go on; the trial it cut is recorded KILLED; --resume finishes."
    p = make_project(tmp_path/'term')
    proc = p.popen('tune', 'slow')
    try:
        deadline = time.time() + 240
        while sum(r.info.status == 'FINISHED' for r in p.runs() if r.data.tags.get('nbprod.kind') == 'trial') < 2:
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline, "the search did not get going"
            time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None: proc.kill(); proc.communicate()
    assert proc.returncode == 130, out + err
    assert 'nbprod tune slow --resume goes on' in ' '.join(err.split())
    parent = [r for r in p.runs() if r.data.tags.get('nbprod.kind') == 'tune'][0]
    assert parent.info.status == 'KILLED'
    trials = [r for r in p.runs() if r.data.tags.get('nbprod.kind') == 'trial']
    assert not [r for r in trials if r.info.status == 'RUNNING']
    assert all('the search was stopped' in r.data.tags['nbprod.reconciled'] for r in trials if r.info.status == 'KILLED')
    r = p.cli('tune', 'slow', '--resume', timeout=300)
    assert r.returncode == 0 and '6 finished' in r.stdout, r.stdout + r.stderr
    finished = [x for x in p.runs() if x.data.tags.get('nbprod.kind') == 'trial' and x.info.status == 'FINISHED']
    assert sorted(x.data.params['x'] for x in finished) == ['0', '1', '2', '3', '4', '5']
