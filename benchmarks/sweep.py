"""How much faster is `nbprod sweep` than the same grid run as sequential `papermill` calls?

Creates a throw-away nbprod project whose notebook does ~1 s of CPU work per point, times (wall clock, as
subprocesses) one `nbprod sweep` of `--points` points against as many sequential `papermill` CLI calls, and writes
benchmarks/results/sweep.json. Run from the repository root:

    .venv/bin/python benchmarks/sweep.py [--points 16] [--repeats 2]
"""
import argparse, datetime, json, os, platform, re, shlex, signal, statistics, subprocess, sys, tempfile, time
from importlib.metadata import version
from pathlib import Path
from urllib.parse import unquote, urlparse

import nbformat
from nbformat.v4 import new_code_cell, new_notebook
from rich.console import Console
from rich.table import Table

BIN = Path(sys.executable).parent          # the venv's bin/ (not resolved: keep the venv's python)
TARGET = 1.6                               # nbprod sweep must be at least this many times faster than papermill
RESULTS = Path(__file__).parent/'results'/'sweep.json'

# The work: a pure-Python LCG loop (CPU-bound, holds one core), calibrated here to ~1 s.
WORK = """t0 = time.perf_counter()
acc = seed
for _ in range({n}): acc = (acc * 1103515245 + 12345) & 0x7fffffff
score = acc / 2**31
work_seconds = time.perf_counter() - t0
print(f"work_seconds={{work_seconds:.4f}}")"""
# Tracking: under nbprod (NBPROD_RUN_FILE/NBPROD_RUN_ID set) the metrics go to the point's run; under plain papermill
# the notebook logs nothing (unless BENCH_TRACK is set: then `track` makes an interactive run, see the breakdown).
LOG = """if os.environ.get('NBPROD_RUN_FILE') or os.environ.get('NBPROD_RUN_ID') or os.environ.get('BENCH_TRACK'):
    track.log_metrics({'score': score, 'work_seconds': work_seconds})"""
CALIBRATE = """import json, sys, time
def work(n, seed=0):
    t0 = time.perf_counter(); acc = seed
    for _ in range(n): acc = (acc * 1103515245 + 12345) & 0x7fffffff
    return time.perf_counter() - t0
n = 200_000
while (t := work(n)) < 0.2: n *= 2
n = int(n * float(sys.argv[1]) / t)
print(json.dumps({'n': n, 'seconds': sorted(work(n) for _ in range(3))[1]}))
"""
RAY_PROBE = """import json, logging, time
t0 = time.perf_counter()
import ray
t1 = time.perf_counter()
from nbprod.cluster import connect
from nbprod.settings import load_settings
s = load_settings()
t2 = time.perf_counter()
connect(s)          # what `nbprod sweep` does: ray.init(address='local', ...)
t3 = time.perf_counter()
ray.shutdown()
t4 = time.perf_counter()
print(json.dumps({'import ray': t1 - t0, 'ray.init (local)': t3 - t2, 'ray.shutdown': t4 - t3}))
"""
KERNEL_PROBE = """import json, time
from jupyter_client.manager import start_new_kernel
out = []
for _ in range(3):
    t = time.perf_counter()
    km, kc = start_new_kernel(kernel_name='python3')
    out.append(time.perf_counter() - t)
    kc.stop_channels(); km.shutdown_kernel(now=True)
print(json.dumps(sorted(out)[1]))
"""


def make_project(root: Path, n: int):
    "A minimal nbprod project: pyproject.toml, empty settings.ini, nbs/work.ipynb with parameter `seed` and ~1 s of work."
    (root/'pyproject.toml').write_text('[project]\nname = "bench"\n\n[tool.nbprod]\nexperiment = "bench"\n')
    (root/'settings.ini').write_text('')
    nb = new_notebook(cells=[new_code_cell('seed = 0', metadata={'tags': ['parameters']}),
                             new_code_cell('import os, time\nfrom nbprod import track'),
                             new_code_cell(WORK.format(n=n)), new_code_cell(LOG)])
    nb.metadata.kernelspec = {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'}
    (root/'nbs').mkdir()
    (root/'out').mkdir()
    nbformat.write(nb, root/'nbs'/'work.ipynb')


def git_state() -> dict:
    "The repository's commit and whether nbprod/ differs from it (best effort)."
    git = lambda *a: subprocess.run(['git', *a], cwd=Path(__file__).parent, capture_output=True, text=True).stdout.strip()
    return dict(commit=git('rev-parse', 'HEAD'), nbprod_dirty=bool(git('status', '--porcelain', '--', 'nbprod')))


def load() -> float: return float(Path('/proc/loadavg').read_text().split()[0])


def cpu_ticks() -> tuple[int, int]:
    "(busy, total) jiffies of all CPUs since boot, every process on the machine."
    v = [int(x) for x in Path('/proc/stat').read_text().split('\n', 1)[0].split()[1:]]
    idle = v[3] + v[4]
    return sum(v) - idle, sum(v)


def ray_processes(driver: int) -> list[int]:
    "Processes of the local Ray that process `driver` started (Ray names its session session_<date>_<driver pid>)."
    mine = re.compile(rf'session_[-_0-9]+_{driver}\b')
    out = []
    for p in Path('/proc').iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid(): continue
        try: cmd = (p/'cmdline').read_bytes().replace(b'\0', b' ').decode(errors='replace')
        except OSError: continue
        if mine.search(cmd): out.append(int(p.name))
    return sorted(out)


LEFT = []   # Ray processes that outlived the process that started them (ended here, and reported)


def reap_ray(driver: int, grace: float = 15):
    "Waits for the Ray processes `driver` started to end; ends (SIGTERM, by pid) and records any still running after `grace`."
    deadline = time.monotonic() + grace
    while (left := ray_processes(driver)) and time.monotonic() < deadline: time.sleep(0.5)
    for pid in left:
        LEFT.append(pid)
        try: os.kill(pid, signal.SIGTERM)
        except ProcessLookupError: pass


def timed(cmd, cwd, env) -> tuple[float, float, float]:
    "(seconds, wall-clock start, end) of `cmd`; raises with its output when it fails."
    start, t = time.time(), time.perf_counter()
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate()
    elapsed = time.perf_counter() - t
    reap_ray(p.pid)
    if p.returncode: raise RuntimeError(f"{shlex.join(map(str, cmd))} exited {p.returncode}\n{err}{out}")
    return elapsed, start, start + elapsed


def probe(code, cwd, env, *args):
    p = subprocess.Popen([sys.executable, '-c', code, *map(str, args)], cwd=cwd, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    out, err = p.communicate()
    reap_ray(p.pid)
    if p.returncode: raise RuntimeError(f"probe failed\n{err}")
    return json.loads(out.strip().splitlines()[-1])


def notebook_timing(path) -> dict:
    "From papermill's metadata in an executed work notebook: start/end (epoch s), kernel start-up, cell durations."
    nb = nbformat.read(path, as_version=4)
    ts = lambda iso: datetime.datetime.fromisoformat(iso).timestamp()
    meta, code = nb.metadata.papermill, [c for c in nb.cells if c.cell_type == 'code']
    roles = {'import os': 'import', 't0 = ': 'work', 'if os.environ': 'log'}
    out = dict(start=ts(meta['start_time']), end=ts(meta['end_time']),
               kernel=ts(code[0].metadata.papermill['start_time']) - ts(meta['start_time']))
    out.update({f'{role}_cell': c.metadata.papermill['duration'] for c in code
                for head, role in roles.items() if c.source.startswith(head)})
    return out


def med(rows, key): return statistics.median(r[key] for r in rows)


def sweep_timeline(root: Path, runs: list[dict]) -> list[dict]:
    "Per nbprod sweep: where its points' time went, from the project's SQLite store and the stored output notebooks."
    from mlflow import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{root/'.nbprod'/'mlflow.db'}")
    exp = client.get_experiment_by_name('bench')
    parents = client.search_runs([exp.experiment_id], "tags.`nbprod.kind` = 'sweep'", order_by=['attributes.start_time ASC'])
    out = []
    for r in runs:
        p = next(p for p in parents if r['start'] <= p.info.start_time/1000 <= r['end'])
        kids = client.search_runs([exp.experiment_id], f"tags.`nbprod.parent_run` = '{p.info.run_id}'")
        pts = []
        for k in kids:
            t = notebook_timing(Path(unquote(urlparse(k.info.artifact_uri).path))/'notebook'/'work.ipynb')
            pts.append(dict(t, status=k.info.status, run_start=k.info.start_time/1000, run_end=k.info.end_time/1000,
                            point=k.info.end_time/1000 - t['start'], execute=t['end'] - t['start'],
                            record=k.info.end_time/1000 - t['end'], work_metric=k.data.metrics.get('work_seconds')))
        first, last = min(x['start'] for x in pts), max(x['run_end'] for x in pts)
        out.append(dict(
            points=len(pts), finished=sum(x['status'] == 'FINISHED' for x in pts),
            start_to_parent_run=p.info.start_time/1000 - r['start'],   # CLI imports, settings, grid checked, parent run
            start_to_first_point=first - r['start'],          # ... then ray.init, workers start and import, first kernel
            first_to_last_point=last - first,                  # the points, two at a time
            last_point_to_exit=r['end'] - last,                # parent run ended, Ray shut down, interpreter exit
            point_seconds_median=med(pts, 'point'),            # papermill start (kernel start) to the run's end
            point_seconds_sum=sum(x['point'] for x in pts),
            execute_median=med(pts, 'execute'),                # papermill: kernel start, cells, kernel shut down
            kernel_start_median=med(pts, 'kernel'), work_cell_median=med(pts, 'work_cell'),
            log_cell_median=med(pts, 'log_cell'), import_cell_median=med(pts, 'import_cell'),
            record_median=med(pts, 'record'),                  # after the last cell: output stored, HTML, run ended
            mlflow_run_seconds_median=statistics.median(x['run_end'] - x['run_start'] for x in pts)))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--points', type=int, default=16, help="grid points: seed=0..points-1")
    ap.add_argument('--repeats', type=int, default=2, help="timed (papermill batch, nbprod sweep) pairs, order alternating")
    ap.add_argument('--work', type=float, default=1.0, help="seconds of CPU work per point (calibrated on this machine)")
    ap.add_argument('--papermill-tracks', action='store_true',
                    help="papermill's notebook logs its metrics too (an interactive `track` run in a store of its own)")
    ap.add_argument('--no-breakdown', action='store_true', help="skip the Ray/kernel/tracking probes")
    ap.add_argument('--out', type=Path, default=RESULTS)
    args = ap.parse_args()
    console = Console()
    seeds = range(args.points)
    nbprod = [str(BIN/'nbprod'), 'sweep', 'nbs/work.ipynb', '-p', 'seed=' + ','.join(map(str, seeds)), '--sort', 'score']
    papermill = lambda i: [str(BIN/'papermill'), 'nbs/work.ipynb', f'out/work-{i}.ipynb', '-p', 'seed', str(i)]

    with tempfile.TemporaryDirectory(prefix='nbprod-bench-') as tmp:
        tmp = Path(tmp)
        root = tmp/'bench'
        root.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith('NBPROD_') and k != 'BENCH_TRACK'}
        env.pop('PYTHONDONTWRITEBYTECODE', None)   # as in run_overhead.py: a private .pyc cache, filled by the warm-up
        env['PYTHONPYCACHEPREFIX'] = str(tmp/'pycache')
        cal = probe(CALIBRATE, tmp, env, args.work)
        console.print(f"work loop: {cal['n']:,} iterations = {cal['seconds']:.2f}s alone on this machine")
        make_project(root, cal['n'])
        run = lambda cmd, **extra: timed(cmd, root, {**env, **extra})
        tracking = dict(BENCH_TRACK='1', NBPROD_STORE=str(tmp/'papermill-store'))
        pm_env = tracking if args.papermill_tracks else {}

        def batch():
            t, start, calls = time.perf_counter(), time.time(), []
            for i in seeds: calls.append(run(papermill(i), **pm_env)[0])
            elapsed = time.perf_counter() - t
            return elapsed, dict(start=start, calls=calls, nbs=[notebook_timing(root/'out'/f'work-{i}.ipynb') for i in seeds])

        def sweep():
            elapsed, start, end = run(nbprod)
            return elapsed, dict(start=start, end=end)

        console.print(f"warm-up (project in {root}): one papermill call, one 2-point nbprod sweep")
        warm = {'papermill': run(papermill(0), **pm_env)[0],
                'nbprod': run([*nbprod[:3], '-p', 'seed=0,1', '--sort', 'score'])[0]}   # creates the SQLite store
        times, detail = {'papermill': [], 'nbprod': []}, {'papermill': [], 'nbprod': []}
        for r in range(args.repeats):
            order = ['papermill', 'nbprod'] if r % 2 == 0 else ['nbprod', 'papermill']
            for k in order:
                l0, (b0, t0) = load(), cpu_ticks()
                s, d = batch() if k == 'papermill' else sweep()
                (b1, t1) = cpu_ticks()
                times[k].append(s); detail[k].append({**d, 'load': [l0, load()], 'busy': (b1 - b0)/(t1 - t0)})
            console.print(f"  pair {r+1}/{args.repeats} ({' then '.join(order)}): papermill {times['papermill'][-1]:.1f}s"
                          f"  nbprod {times['nbprod'][-1]:.1f}s")

        breakdown = None
        if not args.no_breakdown:
            console.print("breakdown: Ray start-up, kernel start-up, papermill with tracking, sweep timeline")
            rays = [probe(RAY_PROBE, root, env) for _ in range(2)]
            kernel = probe(KERNEL_PROBE, root, env)
            tracked = [run(papermill(i), **tracking)[0] for i in range(3)]   # the first may create the store
            tl = sweep_timeline(root, detail['nbprod'])
            pm_calls = [c for d in detail['papermill'] for c in d['calls']]
            pm_nbs = [n for d in detail['papermill'] for n in d['nbs']]
            breakdown = {
                'ray_start_up': {k: round(statistics.median(r[k] for r in rays), 3) for k in rays[0]},
                'kernel_start_seconds': round(kernel, 3),
                'papermill_call': {'seconds_median': round(statistics.median(pm_calls), 3),
                                   'execute_median': round(statistics.median(n['end'] - n['start'] for n in pm_nbs), 3),
                                   'kernel_start_median': round(med(pm_nbs, 'kernel'), 3),
                                   'work_cell_median': round(med(pm_nbs, 'work_cell'), 3),
                                   'log_cell_median': round(med(pm_nbs, 'log_cell'), 3),
                                   'outside_kernel_median': round(statistics.median(
                                       c - (n['end'] - n['start']) for c, n in zip(pm_calls, pm_nbs)), 3)},
                'papermill_tracked_call_seconds_median': round(statistics.median(tracked[1:]), 3),
                'nbprod_sweeps': [{k: round(v, 3) if isinstance(v, float) else v for k, v in t.items()} for t in tl]}

    ratios = [p/n for p, n in zip(times['papermill'], times['nbprod'])]
    medians = {k: statistics.median(v) for k, v in times.items()}
    ratio, ratio_of_medians = statistics.median(ratios), medians['papermill']/medians['nbprod']
    t = Table('', 'median s', 'min s', 'max s', 'warm-up s', title=f"{args.points} points, {args.repeats} pairs")
    t.add_row(f'{args.points} x papermill', *(f"{f(times['papermill']):.1f}" for f in (statistics.median, min, max)),
              f"{warm['papermill']:.1f} (1 call)")
    t.add_row('nbprod sweep', *(f"{f(times['nbprod']):.1f}" for f in (statistics.median, min, max)),
              f"{warm['nbprod']:.1f} (2 points)")
    console.print(t)
    ok = ratio >= TARGET
    console.print(f"speed-up papermill/nbprod: [bold]{ratio:.2f}x[/bold] (ratio of medians {ratio_of_medians:.2f}); "
                  f"target >= {TARGET}: " + ("[green]met[/green]" if ok else "[red]not met[/red]"))
    extra = {}
    if breakdown:
        rinit = breakdown['ray_start_up']['ray.init (local)']
        ex = [p/(n - rinit) for p, n in zip(times['papermill'], times['nbprod'])]
        extra['ratio_excluding_ray_init'] = round(statistics.median(ex), 3)
        console.print(f"excluding ray.init ({rinit:.1f}s, measured separately): {extra['ratio_excluding_ray_init']:.2f}x")
        console.print_json(data=breakdown)
    if LEFT: console.print(f"[red]Ray processes outlived their driver (ended here):[/red] {LEFT}")

    r3 = lambda xs: [round(x, 3) for x in xs]
    result = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
        host=dict(cpu_count=os.cpu_count(), platform=platform.platform()), python=platform.python_version(),
        versions={p: version(p) for p in ('nbprod', 'papermill', 'ray', 'mlflow')}, git=git_state(),
        command=shlex.join([sys.executable, *sys.argv]),
        commands=dict(papermill=shlex.join(papermill('{i}')) + f"  # for i in 0..{args.points-1}, sequentially",
                      nbprod=shlex.join(nbprod)),
        points=args.points, repeats=args.repeats, work_iterations=cal['n'], work_seconds_alone=round(cal['seconds'], 3),
        papermill_tracking=('track.log_metrics into an interactive run (BENCH_TRACK=1, NBPROD_STORE in the temp folder)'
                            if args.papermill_tracks else
                            'none: the notebook logs its metrics only under nbprod (NBPROD_RUN_FILE set)'),
        bytecode='private PYTHONPYCACHEPREFIX cache, filled by the warm-up',
        warm_up={k: round(v, 3) for k, v in warm.items()},
        times={k: r3(v) for k, v in times.items()}, papermill_call_seconds=[r3(d['calls']) for d in detail['papermill']],
        medians={k: round(v, 3) for k, v in medians.items()}, ratios=r3(ratios), ratio=round(ratio, 3),
        ratio_of_medians=round(ratio_of_medians, 3), **extra, target=TARGET, target_met=ok,
        load_1min={k: [d['load'] for d in v] for k, v in detail.items()},   # before and after each measurement
        cpu_busy={k: [round(d['busy'], 3) for d in v] for k, v in detail.items()},   # share of all cores busy (any process)
        ray_processes_left=LEFT)
    if breakdown: result['breakdown'] = breakdown
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + '\n')
    console.print(f"wrote {args.out}")


if __name__ == '__main__':
    main()
