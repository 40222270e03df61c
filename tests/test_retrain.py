"""The retrain loop end to end, on a small project: a real `nbprod serve` (Ray Serve, HTTP on 127.0.0.1), real pipeline runs
(papermill kernels, MLflow on SQLite), labels through `POST /v1/feedback`, the CLI driving it all.

The model learns y = 3x (+ an offset) from x. The world changes the offset; the truth arrives as labels; the loop
retrains on the labelled predictions, evaluates on the newest window of them, and canaries the new version. In order:
  1. promote: the offset becomes +5; `monitor check` finds the breach and retrains (auto); the canary is right on live
     labels; promoted.
  2. roll back: the offset becomes +10, the loop canaries a model that fits it, then the truth goes back to +5 while
     the canary is watched: worse on live labels than the champion, rolled back.
  3. rejected: a retrain by hand with a bad pipeline parameter is not better on the holdout: no canary.
  4. approval: with retrain = approve, a person approves the canary, then vetoes the promotion: rolled back, by them.
"""
import json, signal, time

import numpy as np
import pytest

from conftest import Project, call, free_port, wait_ready, stop_collect

TRAIN = '''import numpy as np, pandas as pd
from mlflow.exceptions import MlflowException
from sklearn.dummy import DummyRegressor
from sklearn.linear_model import Ridge
from sklearn.metrics import mean_absolute_error
from nbprod import track
rng = np.random.default_rng(0)
data = pd.DataFrame({"x": rng.normal(0, 1, 400)})
data["label"] = 3 * data.x + rng.normal(0, 0.1, 400)
if labelled:                      # nbprod's retrain loop: the labelled predictions, newest data first-class
    data = pd.read_parquet(labelled)[["x", "label"]]
model = DummyRegressor(strategy="constant", constant=0.0) if quality == "bad" else Ridge(alpha=0.01)
model.fit(data[["x"]], data.label)
track.log_metric("val_mae", mean_absolute_error(data.label, model.predict(data[["x"]])))
track.log_param("rows", len(data))
info = track.log_model(model, X_example=data[["x"]], registered_name="bikes", reference=data[["x"]])
try: track.get_model_version("bikes", "champion")
except MlflowException: track.set_alias("bikes", "champion", info.registered_model_version)'''

PYPROJECT = '''[project]
name = "loop"

[tool.nbprod]

[tool.nbprod.pipelines.train.steps.train]
notebook = "nbs/train.ipynb"

[tool.nbprod.serve.models.bikes]
challenger = "challenger"

[tool.nbprod.monitor.models.bikes]
performance = {metric = "mae", baseline = "val_mae", warn = 0.5, breach = 1.0, min_labels = 20}

[tool.nbprod.monitor.models.bikes.retrain]
pipeline = "train"
data_parameter = "labelled"
holdout_windows = 1
'''
WINDOW = 6


@pytest.fixture(scope='module')
def loop(tmp_path_factory):
    from nbprod.auth import create_key
    p = Project(tmp_path_factory.mktemp('retrain'))
    (p.root/'pyproject.toml').write_text(PYPROJECT)
    port = free_port()
    (p.root/'settings.ini').write_text(f'[DEFAULT]\nserve_port = {port}\nregistry_poll_s = 1\nprofile_window_s = {WINDOW}\n'
                                       'profile_flush_s = 1\nstale_after_s = 0\nretrain = auto\npromote_margin = 0.05\n'
                                       'canary_weight = 0.5\ncanary_watch_s = 8\ncanary_min_requests = 10\n')
    import subprocess
    subprocess.run(['git', 'init', '-q', '-b', 'main'], cwd=p.root, check=True)
    p.notebook('train', 'labelled = ""\nquality = "good"', TRAIN)
    r = p.cli('run', 'train', timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    _, key = create_key(p.settings(), 'tests', ['bikes'])
    proc = p.popen('serve')
    url = f'http://127.0.0.1:{port}'
    try:
        wait_ready(proc, url)
        p.url, p.key = url, key
        yield p
    finally:
        out, err = stop_collect(proc)             # Ctrl-C; a server that does not stop has its whole tree ended
    assert proc.returncode == 0, err


SEQ = [0]


def traffic(p, n, offset, seed):
    "n predictions, then their labels (y = 3x + offset) through POST /v1/feedback; returns the versions that answered."
    rng = np.random.default_rng(seed)
    labels, versions = [], []
    for x in rng.normal(0, 1, n):
        SEQ[0] += 1
        rid = f'r{SEQ[0]}'
        status, body, _ = call(f'{p.url}/v1/models/bikes/predict', {'x': float(x)}, p.key, headers={'X-Request-ID': rid})
        assert status == 200, body
        versions.append(body['version'])
        labels.append({'request_id': rid, 'label': 3 * float(x) + offset})
    status, body, _ = call(f'{p.url}/v1/feedback', {'model': 'bikes', 'labels': labels}, p.key)
    assert status == 200 and body['accepted'] == n, body
    return versions


def until_answered_by(p, version, variant, seconds=60):
    "Unlabelled predictions until `version` answers as `variant`: the replica has loaded the registry's change."
    deadline = time.time() + seconds
    while True:
        status, body, _ = call(f'{p.url}/v1/models/bikes/predict', {'x': 0.0}, p.key)
        assert status == 200, body
        if (body['version'], body['variant']) == (version, variant): return
        assert time.time() < deadline, f"version {version} did not answer as the {variant} within {seconds}s: {body}"
        time.sleep(0.2)


def two_windows(p, offset, seeds):
    "40 labelled predictions in each of two fresh windows: the newer is the loop's holdout, the older its training data."
    for seed in seeds:
        next_window()
        traffic(p, 40, offset, seed)


def next_window():
    "Sleep into the next profile window (windows start at multiples of WINDOW seconds)."
    time.sleep(WINDOW - time.time() % WINDOW + 0.2)


def aliases(p):
    c = p.client()
    out = {}
    for a in ('champion', 'challenger'):
        try: out[a] = str(c.get_model_version_by_alias('bikes', a).version)
        except Exception: out[a] = None
    return out


def history(p):
    from nbprod.retrain import Decisions
    return Decisions(p.settings().store).events('bikes')


def loop_id(r):
    return r.stdout.split('loop ')[1].split()[0]


def test_1_breach_retrains_canaries_and_promotes(loop):
    p = loop
    two_windows(p, 5.0, (1, 2))
    r = p.cli('monitor', 'check', timeout=600)
    out = ' '.join(r.stdout.split())
    assert r.returncode == 2, r.stdout + r.stderr                           # a performance breach
    assert 'triggered' in out and 'trained' in out and 'canary' in out, r.stdout
    steps = [e.step for e in history(p)]
    assert steps == ['triggered', 'trained', 'evaluated', 'canary'], steps
    ev = [e for e in history(p) if e.step == 'evaluated'][0]
    assert ev.data['version'] == '2' and ev.data['scores']['2'] < 0.5 < 4 < ev.data['scores']['1'], ev.data
    assert aliases(p) == {'champion': '1', 'challenger': '2'}
    until_answered_by(p, '2', 'challenger')                                # the replica has picked the canary up
    versions = traffic(p, 80, 5.0, 3)
    assert set(versions) == {'1', '2'}, versions                           # half the traffic each, about (min_labels 20 each)
    r = p.cli('monitor', 'retrain', '--resume', loop_id(r), '--wait', timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    last = history(p)[-1]
    assert last.step == 'promoted' and last.data['version'] == '2', last
    assert 'on live labelled answers' in last.reasons, last.reasons
    assert aliases(p) == {'champion': '2', 'challenger': None}
    assert p.client().get_registered_model('bikes').tags['nbprod.challenger_weight'] == '0.0'
    until_answered_by(p, '2', 'champion')
    assert set(traffic(p, 10, 5.0, 4)) == {'2'}                           # every answer from the new champion
    r = p.cli('monitor', 'history', 'bikes')
    assert r.returncode == 0 and 'promoted' in r.stdout and 'triggered' in r.stdout, r.stdout


def test_2_a_canary_worse_on_live_labels_is_rolled_back(loop):
    p = loop
    two_windows(p, 10.0, (5, 6))
    r = p.cli('monitor', 'check', timeout=600)
    assert r.returncode == 2 and 'canary' in r.stdout, r.stdout + r.stderr
    lp = loop_id(r)
    canary = [e for e in history(p) if e.loop == lp and e.step == 'canary'][0]
    assert canary.data['version'] == '3' and aliases(p)['challenger'] == '3'
    until_answered_by(p, '3', 'challenger')
    traffic(p, 80, 5.0, 7)                                                 # the +10 was passing: the truth is +5 again
    r = p.cli('monitor', 'retrain', '--resume', lp, '--wait', timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    last = history(p)[-1]
    assert last.step == 'rolled_back' and last.data['version'] == '3', last
    assert "worse than the champion's" in last.reasons, last.reasons
    assert aliases(p) == {'champion': '2', 'challenger': None}
    assert p.client().get_model_version('bikes', '3').tags['nbprod.rolled_back'].startswith(f'loop {lp}')


def test_3_a_worse_model_is_rejected_before_any_canary(loop):
    p = loop
    next_window()
    traffic(p, 30, 5.0, 8)
    r = p.cli('monitor', 'retrain', 'bikes', '-p', 'quality=bad', timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    last = history(p)[-1]
    assert last.step == 'rejected' and last.data['better'] is False, last
    assert f"version {last.data['version']} has mae" in last.reasons and 'not better' in last.reasons
    assert aliases(p) == {'champion': '2', 'challenger': None}
    r = p.cli('monitor', 'retrain', 'bikes', '-p', 'nope=1')             # a bad parameter: the loop records the failure
    assert r.returncode == 1 and history(p)[-1].step == 'failed', r.stdout + r.stderr
    assert "declares a parameter 'nope'" in history(p)[-1].reasons


def test_4_approval_mode_asks_a_person(loop):
    p = loop
    env = p.env(NBPROD_RETRAIN='approve')
    two_windows(p, 10.0, (9, 10))
    r = p.cli('monitor', 'retrain', 'bikes', env=env, timeout=600)
    assert r.returncode == 0 and 'nbprod monitor approve' in r.stdout, r.stdout + r.stderr
    lp = history(p)[-1].loop
    assert history(p)[-1].step == 'awaiting_approval' and aliases(p)['challenger'] is None   # nothing happens before a yes
    r = p.cli('monitor', 'approve', lp, '--note', 'looks right', env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    approved = [e for e in history(p) if e.loop == lp and e.step == 'approved'][0]
    assert approved.actor not in ('nbprod', '') and 'looks right' in approved.reasons
    assert history(p)[-1].step == 'canary' and aliases(p)['challenger'] == history(p)[-1].data['version']
    until_answered_by(p, history(p)[-1].data['version'], 'challenger')
    traffic(p, 40, 10.0, 11)
    time.sleep(8)
    r = p.cli('monitor', 'retrain', '--resume', lp, env=env, timeout=600)
    assert r.returncode == 0 and history(p)[-1].step == 'awaiting_approval', r.stdout + r.stderr
    assert 'promote version' in history(p)[-1].reasons
    r = p.cli('monitor', 'veto', lp, '--note', 'not before the weekend', env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    last = history(p)[-1]
    assert last.step == 'rolled_back' and last.actor == approved.actor and 'not before the weekend' in last.reasons, last
    assert aliases(p) == {'champion': '2', 'challenger': None}
    r = p.cli('monitor', 'approve', lp, env=env)
    assert r.returncode == 2 and 'not awaiting approval' in r.stderr
