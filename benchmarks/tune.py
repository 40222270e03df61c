"""`nbprod tune` against scikit-learn's GridSearchCV, on the same data and the same folds.

Creates a throw-away nbprod project whose training function (a function target) fits a random forest on 3 folds of the
bike-share hours of 2011 (the features of examples/bikeshare), reporting the mean RMSE after each fold. Then, each as the
command a user would type, timed by wall clock in a subprocess:

- `GridSearchCV(RandomForestRegressor(random_state=0), 9-point grid, cv=KFold(3), n_jobs=2, refit=False)`
- `nbprod tune grid`: the same 9 points, one trial per point (1 CPU each, 2 at a time), every trial an MLflow run
- `nbprod tune costly_first`: the same grid with each list's values written largest first (a grid's trials take each list
  in the order written, so the largest forests start first and the last trial to start is a small one, not one that runs
  alone)
- `nbprod tune asha`: 27 random points of the ranges around the grid (seeded: round i draws with seed i), each reporting
  its 3-fold RMSE after every 27th of its trees (the forests grow with warm_start), ASHA (reduction factor 3, max_t 27:
  rungs at 1, 3 and 9 of 27) stopping poor ones early: successive halving's textbook 27 trials with factor 3

The order of the three searches turns by one each round (round 1: grid, costly_first, asha; round 2: costly_first, asha,
grid; ...), so that none always runs first. The `nbprod tune` searches run twice: with the local Ray the command starts
(cold, as `make demo` runs), and against a Ray already running (`ray start --head` on 127.0.0.1, `ray_address` set, as
on a cluster), which takes Ray's start-up out of the command (it overlaps the command's imports: 2 to 3 s less here).

and reports the ratios, whether the ASHA search came within 0.5% of the grid's best score in less time, and what the
overhead of `nbprod tune` is made of (from the runs' own start and end times, and the per-fold fit times the trials
report). Writes benchmarks/results/tune.json. Run from the repository root:

    .venv/bin/python benchmarks/tune.py [--rounds 2]
"""
import argparse, datetime, json, os, platform, shlex, statistics, subprocess, sys, tempfile, time
from importlib.metadata import version
from pathlib import Path

from rich.console import Console
from rich.table import Table

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent/'results'/'tune.json'
TARGET = 1.3                     # nbprod tune (grid) at most this many times GridSearchCV's time
ASHA_WITHIN = 0.005              # the ASHA search's best within 0.5% of the grid's best score
GRID = {'n_estimators': [50, 100, 200], 'max_depth': [6, 10, 14]}

TRAIN = '''
import time
from functools import lru_cache
import numpy as np
from sklearn.ensemble import RandomForestRegressor
from sklearn.model_selection import KFold
from nbprod import track

DATA = {data!r}

@lru_cache(1)
def data():
    d = np.load(DATA)
    return d["X"], d["y"]

def cv(n_estimators: int = 100, max_depth: int = 10):
    "Mean RMSE of a random forest on 3 folds (KFold, as GridSearchCV's cv=KFold(3)), reported after each fold."
    X, y = data()
    rmses, work = [], 0.0
    for k, (fit, test) in enumerate(KFold(3).split(X)):
        t0 = time.perf_counter()
        model = RandomForestRegressor(n_estimators=n_estimators, max_depth=max_depth, random_state=0, n_jobs=1).fit(X[fit], y[fit])
        rmses.append(float(np.sqrt(np.mean((model.predict(X[test]) - y[test]) ** 2))))
        work += time.perf_counter() - t0
        track.report({{"cv_rmse": float(np.mean(rmses)), "work_s": work}}, step=k + 1)

def cv_staged(n_estimators: int = 100, max_depth: int = 10, stages: int = 27):
    """The same 3-fold RMSE, reported as the forests grow: after each 27th of their trees (warm_start adds trees to the
    forests of the 3 folds, which end identical to cv's), so that ASHA can stop a poor setting after a 27th of its work.
    Each new tree predicts the test fold once; the forest's prediction is their running mean (as forest.predict)."""
    X, y = data()
    folds = list(KFold(3).split(X))
    forests = [RandomForestRegressor(n_estimators=1, max_depth=max_depth, random_state=0, n_jobs=1, warm_start=True) for _ in folds]
    sums = [np.zeros(len(test)) for _, test in folds]
    work = 0.0
    for s in range(1, stages + 1):
        t0 = time.perf_counter()
        trees = max(1, round(n_estimators * s / stages))
        rmses = []
        for forest, (fit, test), total in zip(forests, folds, sums):
            grown = len(getattr(forest, "estimators_", []))
            forest.set_params(n_estimators=trees).fit(X[fit], y[fit])
            for tree in forest.estimators_[grown:]: total += tree.predict(X[test])
            rmses.append(float(np.sqrt(np.mean((total / trees - y[test]) ** 2))))
        work += time.perf_counter() - t0
        track.report({{"cv_rmse": float(np.mean(rmses)), "work_s": work}}, step=s)
'''

GRID_TABLE = '''
[tool.nbprod.tune.{name}]
target = "benchrf:cv"
metric = "cv_rmse"
mode = "min"
search = "grid"
concurrency = 2
[tool.nbprod.tune.{name}.space]
n_estimators = {{grid = {n_estimators}}}
max_depth = {{grid = {max_depth}}}
'''

ASHA_TABLE = '''
[tool.nbprod.tune.asha]
target = "benchrf:cv_staged"
metric = "cv_rmse"
mode = "min"
search = "random"
trials = 27
concurrency = 2
seed = {seed}
scheduler = "asha"
asha = {{max_t = 27, grace_period = 1, reduction_factor = 3}}
[tool.nbprod.tune.asha.space]
n_estimators = {{randint = [50, 200]}}
max_depth = {{randint = [6, 14]}}
'''


def tables(seed: int) -> str:
    "The searches: `grid` as GRID is written, `costly_first` with each list's values largest first, and `asha`."
    grid = lambda name, arrange: GRID_TABLE.format(name=name, **{k: json.dumps(arrange(v)) for k, v in GRID.items()})
    return grid('grid', list) + grid('costly_first', lambda v: v[::-1]) + ASHA_TABLE.format(seed=seed)

GRIDSEARCH = '''
import json, sys, time
t0 = time.perf_counter()
import numpy as np
from sklearn.ensemble import RandomForestRegressor
from sklearn.model_selection import GridSearchCV, KFold
d = np.load(sys.argv[1])
search = GridSearchCV(RandomForestRegressor(random_state=0, n_jobs=1), json.loads(sys.argv[2]), cv=KFold(3),
                      scoring="neg_root_mean_squared_error", n_jobs=2, refit=False).fit(d["X"], d["y"])
r = search.cv_results_
print(json.dumps({"best_rmse": -float(search.best_score_), "best_params": search.best_params_,
                  "fit_s": float(np.sum(r["mean_fit_time"] + r["mean_score_time"]) * 3), "inside_s": time.perf_counter() - t0}))
'''


def make_data(path: Path):
    "The features and rentals of the 8,645 hours of 2011 (examples/bikeshare), as float arrays."
    import numpy as np
    sys.path.insert(0, str(ROOT/'examples'/'bikeshare'))
    from bikeshare.data import load_raw
    from bikeshare.features import make_features, target
    raw = load_raw(ROOT/'examples'/'bikeshare'/'data'/'Bikeshare.csv')
    np.savez(path, X=make_features(raw).to_numpy('float64'), y=target(raw).to_numpy('float64'))
    return len(raw)


def make_project(root: Path, data: Path, seed: int = 0):
    root.mkdir()
    (root/'pyproject.toml').write_text('[project]\nname = "bench"\n\n[tool.nbprod]\nexperiment = "bench"\n'
                                       + tables(seed))
    (root/'settings.ini').write_text('[DEFAULT]\n')
    (root/'benchrf.py').write_text(TRAIN.format(data=str(data)))
    subprocess.run(['git', 'init', '-q', '-b', 'main'], cwd=root, check=True)


def timed(cmd, cwd, env=None):
    t0 = time.time()
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    t1 = time.time()
    if r.returncode: raise SystemExit(f"{shlex.join(map(str, cmd))} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return t0, t1, r.stdout


def search_runs(root: Path, run_id: str):
    "The tuning run and its trial runs, from the project's MLflow store."
    sys.path.insert(0, str(ROOT))
    from nbprod.settings import load_settings
    from nbprod.store import experiment_id, tracking_client
    s = load_settings(root, env={})
    c = tracking_client(s)
    trials = c.search_runs([experiment_id(s)], filter_string=f"tags.`nbprod.parent_run` = '{run_id}'")
    return c.get_run(run_id), trials, c


def nbprod_tune(root: Path, name: str, env: dict) -> dict:
    t0, t1, out = timed([BIN/'nbprod', 'tune', name], root, env)
    run_id = out.split('run ')[1].split()[0]
    parent, trials, client = search_runs(root, run_id)
    starts = [r.info.start_time / 1000 for r in trials]
    ends = [r.info.end_time / 1000 for r in trials]
    work = [r.data.metrics.get('work_s', 0.0) for r in trials]
    finished = [r for r in trials if r.info.status == 'FINISHED']
    best = min(r.data.metrics['cv_rmse'] for r in finished)
    return {'wall_s': t1 - t0, 'best_rmse': best, 'trials': len(trials), 'stopped_early': sum(r.info.status == 'KILLED' for r in trials),
            'best_params': next({k: int(v) for k, v in r.data.params.items()} for r in finished if r.data.metrics['cv_rmse'] == best),
            'phases': {'start: command to the tuning run recorded': parent.info.start_time / 1000 - t0,
                       'start: tuning run to the first trial': min(starts) - parent.info.start_time / 1000,
                       'trials: first trial start to last trial end': max(ends) - min(starts),
                       'end: last trial to the command\'s exit': t1 - max(ends)},
            'work_s': sum(work), 'reports': sum(len(client.get_metric_history(r.info.run_id, 'cv_rmse')) for r in trials)}


def init_store(root: Path):
    "Create the project's MLflow store and experiment beforehand, as a project that has run anything has them."
    subprocess.run([sys.executable, '-c', 'from nbprod.settings import load_settings; from nbprod.store import experiment_id; '
                    'experiment_id(load_settings())'], cwd=root, check=True, capture_output=True)


def ray_head(log: Path, env: dict):
    "A running Ray (as on a cluster): `ray start --head` on 127.0.0.1; returns (process, address)."
    from nbprod.serving import free_port   # outside the ranges Ray takes its own ports from
    port = free_port()
    proc = subprocess.Popen([BIN/'ray', 'start', '--head', '--block', f'--port={port}', '--node-ip-address=127.0.0.1', '--num-cpus=2',
                             '--include-dashboard=false', '--disable-usage-stats'], stdout=open(log, 'w'), stderr=subprocess.STDOUT,
                            start_new_session=True, env=env)
    address, deadline = f'127.0.0.1:{port}', time.time() + 120
    while subprocess.run([BIN/'ray', 'status', f'--address={address}'], capture_output=True, env=env).returncode:
        if proc.poll() is not None or time.time() > deadline: raise SystemExit(f"ray start --head failed:\n{log.read_text()[-3000:]}")
        time.sleep(1)
    return proc, address


def stop_head(proc):
    import signal
    proc.send_signal(signal.SIGTERM)   # `ray start --block` stops the processes it started
    try: proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


SEARCHES = ('grid', 'costly_first', 'asha')


def order(i: int) -> tuple:
    "The searches in round i: the order turns by one each round, so that no search always runs first (or last) on the machine."
    return SEARCHES[i % len(SEARCHES):] + SEARCHES[:i % len(SEARCHES)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--rounds', type=int, default=1, help="rounds of the seven timings (medians reported)")
    ap.add_argument('--out', type=Path, default=RESULTS)
    a = ap.parse_args()
    con = Console()
    env = {k: v for k, v in os.environ.items() if not k.startswith('NBPROD_') and not k.startswith('RAY_')}
    env.update(COLUMNS='200', NO_COLOR='1', PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    ray_env = {**env, 'RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER': '0', 'RAY_AUTH_MODE': 'token'}
    rounds = []
    with tempfile.TemporaryDirectory() as d:
        data = Path(d)/'hours.npz'
        rows = make_data(data)
        for i in range(a.rounds):
            r = {}
            for variant in ('cold', 'warm'):
                root = Path(d)/f'bench{i}-{variant}'
                make_project(root, data, seed=i)
                init_store(root)
                head = None
                if variant == 'warm':
                    head, address = ray_head(Path(d)/f'head{i}.log', ray_env)
                    run_env = {**ray_env, 'NBPROD_RAY_ADDRESS': address}
                else: run_env = env
                try:
                    if variant == 'cold':
                        con.print(f"round {i + 1}/{a.rounds}: GridSearchCV")
                        g0, g1, gout = timed([sys.executable, '-c', GRIDSEARCH, str(data), json.dumps(GRID)], root, env)
                        r['gridsearchcv'] = {'wall_s': g1 - g0, **json.loads(gout)}
                    for name in order(i):
                        con.print(f"round {i + 1}/{a.rounds}: nbprod tune {name} ({variant} Ray)")
                        r[f'{name}_{variant}'] = nbprod_tune(root, name, run_env)
                finally:
                    if head is not None: stop_head(head)
            r['order'] = list(order(i))
            rounds.append(r)
    med = lambda f: statistics.median(f(r) for r in rounds)
    gsw = med(lambda r: r['gridsearchcv']['wall_s'])
    last = rounds[-1]
    grid_best = last['gridsearchcv']['best_rmse']
    t = Table(title=f"9-point random forest grid, 3-fold CV, {rows:,} rows (median of {a.rounds})", title_justify='left')
    for c in ('search', 'Ray', 'wall s', 'x GridSearchCV', 'best RMSE', 'vs grid best', 'trials'):
        t.add_column(c, justify='left' if c in ('search', 'Ray') else 'right')
    t.add_row('GridSearchCV n_jobs=2', '', f"{gsw:.1f}", '1.00', f"{grid_best:.3f}", '', '9 x 3 fits')
    summary = {}
    for key, label in (('grid_cold', 'nbprod tune grid'), ('costly_first_cold', 'nbprod tune grid, costly values first'),
                       ('asha_cold', 'nbprod tune asha'), ('grid_warm', 'nbprod tune grid'),
                       ('costly_first_warm', 'nbprod tune grid, costly values first'), ('asha_warm', 'nbprod tune asha')):
        w = med(lambda r: r[key]['wall_s'])
        ratio = med(lambda r: r[key]['wall_s'] / r['gridsearchcv']['wall_s'])
        gap = (last[key]['best_rmse'] - grid_best) / grid_best
        summary[key] = {'wall_s_median': w, 'ratio_to_gridsearchcv_median': ratio, 'best_rmse_last_round': last[key]['best_rmse'],
                        'gap_to_grid_best_last_round': gap, 'trials': last[key]['trials'], 'stopped_early_last_round': last[key]['stopped_early'],
                        'best_rmse_by_round': [r[key]['best_rmse'] for r in rounds],
                        'gap_to_grid_best_by_round': [(r[key]['best_rmse'] - r['gridsearchcv']['best_rmse']) / r['gridsearchcv']['best_rmse'] for r in rounds],
                        'wall_s_by_round': [r[key]['wall_s'] for r in rounds]}
        t.add_row(label, 'started' if key.endswith('cold') else 'running', f"{w:.1f}", f"{ratio:.2f}", f"{last[key]['best_rmse']:.3f}",
                  f"{gap:+.2%}", f"{last[key]['trials']}" + (f" ({last[key]['stopped_early']} stopped early)" if last[key]['stopped_early'] else ''))
    con.print(t)
    for key in ('grid_cold', 'grid_warm'):
        g = last[key]
        con.print(f"nbprod tune grid, {'local Ray started by the command' if key == 'grid_cold' else 'Ray already running'}: {g['wall_s']:.1f}s; "
                  f"the forests' fits {g['work_s']:.1f}s of CPU ({g['work_s'] / 2:.1f}s on 2 cores; GridSearchCV's fits and scoring "
                  f"{last['gridsearchcv']['fit_s']:.1f}s of CPU)")
        for k, v in g['phases'].items(): con.print(f"  {k}: {v:.1f}s")
    same_best = abs(last['grid_cold']['best_rmse'] - grid_best) < 1e-9
    ok = {k: summary[k]['ratio_to_gridsearchcv_median'] <= TARGET for k in ('grid_cold', 'grid_warm', 'costly_first_cold', 'costly_first_warm')}
    # every round's ASHA search (each its own seed) within 0.5% of the grid's best, and faster than the grid (medians)
    asha_ok = {v: all((r[f'asha_{v}']['best_rmse'] - r['gridsearchcv']['best_rmse']) / r['gridsearchcv']['best_rmse'] <= ASHA_WITHIN for r in rounds)
               and summary[f'asha_{v}']['wall_s_median'] < summary[f'grid_{v}']['wall_s_median'] for v in ('cold', 'warm')}
    con.print(f"target nbprod tune grid <= {TARGET}x GridSearchCV: cold Ray {'met' if ok['grid_cold'] else 'NOT met'} "
              f"({summary['grid_cold']['ratio_to_gridsearchcv_median']:.2f}x), running Ray {'met' if ok['grid_warm'] else 'NOT met'} "
              f"({summary['grid_warm']['ratio_to_gridsearchcv_median']:.2f}x); same best score as GridSearchCV: {same_best}")
    con.print(f"the same grid with its costly values first: cold Ray {summary['costly_first_cold']['ratio_to_gridsearchcv_median']:.2f}x, "
              f"running Ray {summary['costly_first_warm']['ratio_to_gridsearchcv_median']:.2f}x")
    con.print(f"target ASHA within {ASHA_WITHIN:.1%} of the grid's best in less time than the grid: cold {'met' if asha_ok['cold'] else 'NOT met'}, "
              f"running Ray {'met' if asha_ok['warm'] else 'NOT met'}")
    result = {'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'), 'cpus': os.cpu_count(),
              'platform': platform.platform(), 'python': platform.python_version(),
              'versions': {p: version(p) for p in ('nbprod', 'ray', 'scikit-learn', 'mlflow', 'optuna')},
              'command': f".venv/bin/python benchmarks/tune.py --rounds {a.rounds}", 'rows': rows, 'grid': GRID,
              'target_ratio': TARGET, 'target_met': ok, 'asha_target': ASHA_WITHIN, 'asha_target_met': asha_ok,
              'same_best_as_gridsearchcv': same_best, 'gridsearchcv_wall_s_median': gsw, 'summary': summary, 'rounds': rounds}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    con.print(f"wrote {a.out}")


if __name__ == '__main__':
    main()
