"""How fast is an nbprod endpoint, next to the plain servers it is built from?

One model, fitted once on six columns of the bike-share data (Ridge by default: its predict is cheap, so the servers'
own costs show; `--model hgb` for a HistGradientBoostingRegressor, the bike-share model's kind), served four ways on
127.0.0.1, each loaded with wrk (Debian's; `make sysdeps` installs it) at concurrency 1, 16 and 64, one record per
request:

  (a)  nbprod     `nbprod serve` of the registered model: API key, validation, audit log (fsync before each answer),
                  batching, on the HTTP proxy nbprod picks (HAProxy when installed); settings.ini defaults
  (b)  serve      a minimal hand-written Ray Serve deployment (numpy in, no checks, max_ongoing_requests=64 like
                  nbprod's), Serve's default proxy
  (b') serve-ha   the same deployment on Ray Serve's HAProxy ingress (RAY_SERVE_ENABLE_HA_PROXY=1,
                  RAY_SERVE_THROUGHPUT_OPTIMIZED=1)
  (c)  fastapi    the same handler in plain FastAPI on one uvicorn worker

Also: the CPU each setup's processes spent per request, and the cost of nbprod's own steps measured in this process.
Writes benchmarks/results/serve.json (serve-hgb.json with --model hgb). Run from the repository root:

    .venv/bin/python benchmarks/serve.py [--duration 10] [--concurrency 1,16,64] [--model ridge|hgb]
                                         [--only nbprod,serve,serve-ha,fastapi] [--set KEY=VALUE]
"""
import argparse, datetime, json, os, pickle, platform, re, shutil, signal, subprocess, sys, tempfile, time
import urllib.error, urllib.request
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RESULTS = Path(__file__).parent/'results'/'serve.json'
DATA = ROOT/'examples'/'bikeshare'/'data'/'Bikeshare.csv'
COLUMNS = ['temp', 'atemp', 'hum', 'windspeed', 'hr', 'workingday']
RECORD = {'temp': 0.62, 'atemp': 0.59, 'hum': 0.54, 'windspeed': 0.19, 'hr': 17, 'workingday': 1}
SETUPS = {'nbprod': "(a) nbprod endpoint: key, validation, audit log, batching", 'serve': "(b) minimal Ray Serve, default proxy",
          'serve-ha': "(b') minimal Ray Serve, HAProxy ingress", 'fastapi': "(c) plain FastAPI, one uvicorn worker"}
TARGETS = {'nbprod/serve-ha': 0.8, 'nbprod/serve': 3.0, 'p99_ms_at_16': 50.0}

# The minimal servers (b), (b') and (c): the same handler, one record in, one prediction out.
SERVER = """
import os, pickle, sys, signal, time
import numpy as np
from starlette.requests import Request
model, columns = pickle.load(open(sys.argv[2], 'rb'))
host, port = '127.0.0.1', int(sys.argv[3])

async def handle(request: Request):   # as lean as a hand-written handler gets: no DataFrame, no checks
    record = await request.json()
    return {'prediction': float(model.predict(np.array([[record[c] for c in columns]], dtype='float64'))[0])}

if sys.argv[1] == 'fastapi':
    import uvicorn
    from fastapi import FastAPI
    app = FastAPI()
    app.post('/')(handle)
    uvicorn.run(app, host=host, port=port, workers=1, log_level='warning', access_log=False)
else:
    import ray
    from ray import serve
    @serve.deployment(max_ongoing_requests=64)   # as nbprod's default: Serve's own (5) makes its router back off at c=16
    class Minimal:
        async def __call__(self, request: Request): return await handle(request)
    ray.init(address='local', include_dashboard=False, log_to_driver=False)
    serve.start(http_options={'host': host, 'port': port})
    serve.run(Minimal.bind(), route_prefix='/')
    signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        while True: time.sleep(1)
    except KeyboardInterrupt: ray.shutdown()
"""

LUA = """wrk.method = "POST"
wrk.body = '{body}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {key}"
"""


def free_port():
    from nbprod.serving import free_port   # outside the port ranges Ray picks its own from
    return free_port()


def post(url, key):
    req = urllib.request.Request(url, data=json.dumps(RECORD).encode(), method='POST',
                                 headers={'Content-Type': 'application/json', 'Authorization': f'Bearer {key}'})
    with urllib.request.urlopen(req, timeout=10) as r: return json.loads(r.read())


def wait_until_up(proc, url, key, seconds=240):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None: sys.exit(f"the server exited ({proc.returncode}): {proc.stderr.read() if proc.stderr else ''}")
        try: return post(url, key)
        except (urllib.error.URLError, OSError, ValueError): time.sleep(1)
    sys.exit(f"{url} did not answer in {seconds} s")


def stop(proc):
    if proc.poll() is None: proc.send_signal(signal.SIGINT)
    try: proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def ms(text):
    v, unit = re.match(r'([\d.]+)(us|ms|s)', text).groups()
    return float(v) * {'us': 1e-3, 'ms': 1, 's': 1e3}[unit]


def wrk(url, script, c, seconds):
    "Requests/s, p50 and p99 (ms) and errors of one wrk run."
    cmd = ['wrk', f'-t{min(2, c)}', f'-c{c}', f'-d{seconds}s', '--latency', '--timeout', '10s', '-s', str(script), url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60).stdout
    pct = dict(re.findall(r'^\s+(50|99)%\s+(\S+)', out, re.M))
    sock = re.search(r'Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)', out)
    non2xx = re.search(r'Non-2xx or 3xx responses: (\d+)', out)
    errors = (sum(map(int, sock.groups())) if sock else 0) + (int(non2xx.group(1)) if non2xx else 0)
    return {'rps': float(re.search(r'Requests/sec:\s+([\d.]+)', out).group(1)), 'p50_ms': ms(pct['50']), 'p99_ms': ms(pct['99']),
            'errors': errors, 'requests': int(re.search(r'(\d+) requests in', out).group(1)), 'wrk': ' '.join(cmd)}


def make_model(tmp, kind):
    "The model, fitted once, pickled for the plain servers and registered in an nbprod project for `nbprod serve`."
    import warnings
    import mlflow, pandas as pd
    from sklearn.ensemble import HistGradientBoostingRegressor
    from sklearn.base import clone
    from sklearn.linear_model import Ridge
    from nbprod import track
    from nbprod.auth import create_key
    from nbprod.settings import load_settings
    df = pd.read_csv(DATA)
    X, y = df[COLUMNS].astype({'hr': 'int64', 'workingday': 'int64'}), df['bikers'].astype('float64')
    model = (HistGradientBoostingRegressor(max_iter=100, random_state=0) if kind == 'hgb' else Ridge()).fit(X, y)
    plain = clone(model).fit(X.to_numpy(dtype='float64'), y)    # the same fit, without feature names: numpy in, no DataFrame
    (tmp/'model.pkl').write_bytes(pickle.dumps((plain, COLUMNS)))
    proj = tmp/'project'
    proj.mkdir()
    (proj/'pyproject.toml').write_text('[project]\nname = "bench"\n\n[tool.nbprod]\n\n[tool.nbprod.serve.models.bench]\n')
    (proj/'settings.ini').write_text('[DEFAULT]\nlog_level = WARNING\n')
    cwd = os.getcwd()
    os.chdir(proj)
    try:
        s = load_settings(proj, env={})
        try:
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')
                track.log_model(model, X_example=X, registered_name='bench', alias='champion',
                                skops_trusted_types=['sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor'])
        finally: track.end()
        _, key = create_key(s, 'bench', ['bench'])
    finally: os.chdir(cwd)
    return model, X, key, proj


def run_setup(name, tmp, key, proj, levels, seconds, settings=()):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(('NBPROD_', 'RAY_SERVE_'))}
    if name == 'nbprod':
        env.update({f'NBPROD_{k.upper()}': v for k, v in settings}, NBPROD_SERVE_PORT=str(port))
        cmd, cwd, url = [str(BIN/'nbprod'), 'serve'], proj, f'http://127.0.0.1:{port}/v1/models/bench/predict'
    else:
        (tmp/'server.py').write_text(SERVER)
        if name == 'serve-ha': env.update(RAY_SERVE_ENABLE_HA_PROXY='1', RAY_SERVE_THROUGHPUT_OPTIMIZED='1')
        if name == 'serve': env['RAY_SERVE_ENABLE_HA_PROXY'] = '0'
        cmd = [sys.executable, str(tmp/'server.py'), 'fastapi' if name == 'fastapi' else 'ray', str(tmp/'model.pkl'), str(port)]
        cwd, url = tmp, f'http://127.0.0.1:{port}/'
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        first = wait_until_up(proc, url, key)
        script = tmp/'post.lua'
        script.write_text(LUA.format(body=json.dumps(RECORD), key=key))
        wrk(url, script, 16, 3)                                   # warm up
        out = {}
        for c in levels:
            before = cpu_by_process(proc)
            out[str(c)] = r = wrk(url, script, c, seconds)
            after = cpu_by_process(proc)
            used = {}
            for pid, (role, t) in after.items():
                if pid in before: used[role] = used.get(role, 0) + t - before[pid][1]
            r['cpu_us_per_request'] = {role: round(t / max(r['requests'], 1) * 1e6, 1) for role, t in sorted(used.items())}
        return first, out
    finally: stop(proc)


def cpu_by_process(proc):
    "{pid: (role, CPU seconds)} of the server and every process it started (Ray's included)."
    import psutil
    root = psutil.Process(proc.pid)
    out = {}
    for p in [root, *root.children(recursive=True)]:
        try: cmd, t = ' '.join(p.cmdline()), p.cpu_times()
        except psutil.Error: continue
        role = ('explain replica' if 'nbprod-explain' in cmd else 'replica' if 'ServeReplica' in cmd else 'haproxy' if 'bin/haproxy' in cmd else 'serve proxy' if 'ProxyActor' in cmd
                else 'server' if p.pid == proc.pid else 'other ray processes')
        out[p.pid] = (role, t.user + t.system)
    return out


def own_cost(proj, key, n=2000):
    "Microseconds per request of nbprod's own code, in this process: the app's lean path end to end (ASGI in, JSON out, audit"
    "fsync included, the model called directly, no batching), and its parts."
    import asyncio, timeit
    from nbprod.api import build_app, run_model
    from nbprod.serving import ModelServer
    from nbprod.settings import load_settings
    async def direct(model, variant, rows): return run_model(model, variant, rows)
    server = ModelServer(load_settings(proj, env={}), predict=direct, replica='bench')
    app, endpoint = build_app(server.endpoint), server.endpoint
    model = endpoint.models['bench']
    body = json.dumps(RECORD).encode()
    headers = [(b'content-type', b'application/json'), (b'authorization', f'Bearer {key}'.encode()), (b'content-length', str(len(body)).encode())]
    scope = {'type': 'http', 'method': 'POST', 'path': '/v1/models/bench/predict', 'headers': headers, 'root_path': '', 'query_string': b''}
    async def receive(): return {'type': 'http.request', 'body': body, 'more_body': False}
    async def send(msg): pass
    async def many():
        for _ in range(n): await app(scope, receive, send)
    t0 = time.perf_counter()
    asyncio.run(many())
    whole = (time.perf_counter() - t0) / n * 1e6
    rows = model.validator.parse_records(body)[0]
    variant = model.variants[0]
    audit = endpoint.audit['bench']
    records = endpoint._records(model, variant, rows, [1.0], 'r', None, None, time.perf_counter())
    each = lambda f, k=n: min(timeit.repeat(f, number=k, repeat=3)) / k * 1e6
    parts = {'API key check': each(lambda: endpoint.keys.check(f'Bearer {key}', 'bench')),
             'validation (pydantic) of the body': each(lambda: model.validator.parse_records(body)),
             'DataFrame of 1 record': each(lambda: model.validator.frame(rows)),
             'DataFrame of 32 records, per record': each(lambda: model.validator.frame(rows * 32), n // 10) / 32,
             'model.predict of 1 record (DataFrame in)': each(lambda: run_model(model, variant, rows)),
             'model.predict of 32 records, per record': each(lambda: run_model(model, variant, rows * 32), n // 10) / 32,
             'audit record encoded': each(lambda: audit.encode(records[0])),
             'audit write + fsync (once per group of requests)': each(lambda: audit.write_sync(records), 200),
             'JSON answer': each(lambda: json.dumps({'request_id': 'r', 'model': 'bench', 'version': '1', 'variant': 'champion', 'prediction': 1.0}))}
    audit.close()
    return {'whole lean path, sequential, unbatched': round(whole, 1), **{k: round(v, 1) for k, v in parts.items()}}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--duration', type=int, default=10, help="seconds of load per concurrency level")
    ap.add_argument('--concurrency', default='1,16,64')
    ap.add_argument('--only', default=','.join(SETUPS), help="setups to run, comma-separated")
    ap.add_argument('--model', choices=['ridge', 'hgb'], default='ridge',
                    help="ridge: Ridge, the cheapest predict, so the servers' own costs show; hgb: HistGradientBoostingRegressor(max_iter=100), "
                         "the bike-share model's kind, ~1 ms a predict call")
    ap.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                    help="a setting of the nbprod endpoint (settings.ini key), e.g. --set batch_wait_ms=0; repeatable")
    ap.add_argument('--out', type=Path, default=None, help="default: benchmarks/results/serve.json (serve-hgb.json for --model hgb)")
    args = ap.parse_args()
    args.out = args.out or (RESULTS if args.model == 'ridge' else RESULTS.with_name('serve-hgb.json'))
    if not shutil.which('wrk'): sys.exit("wrk is not installed: `make sysdeps` installs Debian's wrk")
    from rich.console import Console
    from rich.table import Table
    console = Console()
    levels = [int(c) for c in args.concurrency.split(',')]
    setups = [s for s in args.only.split(',') if s]
    with tempfile.TemporaryDirectory(prefix='nbprod-bench-serve-') as d:
        tmp = Path(d)
        with console.status("fitting and registering the model"): model, X, key, proj = make_model(tmp, args.model)
        import pandas as pd
        expected = float(model.predict(pd.DataFrame([RECORD]))[0])
        results = {}
        for name in setups:
            with console.status(f"{SETUPS[name]}: starting, then wrk at concurrency {args.concurrency}, {args.duration} s each"):
                first, results[name] = run_setup(name, tmp, key, proj, levels, args.duration, [kv.split('=', 1) for kv in args.set])
            got = first.get('prediction')
            assert abs(got - expected) < 1e-6, (name, got, expected)   # the same model answers the same
            console.print(f"{SETUPS[name]}: " + ', '.join(f"c={c} {r['rps']:,.0f}/s p99 {r['p99_ms']:.1f} ms" for c, r in results[name].items()))
        breakdown = own_cost(proj, key) if 'nbprod' in setups else None
        from nbprod.audit import read_audit
        audited = len(read_audit(proj/'.nbprod'/'audit', 'bench')) if 'nbprod' in setups else None
    ratios = {}
    for c in map(str, levels):
        for other in ('serve-ha', 'serve', 'fastapi'):
            if 'nbprod' in results and other in results:
                ratios.setdefault(c, {})[f'nbprod/{other}'] = round(results['nbprod'][c]['rps'] / results[other][c]['rps'], 3)
    checks = {}
    for c in ('16', '64'):
        for k in ('nbprod/serve-ha', 'nbprod/serve'):
            if c in ratios and k in ratios[c]: checks[f'{k} at c={c} >= {TARGETS[k]}'] = ratios[c][k] >= TARGETS[k]
    if 'nbprod' in results and '16' in results['nbprod']: checks['nbprod p99 at c=16 < 50 ms'] = results['nbprod']['16']['p99_ms'] < 50
    if 'nbprod' in results: checks['nbprod: zero errors'] = all(r['errors'] == 0 for r in results['nbprod'].values())

    table = Table(title="requests/s (p50 / p99 ms, errors) — one record per request")
    table.add_column("setup")
    for c in levels: table.add_column(f"c={c}", justify='right')
    for name in setups:
        table.add_row(SETUPS[name], *[f"{r['rps']:,.0f} ({r['p50_ms']:.1f} / {r['p99_ms']:.1f}, {r['errors']})" for r in results[name].values()])
    console.print(table)
    for c, rs in ratios.items(): console.print(f"c={c}: " + ', '.join(f"{k} {v:.2f}x" for k, v in rs.items()))
    for k, ok in checks.items(): console.print(f"{'✓' if ok else '✗'} {k}")
    for name in setups:
        r = results[name][str(levels[-1])]
        console.print(f"CPU per request at c={levels[-1]}, {name}: " + ', '.join(f"{k} {v:.0f} µs" for k, v in r['cpu_us_per_request'].items()))
    if breakdown: console.print("nbprod's own code, µs per request: " + ', '.join(f"{k} {v:.0f}" for k, v in breakdown.items()))
    out = {'benchmark': 'serve', 'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
           'command': ' '.join(['.venv/bin/python', 'benchmarks/serve.py', *sys.argv[1:]]), 'cpus': os.cpu_count(),
           'platform': platform.platform(), 'python': platform.python_version(),
           'versions': {p: version(p) for p in ('nbprod', 'ray', 'fastapi', 'uvicorn', 'scikit-learn', 'mlflow')},
           'haproxy': shutil.which('haproxy') is not None, 'model': f"{type(model).__name__} on {', '.join(COLUMNS)}",
           'record': RECORD, 'duration_s': args.duration, 'nbprod_settings': dict(kv.split('=', 1) for kv in args.set), 'setups': {k: SETUPS[k] for k in setups}, 'results': results,
           'ratios': ratios, 'nbprod_own_cost_us': breakdown, 'targets': TARGETS, 'checks': checks, 'nbprod_audited_records': audited}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + '\n')
    console.print(f"written {args.out}")


if __name__ == '__main__':
    main()
