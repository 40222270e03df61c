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
track.log_model(Ridge().fit(X, df.cnt), X_example=X, registered_name="bikes", alias="champion", reference=df)'''


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    p = Project(tmp_path_factory.mktemp('monitor'))
    (p.root/'pyproject.toml').write_text('''[project]\nname = "mon"\n\n[tool.nbprod]\n
[tool.nbprod.serve.models.bikes]\n
[tool.nbprod.monitor.models.bikes]
features = ["temp", "hum", "weather"]
drift.hum = {algorithm = "hellinger"}

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
