"""How fast does nbprod profile data, and what does profiling cost an endpoint?

1. Profiling: the same 1,000,000-row, 15-column frame (10 float columns, 3 text, 1 integer, 1 float target), profiled by
     - nbprod.profiles.profile   whylogs, with float columns that are all finite marked homogeneous
     - whylogs.log               whylogs 1.6.4 as it comes (nbprod's numpy 2 patch applied, nothing else)
     - DataFrame.describe        pandas' summary, include='all'
   best of --repeat runs each, in rows/s, and nbprod's ratio to each. Target: at least 150,000 rows/s through nbprod.
2. Serving: `nbprod serve` of the serve benchmark's model (benchmarks/serve.py: Ridge on six bike-share columns), loaded
   by wrk at concurrency 16 (and 64), with traffic profiling on (the default) and off (profile_traffic = false),
   alternating on/off --rounds times, each start a fresh endpoint. Target: profiling costs at most 5% of the requests/s.

Writes benchmarks/results/profiles.json. Run from the repository root:

    .venv/bin/python benchmarks/profiles.py [--rows 1000000] [--repeat 3] [--rounds 2] [--duration 20] [--skip-serving]
"""
import argparse, datetime, json, os, platform, shutil, sys, tempfile, time
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
RESULTS = Path(__file__).parent/'results'/'profiles.json'
TARGETS = {'nbprod rows/s': 150_000, 'serving cost': 0.05}


def frame(n, seed=0):
    import numpy as np, pandas as pd
    rng = np.random.default_rng(seed)
    cols = {f'x{i}': rng.normal(i, 1 + i, n) for i in range(10)}
    cols |= {f'c{i}': pd.Series(rng.choice(['clear', 'mist', 'rain', 'snow', 'fog'][:3 + i], n)).astype('str') for i in range(3)}
    cols |= {'hour': rng.integers(0, 24, n), 'y': rng.gamma(2, 50, n)}
    return pd.DataFrame(cols)


def best(fn, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), times


def profiling(rows, repeat):
    from nbprod.profiles import profile, whylogs
    why = whylogs()
    df = frame(rows)
    why.log(df.head(1000))                                       # imports and first-use costs out of the way
    out = {}
    for name, fn in [('nbprod', lambda: profile(df)), ('whylogs', lambda: why.log(df).view()),
                     ('pandas describe', lambda: df.describe(include='all'))]:
        t, times = best(fn, repeat)
        out[name] = {'rows_per_s': round(rows / t), 'best_s': round(t, 3), 'runs_s': [round(x, 3) for x in times]}
    p = profile(df)
    assert p.rows == rows and len(p.columns) == 15
    return out, {'rows': rows, 'columns': 15, 'dtypes': {str(k): int(v) for k, v in df.dtypes.astype(str).value_counts().items()}}


def serving(rounds, duration, levels):
    from serve import make_model, run_setup
    out = {'on': [], 'off': []}
    with tempfile.TemporaryDirectory(prefix='nbprod-bench-profiles-') as d:
        tmp = Path(d)
        model, X, key, proj = make_model(tmp, 'ridge')
        for r in range(rounds):
            for mode in ('on', 'off') if r % 2 == 0 else ('off', 'on'):   # alternate the order: drift of the machine hits both
                _, res = run_setup('nbprod', tmp, key, proj, levels, duration, [('profile_traffic', 'true' if mode == 'on' else 'false')])
                out[mode].append(res)
                print(f"round {r + 1}, profiling {mode}: " + ', '.join(f"c={c} {x['rps']:,.0f}/s ({x['errors']} errors)" for c, x in res.items()), flush=True)
        from nbprod.windows import windows
        profiled = sum(p.rows for p in windows(proj/'.nbprod'/'profiles', 'bench').values())
    mean = {m: {str(c): round(sum(x[str(c)]['rps'] for x in runs) / len(runs), 1) for c in levels} for m, runs in out.items()}
    cost = {str(c): round(1 - mean['on'][str(c)] / mean['off'][str(c)], 4) for c in levels}
    # the replica's CPU per request: less noisy than requests/s on a shared machine
    cpu = {m: {str(c): round(sum(x[str(c)]['cpu_us_per_request'].get('replica', 0) for x in runs) / len(runs), 1) for c in levels} for m, runs in out.items()}
    return {'runs': out, 'mean_rps': mean, 'cost': cost, 'replica_cpu_us_per_request': cpu, 'records_profiled': profiled}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--rows', type=int, default=1_000_000)
    ap.add_argument('--repeat', type=int, default=3, help="profiling runs per tool (the best counts)")
    ap.add_argument('--rounds', type=int, default=2, help="serving: on/off pairs of endpoint starts")
    ap.add_argument('--duration', type=int, default=20, help="serving: seconds of wrk load per concurrency level")
    ap.add_argument('--concurrency', default='16,64')
    ap.add_argument('--skip-serving', action='store_true')
    ap.add_argument('--out', type=Path, default=RESULTS)
    args = ap.parse_args()
    from rich.console import Console
    console = Console()
    with console.status(f"profiling {args.rows:,} rows x 15 columns, best of {args.repeat}"):
        prof, data = profiling(args.rows, args.repeat)
    for k, v in prof.items(): console.print(f"{k}: {v['rows_per_s']:,} rows/s (best {v['best_s']} s)")
    ratios = {f'nbprod/{k}': round(prof['nbprod']['rows_per_s'] / v['rows_per_s'], 3) for k, v in prof.items() if k != 'nbprod'}
    console.print(', '.join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    checks = {f"nbprod >= {TARGETS['nbprod rows/s']:,} rows/s": prof['nbprod']['rows_per_s'] >= TARGETS['nbprod rows/s']}
    serve = None
    if not args.skip_serving:
        if not shutil.which('wrk'): sys.exit("wrk is not installed: `make sysdeps` installs Debian's wrk")
        levels = [int(c) for c in args.concurrency.split(',')]
        serve = serving(args.rounds, args.duration, levels)
        for c in map(str, levels):
            console.print(f"serving at c={c}: {serve['mean_rps']['on'][c]:,.0f}/s with profiling, {serve['mean_rps']['off'][c]:,.0f}/s without: "
                          f"cost {serve['cost'][c]:.1%}; replica CPU per request {serve['replica_cpu_us_per_request']['on'][c]:.0f} µs with, "
                          f"{serve['replica_cpu_us_per_request']['off'][c]:.0f} µs without")
            checks[f"profiling costs serving <= 5% at c={c}"] = serve['cost'][c] <= TARGETS['serving cost']
        checks['serving: zero errors'] = all(x['errors'] == 0 for runs in serve['runs'].values() for res in runs for x in res.values())
    for k, ok in checks.items(): console.print(f"{'✓' if ok else '✗'} {k}")
    out = {'benchmark': 'profiles', 'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
           'command': ' '.join(['.venv/bin/python', 'benchmarks/profiles.py', *sys.argv[1:]]), 'cpus': os.cpu_count(),
           'platform': platform.platform(), 'python': platform.python_version(),
           'versions': {p: version(p) for p in ('nbprod', 'whylogs', 'pandas', 'numpy', 'ray')},
           'data': data, 'profiling': prof, 'ratios': ratios, 'serving': serve, 'targets': TARGETS, 'checks': checks}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + '\n')
    console.print(f"written {args.out}")


if __name__ == '__main__':
    main()
