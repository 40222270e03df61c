"""How long does the dashboard take to show a large store?

A store holding 1,000 runs (pipelines with their steps, and notebook runs, with parameters and metrics), 50 versions of a
registered model (with their alias history and reference profiles) and 500 hourly profile windows with their traffic
counts (tests/dashboard_store.py writes it through MLflow's client and nbprod's own writers). Then, --rounds times:

1. Server side, in Streamlit's AppTest, each round in a fresh process with the page's modules imported (as in a running
   dashboard) and nothing cached: the Overview page (the app's entry and its first page), then the Runs page with its
   caches cleared, until the script has run to its end. The import time is reported apart.
2. In a real browser (Debian's chromium, headless, through Playwright), each round against a dashboard started
   afresh by `nbprod dashboard --detach` (which returns once the server answers and has imported what pages need):
   from navigation to the page's last element drawn (Overview: the runs-per-day chart; Runs: the metrics table of the
   run it opens).
3. The plain tool: `mlflow.search_runs` of the 1,000 runs into a DataFrame, and `MlflowClient.search_model_versions`,
   in the same processes, as the floor the pages stand on.

Target: each page under 3 s to a full first render. Writes benchmarks/results/dashboard.json. From the repository root:

    .venv/bin/python benchmarks/dashboard.py [--runs 1000] [--versions 50] [--windows 500] [--rounds 3] [--no-browser]
"""
import argparse, datetime, json, os, platform, statistics, subprocess, sys, tempfile, time
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT/'tests'))
RESULTS = ROOT/'benchmarks'/'results'/'dashboard.json'
TARGET_S = 3.0
CHROMIUM = '/usr/bin/chromium'

SERVER_SIDE = r'''
import json, os, sys, time
t = {}
t0 = time.perf_counter()
import mlflow
from mlflow import MlflowClient
from nbprod.settings import load_settings
s = load_settings(os.environ['NBPROD_PROJECT'])
t['import_mlflow_s'] = time.perf_counter() - t0
t0 = time.perf_counter()
mlflow.set_tracking_uri(s.tracking_uri)
df = mlflow.search_runs(experiment_names=[s.experiment], max_results=5000)
t['mlflow_search_runs_s'] = time.perf_counter() - t0
t['runs'] = len(df)
t0 = time.perf_counter()
mv = MlflowClient(s.tracking_uri, s.registry_uri).search_model_versions("name = 'bikes'")
t['mlflow_search_model_versions_s'] = time.perf_counter() - t0
t0 = time.perf_counter()
import altair, streamlit as st, nbprod.dashboard, nbprod.dashboard_data   # what a running dashboard has imported already
t['import_page_modules_s'] = time.perf_counter() - t0
from streamlit.testing.v1 import AppTest
st.cache_data.clear()
at = AppTest.from_file(sys.argv[1], default_timeout=120)
t0 = time.perf_counter()
at.run()
t['overview_s'] = time.perf_counter() - t0
assert not at.exception, at.exception
assert len(at.dataframe) >= 2 and {m.label for m in at.metric} >= {'models served'}
st.cache_data.clear()
t0 = time.perf_counter()
at.switch_page('runs.py').run()
t['runs_s'] = time.perf_counter() - t0
assert not at.exception, at.exception
assert len(at.dataframe[0].value) == t['runs'], (len(at.dataframe[0].value), t['runs'])
print(json.dumps(t))
'''


def server_side(root: Path, entry: Path) -> dict:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith('NBPROD_')}, 'NBPROD_PROJECT': str(root)}
    r = subprocess.run([sys.executable, '-c', SERVER_SIDE, str(entry)], env=env, cwd=root, capture_output=True, text=True, timeout=600)
    if r.returncode: sys.exit(f"the server-side round failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def browser(root: Path) -> dict:
    "Seconds from navigation to each page's last element, on a dashboard started for this round."
    from playwright.sync_api import sync_playwright
    from nbprod.serving import free_port
    nbprod = str(Path(sys.executable).parent/'nbprod')
    env = {k: v for k, v in os.environ.items() if not k.startswith('NBPROD_')}
    port = free_port()
    subprocess.run([nbprod, 'dashboard', '--detach', '--port', str(port)], cwd=root, env=env, check=True, capture_output=True, timeout=120)
    out = {}
    try:
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=['--no-sandbox'])
            page = b.new_page(viewport={'width': 1400, 'height': 1000})
            t0 = time.perf_counter()
            page.goto(f"http://127.0.0.1:{port}/")
            page.get_by_text('Runs per day').wait_for(timeout=120_000)
            page.locator('.vega-embed canvas, .vega-embed svg').last.wait_for(timeout=120_000)
            out['overview_s'] = time.perf_counter() - t0
            t0 = time.perf_counter()
            page.goto(f"http://127.0.0.1:{port}/runs")
            page.get_by_text('Parameters', exact=True).wait_for(timeout=120_000)
            page.get_by_text('Metrics', exact=True).wait_for(timeout=120_000)
            out['runs_s'] = time.perf_counter() - t0
            b.close()
    finally:
        subprocess.run([nbprod, 'dashboard', '--stop'], cwd=root, env=env, capture_output=True, timeout=60)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--runs', type=int, default=1000)
    ap.add_argument('--versions', type=int, default=50)
    ap.add_argument('--windows', type=int, default=500)
    ap.add_argument('--rounds', type=int, default=3)
    ap.add_argument('--no-browser', action='store_true', help="skip the browser rounds (no chromium here)")
    args = ap.parse_args()
    from dashboard_store import fill
    import nbprod_apps
    entry = Path(nbprod_apps.__file__).parent/'dashboard'/'app.py'
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)/'toyshop'
        t0 = time.perf_counter()
        fill(root, runs=args.runs, versions=args.versions, windows=args.windows, awaiting=False)
        fill_s = time.perf_counter() - t0
        print(f"filled a store with {args.runs} runs, {args.versions} versions, {args.windows} windows in {fill_s:.0f}s")
        server, web = [], []
        for i in range(args.rounds):
            server.append(server_side(root, entry))
            print(f"round {i + 1}: AppTest overview {server[-1]['overview_s']:.2f}s, runs {server[-1]['runs_s']:.2f}s; "
                  f"mlflow.search_runs {server[-1]['mlflow_search_runs_s']:.2f}s")
            if not args.no_browser:
                web.append(browser(root))
                print(f"round {i + 1}: browser overview {web[-1]['overview_s']:.2f}s, runs {web[-1]['runs_s']:.2f}s")
    med = lambda rows, k: statistics.median(r[k] for r in rows)
    result = {
        'what': "time to a full first render of the dashboard's Overview and Runs pages on a large store (nothing cached), "
                "against mlflow.search_runs of the same runs",
        'command': 'benchmarks/dashboard.py ' + ' '.join(sys.argv[1:]),
        'when': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
        'machine': {'cpus': os.cpu_count(), 'python': platform.python_version(), 'platform': platform.platform()},
        'versions': {p: version(p) for p in ('streamlit', 'mlflow', 'altair', 'nbprod')},
        'store': {'runs': args.runs, 'model_versions': args.versions, 'profile_windows': args.windows, 'fill_s': round(fill_s, 1)},
        'rounds': args.rounds,
        'apptest_s': {'overview': round(med(server, 'overview_s'), 3), 'runs': round(med(server, 'runs_s'), 3)},
        'browser_s': {'overview': round(med(web, 'overview_s'), 3), 'runs': round(med(web, 'runs_s'), 3)} if web else None,
        'plain_mlflow_s': {'search_runs': round(med(server, 'mlflow_search_runs_s'), 3),
                           'search_model_versions': round(med(server, 'mlflow_search_model_versions_s'), 3)},
        'ratio_to_search_runs': {'overview_apptest': round(med(server, 'overview_s') / med(server, 'mlflow_search_runs_s'), 2),
                                 'runs_apptest': round(med(server, 'runs_s') / med(server, 'mlflow_search_runs_s'), 2)},
        'target_s': TARGET_S,
        'raw': {'apptest': server, 'browser': web},
    }
    worst = max([*result['apptest_s'].values(), *(result['browser_s'] or {}).values()])
    result['meets_target'] = worst < TARGET_S
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + '\n')
    print(json.dumps({k: result[k] for k in ('apptest_s', 'browser_s', 'plain_mlflow_s', 'ratio_to_search_runs', 'meets_target')}, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == '__main__':
    main()
