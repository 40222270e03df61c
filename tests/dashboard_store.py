"""A filled nbprod store without running anything: what the dashboard reads, written the way nbprod writes it.

Used by tests/test_dashboard.py (small) and benchmarks/dashboard.py (1,000 runs, 50 model versions, 500 profile windows).
Runs and model versions go through MLflow's own client on SQLite; profiles, traffic counts, audit records, labels, alerts
and decisions through nbprod's own writers. The bike-share example's tests show the same pages on a store filled by the
real pipeline and replay."""
import datetime, json
from pathlib import Path

import numpy as np
import pandas as pd

PYPROJECT = '''[project]
name = "toyshop"

[tool.nbprod]
experiment = "toyshop"

[tool.nbprod.pipelines.train]
parameters = {lr = 0.1}

[tool.nbprod.pipelines.train.steps.prep]
notebook = "nbs/00_prep.ipynb"

[tool.nbprod.pipelines.train.steps.fit]
notebook = "nbs/01_fit.ipynb"
needs = ["prep"]

[tool.nbprod.serve.models.bikes]
challenger = "challenger"

[tool.nbprod.monitor.models.bikes]
features = ["temp", "hum", "hr"]
default = {algorithm = "hellinger", warn = 0.2, drift = 0.4}
min_rows = 20
performance = {metric = "mae", baseline = "val_mae", warn = 0.25, breach = 0.5, min_labels = 10}

[tool.nbprod.monitor.models.bikes.retrain]
pipeline = "train"
'''

NOTEBOOK = {"cells": [{"cell_type": "code", "execution_count": None, "id": "p", "metadata": {"tags": ["parameters"]}, "outputs": [],
                       "source": "lr = 0.1"}],
            "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}, "nbformat": 4, "nbformat_minor": 5}

T0 = datetime.datetime(2026, 7, 1, tzinfo=datetime.timezone.utc).timestamp()
WINDOW_S = 3600


def frame(rng, n, shift=0.0):
    return pd.DataFrame({'temp': rng.normal(0.5 + shift, 0.15, n), 'hum': rng.uniform(0.2, 0.9, n),
                         'hr': rng.integers(0, 24, n).astype('int64'), 'prediction': rng.normal(150, 60, n)})


def fill(root: Path, runs: int = 30, versions: int = 4, windows: int = 12, awaiting: bool = True, seed: int = 0):
    "Write a project at `root` and fill its store; returns its Settings."
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param
    from nbprod.aliases import move_alias
    from nbprod.alerts import Alert, AlertLog
    from nbprod.api import Metrics
    from nbprod.audit import AuditLog
    from nbprod.feedback import label_log
    from nbprod.profiles import profile
    from nbprod.retrain import Decisions, Event
    from nbprod.settings import load_settings
    from nbprod.traffic import TrafficLog
    from nbprod.windows import _folder_name
    rng = np.random.default_rng(seed)
    root = Path(root)
    (root/'nbs').mkdir(parents=True, exist_ok=True)
    (root/'pyproject.toml').write_text(PYPROJECT)
    (root/'settings.ini').write_text(f"[DEFAULT]\nprofile_window_s = {WINDOW_S}\n")
    for n in ('00_prep', '01_fit'): (root/'nbs'/f'{n}.ipynb').write_text(json.dumps(NOTEBOOK))
    s = load_settings(root, env={})
    c = MlflowClient(s.tracking_uri, s.registry_uri)
    eid = c.create_experiment('toyshop', artifact_location=s.artifact_root)

    def run(name, tags, params=(), metrics=(), status='FINISHED', start=None, seconds=30.0):
        r = c.create_run(eid, run_name=name, tags=tags, start_time=int(start * 1000))
        rid = r.info.run_id
        if params or metrics:
            c.log_batch(rid, params=[Param(k, str(v)) for k, v in params], metrics=[Metric(k, v, int(start * 1000), 0) for k, v in metrics])
        c.set_terminated(rid, status, end_time=int((start + seconds) * 1000))
        return rid

    fits, t = [], T0 - runs * 600
    i = npipe = 0
    while i < runs:                       # pipeline runs of three runs each (parent, prep, fit), some notebook runs
        t += 600
        lr = float(rng.choice([0.03, 0.05, 0.1, 0.2]))
        mae = float(30 + 40 * abs(lr - 0.07) + rng.normal(0, 2))
        failed = npipe % 4 == 2 and not (i % 5 == 4 or runs - i < 3)
        if i % 5 == 4 or runs - i < 3:
            fits.append(run('01_fit', {'nbprod.kind': 'notebook', 'nbprod.notebook': 'nbs/01_fit.ipynb', 'nbprod.notebook_hash': f"h{i}",
                                       'nbprod.git_commit': f"{i:07x}abc", 'nbprod.git_dirty': 'false', 'mlflow.user': 'ana'},
                            [('lr', lr)], [('val_mae', mae), ('val_rmse', mae * 1.4)], start=t))
            i += 1
            continue
        parent = run('train', {'nbprod.kind': 'pipeline', 'nbprod.pipeline': 'train', 'nbprod.step.prep.status': 'CACHED' if i % 3 else 'FINISHED',
                               'nbprod.step.fit.status': 'FAILED' if failed else 'FINISHED', 'nbprod.git_commit': f"{i:07x}abc", 'mlflow.user': 'ana'},
                     [('lr', lr)], status='FAILED' if failed else 'FINISHED', start=t, seconds=95)
        kid = {'mlflow.parentRunId': parent, 'nbprod.parent_run': parent, 'nbprod.kind': 'step', 'nbprod.pipeline': 'train', 'mlflow.user': 'ana'}
        run('train.prep', {**kid, 'nbprod.step': 'prep', 'nbprod.notebook': 'nbs/00_prep.ipynb'}, start=t, seconds=20)
        fit = run('train.fit', {**kid, 'nbprod.step': 'fit', 'nbprod.notebook': 'nbs/01_fit.ipynb', 'nbprod.notebook_hash': f"h{i}",
                                'nbprod.git_commit': f"{i:07x}abc", 'nbprod.git_dirty': 'false',
                                **({'nbprod.error': 'cell 4 raised ValueError: the validation set is empty'} if failed else {})},
                  [('lr', lr)], [] if failed else [('val_mae', mae), ('val_rmse', mae * 1.4)], status='FAILED' if failed else 'FINISHED',
                  start=t + 20, seconds=70)
        if not failed: fits.append(fit)
        i += 3
        npipe += 1

    # registered versions from the newest good fits; the champion's run keeps the training data's profile
    c.create_registered_model('bikes')
    reference = profile(frame(rng, 2000))
    ref_file = s.store/'tmp-reference'/'reference.bin'
    reference.write(ref_file)
    made = []
    for rid in fits[-versions:]:
        mv = c.create_model_version('bikes', source=f"runs:/{rid}/model", run_id=rid)
        c.log_artifact(rid, str(ref_file), 'nbprod/bikes')
        c.set_tag(rid, 'nbprod.reference_profile', 'nbprod/bikes/reference.bin')
        made.append(str(mv.version))
    for v in made[:-1]:
        move_alias(c, 'bikes', 'champion', v, by='ana', why=f"version {v} was better on June")
    move_alias(c, 'bikes', 'challenger', made[-1], by='retrain loop 20260801-0000-ab12', why='canary at 10% of the traffic')
    champion = made[-2] if len(made) > 1 else made[-1]

    # traffic windows: profiles, counts, audit records with labels
    audit = AuditLog(s.store/'audit', 'bikes', 'r1', clock=lambda: clock[0])
    labels = label_log(s.store, 'bikes')
    clock = [T0]
    for w in range(windows):
        start = T0 + w * WINDOW_S
        shift = 0.25 if w >= windows * 2 // 3 else 0.0          # the last third is hotter: drift
        df = frame(rng, 60, shift)
        folder = s.store/'profiles'/'bikes'/'windows'/_folder_name(datetime.datetime.fromtimestamp(start, datetime.timezone.utc))/f"v{champion}"
        profile(df).write(folder/'r1-1.bin')
        m = Metrics()
        for x in rng.gamma(2.0, 0.004, 60): m.observe('bikes', champion, 'champion', 200, float(x))
        for _ in range(int(w % 4 == 3) * 2): m.observe('bikes', champion, 'champion', 500, 0.05)
        TrafficLog(s.store/'traffic', 'r1', clock=lambda: start + 30).write(m.snapshot())
        if w < 4 or w == windows - 1:                              # a few windows of audited, labelled answers
            clock[0] = start + 60
            recs = [{'request_id': f"req-{w}-{j}", 'index': 0, 'version': champion, 'variant': 'champion',
                     'inputs': {k: float(v) for k, v in df.iloc[j][['temp', 'hum', 'hr']].items()}, 'outputs': float(df.prediction.iloc[j]),
                     'latency_ms': 4.2, **({'explanation': {'prediction': float(df.prediction.iloc[j]), 'base': 140.0,
                                                            'contributions': {'temp': 12.5, 'hum': -3.0, 'hr': 8.1}}} if j == 0 else {})}
                    for j in range(20)]
            audit.write_sync(recs)
            labels.write_sync([{'request_id': r['request_id'], 'index': 0, 'label': r['outputs'] + float(rng.normal(0, 30)), 'source': 'test'}
                               for r in recs])
    AlertLog(s.store).record([
        Alert('bikes', 'drift', 'breach', 'temp', 'temp drifted: hellinger 0.52 above 0.4', 0.52, 0.4,
              datetime.datetime.fromtimestamp(T0 + (windows - 1) * WINDOW_S, datetime.timezone.utc).isoformat(), champion),
        Alert('bikes', 'performance', 'warning', 'mae', 'mae 48 is 26% above the baseline 38', 48.0, 0.25, None, champion)])
    log = Decisions(s.store)
    log.add(Event('20260801-0000-ab12', 'bikes', 'triggered', 'mae breach in the window of 2026-07-01 05:00'))
    log.add(Event('20260801-0000-ab12', 'bikes', 'trained', 'trained on 80 labelled predictions', {'version': made[-1]}))
    log.add(Event('20260801-0000-ab12', 'bikes', 'evaluated', f"version {made[-1]} mae 31 against the champion's 38: better",
                  {'version': made[-1], 'champion': champion, 'metric': 'mae'}))
    if awaiting:
        log.add(Event('20260801-0000-ab12', 'bikes', 'awaiting_approval', f"start a canary of version {made[-1]} at 10% of the traffic?",
                      {'version': made[-1], 'champion': champion, 'metric': 'mae', 'next': 'canary'}))
    return s
