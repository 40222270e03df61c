"""Replay July to December 2011 to the bike-share endpoint, month by month, as a time-lapse: each month's hours are sent
as predictions within one profile window, their rentals come back as labels a week late, and after each month
`nbprod monitor check` looks at drift and performance, records alerts and (retrain = auto) runs the retrain loop:
pipeline, evaluation, canary, promotion or rollback. Everything lands in the replay's own store (.nbprod-replay/,
started afresh), under the `replay` profile of settings.ini; the CLI shows it afterwards:

    python scripts/replay.py [--months 7,8,9,10,11,12] [--threads 4]
    nbprod monitor drift bikeshare --profile replay
    nbprod monitor history bikeshare --profile replay

Run from examples/bikeshare (`make replay`).
"""
import argparse, json, os, shutil, signal, subprocess, sys, threading, time, urllib.error, urllib.request
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # the project's own package, as nbprod run does
from bikeshare.data import MONTHS, load_raw
from bikeshare.features import INPUTS, TARGET

PROFILE = 'replay'
NBPROD = str(Path(sys.executable).parent/'nbprod')
NAMES = {v: k for k, v in MONTHS.items()}


def call(url, body, key, headers=None):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method='POST',
                                 headers={'Content-Type': 'application/json', 'Authorization': f'Bearer {key}', **(headers or {})})
    for attempt in range(5):
        try:
            with urllib.request.urlopen(req, timeout=60) as r: return json.loads(r.read())
        except urllib.error.HTTPError as e:
            if e.code != 503 or attempt == 4: raise SystemExit(f"{url}: HTTP {e.code}: {e.read().decode(errors='replace')}")
            time.sleep(float(e.headers.get('Retry-After') or 1))   # over the endpoint's limits: wait as it asks


def send_month(url, key, hours, threads):
    "Each hour as one prediction request (request id day-hour), from `threads` clients; returns {request id: version}."
    answered, lock, todo = {}, threading.Lock(), list(hours.to_dict('records'))
    def client():
        while True:
            with lock:
                if not todo: return
                h = todo.pop()
            rid = f"{h['day']}-{h['hr']}"
            out = predict(url, {k: h[k] for k in INPUTS}, key, rid)
            with lock: answered[rid] = out['version']
    workers = [threading.Thread(target=client) for _ in range(threads)]
    for w in workers: w.start()
    for w in workers: w.join()
    return answered


def predict(url, record, key, rid):
    return call(f'{url}/v1/models/bikeshare/predict', record, key, {'X-Request-ID': rid})


def send_labels(url, key, hours):
    "The rentals of `hours`, as labels of the predictions made for them."
    labels = [{'request_id': f"{h.day}-{h.hr}", 'label': float(getattr(h, TARGET))} for h in hours.itertuples()]
    for i in range(0, len(labels), 1000): call(f'{url}/v1/feedback', {'model': 'bikeshare', 'labels': labels[i:i + 1000]}, key)
    return len(labels)


def wait_ready(proc, url, seconds=300):
    deadline = time.time() + seconds
    while True:
        if proc.poll() is not None: raise SystemExit(f"nbprod serve exited ({proc.returncode})")
        try:
            with urllib.request.urlopen(f'{url}/readyz', timeout=5) as r:
                if r.status == 200: return
        except (urllib.error.URLError, OSError): pass
        if time.time() > deadline: raise SystemExit("the endpoint did not become ready")
        time.sleep(1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--months', default='7,8,9,10,11,12', help="months of 2011 to replay, in order")
    ap.add_argument('--threads', type=int, default=4, help="clients sending at once")
    args = ap.parse_args()
    os.chdir(ROOT)
    os.environ['NBPROD_PROFILE'] = PROFILE
    os.environ.setdefault('MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR', 'false')
    from rich.console import Console
    from nbprod.alerts import check
    from nbprod.auth import create_key
    from nbprod.settings import load_settings
    console = Console()
    s = load_settings()
    if s.store.exists(): shutil.rmtree(s.store)   # the replay's own store (settings.ini [replay]), started afresh
    months = [int(m) for m in args.months.split(',')]
    hours = load_raw('data/Bikeshare.csv')
    console.print(f"[bold]replay[/bold] of {', '.join(NAMES[m] for m in months)} 2011 into {s.store}, one month per {s.profile_window_s}-second window")
    console.print("training the first champion on January to June (the train pipeline)")
    r = subprocess.run([NBPROD, 'run', 'train'], capture_output=True, text=True)
    if r.returncode: raise SystemExit(r.stdout + r.stderr)
    _, key = create_key(s, 'replay', ['bikeshare'])
    serve = subprocess.Popen([NBPROD, 'serve'], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f'http://{s.serve_host}:{s.serve_port}'

    def step(e): console.print(f"    loop {e.loop}: [bold]{e.step}[/bold]: {e.reasons}", highlight=False)
    try:
        wait_ready(serve, url)
        late = None                                        # last week of the previous month: its labels come a week late
        for m in months:
            time.sleep(s.profile_window_s - time.time() % s.profile_window_s + 0.5)   # a fresh window for the month
            month = hours[hours.month == m]
            versions = send_month(url, key, month, args.threads)
            cut = month.day.max() - 7
            labelled = send_labels(url, key, pd.concat([late, month[month.day <= cut]]) if late is not None else month[month.day <= cut])
            late = month[month.day > cut]
            served = ', '.join(f"v{v}: {n}" for v, n in sorted(pd.Series(versions).value_counts().items()))
            console.print(f"[bold]{NAMES[m]}[/bold]: {len(month)} hours predicted ({served}), {labelled} labels arrived")
            time.sleep(max(0, s.profile_window_s - time.time() % s.profile_window_s + 0.5))   # drift judges finished windows
            res = check(s, on_step=step)
            for h in res.models:
                console.print(f"    {NAMES[m]} is {h.level}: drift {h.drift or '-'}, performance {h.performance or '-'}", highlight=False)
            found = {}
            for a in res.new: found.setdefault((a.kind, a.level), []).append(a)
            for (kind, level), alerts in sorted(found.items()):
                what = ', '.join(a.subject for a in alerts) if kind == 'drift' else '; '.join(a.message for a in alerts)
                console.print(f"    new {kind} alerts ({level}): {what}", highlight=False)
        if late is not None: send_labels(url, key, late)
        time.sleep(max(0, s.canary_watch_s - 5))
        res = check(s, on_step=step)                           # the last labels, and a canary still under watch
    finally:
        serve.send_signal(signal.SIGINT)
        try: serve.wait(timeout=120)
        except subprocess.TimeoutExpired: serve.kill(); serve.wait()
    for cmd in (['monitor', 'drift', 'bikeshare'], ['monitor', 'performance', 'bikeshare'], ['monitor', 'history', 'bikeshare']):
        console.print(f"\n$ nbprod {' '.join(cmd)} --profile {PROFILE}")
        subprocess.run([NBPROD, *cmd])


if __name__ == '__main__':
    main()
