"""Monitoring across processes: `nbprod profile` on files, and `nbprod monitor drift` on a model trained by a real kernel
(`nbprod run`, MLflow on SQLite) with its reference profile, against traffic profiles written as replicas write them."""
import json
import subprocess

import numpy as np
import pandas as pd
import pytest

from conftest import Project

TRAIN = '''import numpy as np, pandas as pd
from sklearn.linear_model import Ridge
from nbprod import track
rng = np.random.default_rng(0)
df = pd.DataFrame({"temp": rng.normal(15, 5, 3000), "hum": rng.uniform(0, 1, 3000), "weather": rng.choice(["clear", "mist", "rain"], 3000)})
df["cnt"] = 10 * df.temp + rng.normal(0, 1, 3000)
X = df[["temp", "hum"]]
track.log_model(Ridge().fit(X, df.cnt), X_example=X, registered_name="bikes", alias="champion", reference=df)
track.log_metric("val_mae", 2.0)'''


def make_trained(root) -> Project:
    "A project whose model `bikes` was trained by `nbprod run` (a real kernel) with a reference profile and a val_mae of 2."
    p = Project(root)
    (p.root/'pyproject.toml').write_text('''[project]\nname = "mon"\n\n[tool.nbprod]\n
[tool.nbprod.serve.models.bikes]\n
[tool.nbprod.monitor.models.bikes]
features = ["temp", "hum", "weather"]
default = {warn = 0.01, drift = 0.001}   # stricter than 0.15/0.05: fewer false alarms over many windows and features
drift.hum = {algorithm = "hellinger"}
performance = {metric = "mae", baseline = "val_mae", warn = 0.1, breach = 0.25, min_labels = 5}

[tool.nbprod.checks.hours]
required = ["temp", "hum"]
columns.temp = {min = -20, max = 45, max_null_fraction = 0}
columns.weather = {allowed = ["clear", "mist", "rain"]}
''')
    (p.root/'settings.ini').write_text('[DEFAULT]\nprofile_window_s = 3600\n')
    subprocess.run(['git', 'init', '-q', '-b', 'main'], cwd=p.root, check=True)
    p.notebook('train', None, TRAIN)
    r = p.cli('run', 'nbs/train.ipynb', timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return p


@pytest.fixture(scope='module')
def trained(tmp_path_factory): return make_trained(tmp_path_factory.mktemp('monitor'))


def test_profile_a_file_with_checks(trained, tmp_path):
    p = trained
    rng = np.random.default_rng(1)
    df = pd.DataFrame({'temp': rng.normal(15, 5, 50_000), 'hum': rng.uniform(0, 1, 50_000), 'weather': rng.choice(['clear', 'rain'], 50_000)})
    df.to_parquet(tmp_path/'good.parquet', row_group_size=10_000)
    r = p.cli('profile', tmp_path/'good.parquet', '--check', 'hours', '--chunk-rows', 10_000)
    assert r.returncode == 0, r.stdout + r.stderr
    assert '50,000 rows' in r.stdout and "✓ check 'hours'" in r.stdout and 'all 6 expectations met' in r.stdout, r.stdout
    from nbprod.profiles import Profile
    assert Profile.read(tmp_path/'good.parquet.whylogs.bin').rows == 50_000
    df.assign(temp=df.temp + 40, weather=df.weather.replace('rain', 'snow')).to_csv(tmp_path/'bad.csv', index=False)
    r = p.cli('profile', tmp_path/'bad.csv', '--check', 'hours', '--out', tmp_path/'bad.bin')
    out = ' '.join(r.stdout.split())
    assert r.returncode == 1, r.stdout + r.stderr
    assert "✗ check 'hours'" in out and '2 of 6 failed' in out and 'temp: range (expected values in [-20, 45])' in out, out
    assert 'weather: allowed' in out and 'snow (' in out, out
    assert (tmp_path/'bad.bin').exists()
    for args, text in [(['nope.csv'], 'no file at nope.csv'), ([tmp_path/'good.parquet', '--check', 'zz'], "no data check 'zz'")]:
        r = p.cli('profile', *args)
        assert r.returncode == 2 and text in r.stderr, r.stderr


def test_monitor_drift_table(trained):
    "Three windows of traffic written by two replicas' profilers; the third is shifted: the table says where."
    from nbprod.windows import WindowProfiler
    p = trained
    s = p.settings()
    rng = np.random.default_rng(2)
    t0 = 1_780_000_000 - 1_780_000_000 % 3600
    clock = type('Clock', (), {'t': t0, '__call__': lambda self: self.t})()
    reps = [WindowProfiler(s.store/'profiles', 'bikes', f'r{i}', window_s=3600, clock=clock, start=False) for i in range(2)]
    for w in range(3):
        clock.t = t0 + w * 3600 + 10
        for rep in reps:
            shift = 12 if w == 2 else 0
            recs = [{'temp': float(t), 'hum': float(h), 'weather': str(c)} for t, h, c in
                    zip(rng.normal(15 + shift, 5, 300), rng.uniform(0, 1, 300), rng.choice(['clear', 'mist', 'rain'], 300))]
            rep.add('1', recs, [10 * r['temp'] for r in recs])
            rep.flush()
    r = p.cli('monitor', 'drift', 'bikes')
    assert r.returncode == 0, r.stdout + r.stderr
    lines = {line.split()[0]: line.split()[1:] for line in r.stdout.splitlines() if line.split()}
    assert "drift against version 1's training data · 3 windows" in ' '.join(r.stdout.split()), r.stdout
    assert 'Downloading' not in r.stderr, r.stderr
    assert [c for c in lines['temp'] if c in ('ok', 'warn', 'DRIFT')] == ['ok', 'ok', 'DRIFT'], r.stdout
    assert [c for c in lines['window'] if c in ('ok', 'warn', 'DRIFT')] == ['ok', 'ok', 'DRIFT'], r.stdout
    assert lines['rows'] == ['600', '600', '600'], r.stdout
    assert 'cnt' not in lines and 'prediction' not in lines      # only the monitored features
    r = p.cli('monitor', 'drift', 'bikes', '--json', '--last', '1')
    rows = [json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} is not JSON")) for line in r.stdout.splitlines() if line.strip()]
    assert {x['column']: x['algorithm'] for x in rows} == {'temp': 'ks', 'hum': 'hellinger', 'weather': 'chi2'}
    assert {x['window_status'] for x in rows} == {'DRIFT'}
    r = p.cli('monitor', 'drift', 'taxi')
    assert r.returncode == 2 and "no served model 'taxi'" in r.stderr, r.stderr


class Clock:
    def __init__(self, t): self.t = t
    def __call__(self): return self.t


def traffic(p, clock, window, n=300, shift=0.0, seed=0):
    "One replica's traffic in window `window` (hours after the clock's start), profiled as `nbprod serve` does."
    from nbprod.windows import WindowProfiler
    rng = np.random.default_rng(seed)
    clock.t = clock.start + window * 3600 + 60
    rep = WindowProfiler(p.settings().store/'profiles', 'bikes', 'r0', window_s=3600, clock=clock, start=False)
    recs = [{'temp': float(t), 'hum': float(h), 'weather': str(c)} for t, h, c in
            zip(rng.normal(15 + shift, 5, n), rng.uniform(0, 1, n), rng.choice(['clear', 'mist', 'rain'], n))]
    rep.add('1', recs, [10 * r['temp'] for r in recs])
    rep.flush()


def health(r) -> list:
    "The bikes row of `nbprod monitor check`'s table: now, drift, performance, traffic (the window's date and time left out)."
    [row] = [line.replace('not measured', 'not_measured').split() for line in r.stdout.splitlines() if line.split()[:1] == ['bikes']]
    return [c.replace('_', ' ') for c in [row[1], *row[-3:]]]


def test_labels_from_a_file_are_screened_like_the_endpoints(trained, tmp_path):
    "The attack of issue 18 through `nbprod monitor labels`: for the regressor `bikes`, a word, 1e300, inf, -Infinity and a made-up id are refused with reasons; only the good rows are stored."
    from nbprod.audit import AuditLog
    from nbprod.feedback import read_labels
    p = trained
    audit = AuditLog(p.settings().store/'audit', 'bikes', replica='labels-test')
    audit.write_sync([{'request_id': f'lab{i}', 'index': 0, 'version': '1', 'variant': 'champion', 'inputs': {'temp': 15.0}, 'outputs': 150.0} for i in range(6)])
    audit.close()
    (tmp_path/'poison.csv').write_text('request_id,label\nlab0,151.5\nlab1,lots\nlab2,1e300\nlab3,inf\nmade-up-1,150\nlab4,149\nlab5,-Infinity\n')
    r = p.cli('monitor', 'labels', tmp_path/'poison.csv', '--model', 'bikes')
    err = ' '.join(r.stderr.split())
    assert r.returncode == 1 and 'stored 2 labels for bikes' in r.stdout, r.stdout + r.stderr
    for text in ('row 1 refused: label: this model is a regressor: a label is a number, not "lots"',
                 'row 2 refused: label: 1e+300 is out of range for a label of this regressor: at most 1e+15 in magnitude',
                 'row 3 refused: label: inf is not a finite number', 'row 4 refused: request_id: no prediction with this request id',
                 'row 6 refused: label: -inf is not a finite number', '5 rows refused'):
        assert text in err, (text, err)
    labels = read_labels(p.settings().store, 'bikes')
    mine = labels[labels.request_id.str.startswith('lab') | (labels.request_id == 'made-up-1')]
    assert sorted(zip(mine.request_id, mine.label)) == [('lab0', 151.5), ('lab4', 149)], mine
    assert all(isinstance(v, (int, float)) for v in mine.label)            # numbers, not the CSV's text


def test_check_alerts_webhook_labels_and_exit_codes(tmp_path_factory, tmp_path):
    "Performance not measured (1, never ok); a performance warning from late labels (1); drift (2) sent to a webhook that fails first; stale (2)."
    import os, threading, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from nbprod.audit import AuditLog
    p = make_trained(tmp_path_factory.mktemp('check'))
    got, plan = [], []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers['Content-Length'])))
            code = plan.pop(0) if plan else 200
            if code == 200: got.append(body)
            self.send_response(code)
            self.send_header('Content-Length', '0')
            self.end_headers()
        def log_message(self, *a): pass
    server = ThreadingHTTPServer(('127.0.0.1', 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = p.env(NBPROD_ALERT_WEBHOOK=f'http://127.0.0.1:{server.server_port}/hook')
    check = lambda *a: p.cli('monitor', 'check', *a, env=env)
    try:
        start = time.time() - time.time() % 3600 - 5 * 3600    # windows that are over: drift judges finished windows
        clock = Clock(start)
        clock.start = start
        for w in range(2): traffic(p, clock, w, seed=w)
        # performance is watched (min_labels = 5) and no label came: not measured is a warning with the reason, never ok, and no alert
        r = check()
        assert r.returncode == 1, r.stdout + r.stderr
        assert health(r) == ['warning', 'ok', 'warning', 'flowing'], r.stdout
        assert 'bikes: performance not measured: 0 labels in the last 24 h, fewer than min_labels = 5; send labels with POST /v1/feedback or nbprod monitor labels' \
            in ' '.join(r.stderr.split()), r.stderr
        assert 'new alert' not in r.stdout and got == []

        # nothing says how performance is measured: 'not measured', a warning; `performance = false` (no labels will come): healthy
        toml = (p.root/'pyproject.toml').read_text()
        line = 'performance = {metric = "mae", baseline = "val_mae", warn = 0.1, breach = 0.25, min_labels = 5}'
        (p.root/'pyproject.toml').write_text(toml.replace(line, ''))
        r = check()
        assert r.returncode == 1 and health(r) == ['warning', 'ok', 'not measured', 'flowing'], r.stdout + r.stderr
        assert 'performance not measured: no labels, and [tool.nbprod.monitor.models.bikes] has no performance table' in ' '.join(r.stderr.split()), r.stderr
        (p.root/'pyproject.toml').write_text(toml.replace(line, 'performance = false'))
        r = check()
        assert r.returncode == 0 and health(r) == ['ok', 'ok', '-', 'flowing'] and 'not measured' not in r.stderr, r.stdout + r.stderr
        (p.root/'pyproject.toml').write_text(toml)

        # predictions of the latest window; three of them labelled: fewer than min_labels, still a warning with how many
        audit = AuditLog(p.settings().store/'audit', 'bikes', clock=clock)
        audit.write_sync([{'request_id': f'q{i}', 'index': 0, 'version': '1', 'variant': 'champion', 'inputs': {'temp': 15.0},
                           'outputs': 150.0 + i} for i in range(20)] +
                         [{'request_id': f'e{i}', 'index': 0, 'version': '1', 'variant': 'champion', 'inputs': {'temp': 15.0}, 'outputs': 150.0} for i in range(3)])
        audit.close()
        pd.DataFrame({'request_id': ['e0', 'e1', 'e2'], 'label': [152.3] * 3}).to_csv(tmp_path/'early.csv', index=False)
        r = p.cli('monitor', 'labels', tmp_path/'early.csv', '--model', 'bikes')
        assert r.returncode == 0 and 'stored 3 labels' in r.stdout, r.stdout + r.stderr
        r = check()
        assert r.returncode == 1 and health(r) == ['warning', 'ok', 'warning', 'flowing'], r.stdout + r.stderr
        assert 'performance not measured: 3 labels in the last 24 h, fewer than min_labels = 5' in ' '.join(r.stderr.split()), r.stderr
        assert 'new alert' not in r.stdout and got == []

        # the rest labelled late: MAE 2.3 against a baseline of 2.0, 15% worse: a warning, measured
        pd.DataFrame({'request_id': [f'q{i}' for i in range(20)] + ['nobody'], 'label': [152.3 + i for i in range(20)] + [1.0]}).to_csv(tmp_path/'truth.csv', index=False)
        r = p.cli('monitor', 'labels', tmp_path/'truth.csv', '--model', 'bikes')   # one row names a request nobody made: refused, the rest stored
        assert r.returncode == 1 and 'stored 20 labels' in r.stdout and '23 of 23 answered predictions now have one' in r.stdout, r.stdout + r.stderr
        assert 'row 20 refused: request_id: no prediction with this request id' in r.stderr and '1 rows refused' in r.stderr, r.stderr
        r = p.cli('monitor', 'labels', tmp_path/'truth.csv', '--model', 'bikes')   # again: the first labels stand
        assert r.returncode == 1 and 'stored 0 labels' in r.stdout and 'the first label stands' in r.stderr, r.stdout + r.stderr
        r = p.cli('monitor', 'performance', 'bikes')
        assert r.returncode == 0 and 'mae against a baseline of 2' in r.stdout and '2.3' in r.stdout and 'warning' in r.stdout, r.stdout + r.stderr
        r = check()
        assert r.returncode == 1 and health(r) == ['warning', 'ok', 'warning', 'flowing'] and 'not measured' not in r.stderr, r.stdout + r.stderr
        assert 'new alert warning mae 2.3 against a baseline of 2' in ' '.join(r.stdout.split()), r.stdout
        assert [(a['kind'], a['level']) for a in got] == [('performance', 'warning')]

        # the next window drifts; the webhook fails once (500), the retry delivers
        traffic(p, clock, 2, shift=12, seed=2)
        plan[:] = [500]
        r = check()
        assert r.returncode == 2, r.stdout + r.stderr
        assert 'new alert breach temp drifted' in ' '.join(r.stdout.split()), r.stdout
        assert ('drift', 'temp', 'breach') in [(a['kind'], a['subject'], a['level']) for a in got], got
        assert plan == []                                           # the 500 was answered, then retried
        n = len(got)
        r = check()                                                 # recorded once: nothing new to send
        assert r.returncode == 2 and 'new alert' not in r.stdout and len(got) == n, r.stdout

        # nothing new written for 3 hours, against stale_after_s = 3600: stale, a breach
        old = time.time() - 3 * 3600
        for f in (p.settings().store/'profiles').rglob('*.bin'): os.utime(f, (old, old))
        r = p.cli('monitor', 'check', env={**env, 'NBPROD_STALE_AFTER_S': '3600'})
        assert r.returncode == 2 and 'stale' in r.stdout and 'no traffic profile since' in ' '.join(r.stdout.split()), r.stdout
        assert got[-1]['kind'] == 'stale'
        r = p.cli('monitor', 'alerts', 'bikes', env=env)
        assert r.returncode == 0 and all(k in r.stdout for k in ('performance', 'drift', 'stale')), r.stdout
    finally:
        server.shutdown()
        server.server_close()
    # a webhook that is down: the alert is recorded, not delivered, and the exit code still says breach
    traffic(p, clock, 3, shift=-12, seed=3)
    r = check()
    assert r.returncode == 2 and 'not delivered' in r.stderr and 'sent again by the next check' in r.stderr, r.stdout + r.stderr
    r = p.cli('monitor', 'check', 'taxi')
    assert r.returncode == 2 and "no served model 'taxi'" in r.stderr


def test_whylogs_needs_the_patch_and_nbprod_applies_it():
    "In a fresh interpreter: whylogs alone fails on numpy 2 at its first text column; through nbprod.profiles it works."
    import sys
    code = '''import os, sys
os.environ["WHYLOGS_NO_ANALYTICS"] = "True"
import numpy, pandas as pd
df = pd.DataFrame({"city": ["Paris", "Lyon"], "t": [1.5, 2.5]})
if sys.argv[1] == "plain":
    import whylogs
    try: whylogs.log(df)
    except AttributeError as e: print("FAILS", e)
    else: print("WORKS")
else:
    from nbprod.profiles import profile
    p = profile(df)
    print("WORKS", p.rows, sorted(p.columns), hasattr(numpy, "unicode_"))'''
    plain = subprocess.run([sys.executable, '-c', code, 'plain'], capture_output=True, text=True, timeout=120)
    patched = subprocess.run([sys.executable, '-c', code, 'nbprod'], capture_output=True, text=True, timeout=120)
    import numpy
    if numpy.__version__.startswith('1.'): pytest.skip("numpy 1 has np.unicode_: nothing to patch")
    assert plain.stdout.startswith('FAILS') and 'unicode_' in plain.stdout, plain.stdout + plain.stderr   # still needed
    assert patched.stdout.split() == ['WORKS', '2', "['city',", "'t']", 'False'], patched.stdout + patched.stderr   # numpy itself untouched


def test_drift_on_a_shifted_july_not_on_a_random_split_of_july():
    "July 2011 of the bike-share data, with the bike-share project's rules (Hellinger, warn 0.2, drift 0.4)."
    from pathlib import Path
    from nbprod.profiles import DriftRule, drift, overall, profile
    raw = pd.read_csv(Path(__file__).resolve().parents[1]/'examples'/'bikeshare'/'data'/'Bikeshare.csv')
    july = raw[raw.mnth == 'July'][['temp', 'atemp', 'hum', 'windspeed', 'hr', 'workingday']].reset_index(drop=True)
    assert len(july) == 744
    rule = DriftRule('hellinger', warn=0.2, drift=0.4)
    statuses = []
    for seed in range(20):
        idx = np.random.default_rng(seed).permutation(len(july))
        a, b = july.iloc[idx[:372]], july.iloc[idx[372:]]
        statuses.append(overall(drift(profile(b), profile(a), default=rule)))
        moved = overall(drift(profile(b.assign(temp=b.temp + 0.15, atemp=b.atemp + 0.15)), profile(a), default=rule))
        assert moved == 'DRIFT', (seed, moved)                   # a hotter copy drifts, every time
    assert 'DRIFT' not in statuses, statuses                     # halves of the same month never do
