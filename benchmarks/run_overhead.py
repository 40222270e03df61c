"""How much slower is `nbprod run` than plain `papermill` on a trivial notebook?

Creates a throw-away nbprod project, times both CLIs as subprocesses (wall clock), alternating them, and writes
benchmarks/results/run_overhead.json. Run from the repository root:

    .venv/bin/python benchmarks/run_overhead.py [--repeats 7]
"""
import argparse, datetime, json, os, platform, shlex, statistics, subprocess, sys, tempfile, time
from importlib.metadata import version
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_notebook
from rich.console import Console
from rich.table import Table

BIN = Path(sys.executable).parent          # the venv's bin/ (not resolved: keep the venv's python)
TARGET = 1.25                              # nbprod may take at most this many times papermill's time
RESULTS = Path(__file__).parent/'results'/'run_overhead.json'

# Where nbprod's extra time goes, measured in child processes: imports step by step (in the order `nbprod run`
# loads them), then the time the interpreter takes to exit once they are loaded; once as is, once with the garbage
# collector off during the imports and gc.freeze() before exit.
IMPORTS = {'import papermill': 'import papermill',
           'import nbprod.cli, .runs': 'import nbprod.cli, nbprod.runs',
           'import mlflow': 'import mlflow',
           'import mlflow SQL store': 'import mlflow.store.tracking.sqlalchemy_store',
           'import nbconvert HTML': 'from nbconvert import HTMLExporter'}
CHILD = """import gc, json, sys, time
if sys.argv[1] == 'gc-off': gc.disable()
out, last = {}, time.perf_counter()
for name, stmt in json.loads(sys.argv[2]).items():
    exec(stmt); now = time.perf_counter(); out[name] = now - last; last = now
print(json.dumps(out)); sys.stdout.flush()
if sys.argv[1] == 'gc-off': gc.freeze()   # what a CLI can do just before exiting
open(sys.argv[3], 'w').write(repr(time.time()))   # the parent times the exit from here
"""


def make_project(root: Path):
    "A minimal nbprod project: pyproject.toml, empty settings.ini, nbs/nb.ipynb with one parameter and one cell."
    (root/'pyproject.toml').write_text('[project]\nname = "bench"\n\n[tool.nbprod]\nexperiment = "bench"\n')
    (root/'settings.ini').write_text('')
    nb = new_notebook(cells=[new_code_cell('x = 1', metadata={'tags': ['parameters']}), new_code_cell('y = x + 1')])
    nb.metadata.kernelspec = {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'}
    (root/'nbs').mkdir()
    nbformat.write(nb, root/'nbs'/'nb.ipynb')


def timed(cmd, cwd, env) -> float:
    "Wall-clock seconds of `cmd`; raises with its output when it fails."
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - t
    if r.returncode: raise RuntimeError(f"{shlex.join(map(str, cmd))} exited {r.returncode}\n{r.stderr}{r.stdout}")
    return elapsed


def child_imports(steps: dict, cwd, env, gc=True, n=3) -> dict:
    "Median seconds of each import step, and of the interpreter's exit after them, over `n` fresh processes."
    runs = []
    for _ in range(n):
        stamp = Path(cwd)/'exit-stamp'
        r = subprocess.run([sys.executable, '-c', CHILD, 'gc-on' if gc else 'gc-off', json.dumps(steps), str(stamp)],
                           cwd=cwd, env=env, capture_output=True, text=True)
        end = time.time()
        if r.returncode: raise RuntimeError(f"import probe failed\n{r.stderr}")
        runs.append({**json.loads(r.stdout), 'interpreter exit': end - float(stamp.read_text())})
    return {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]}


def stats(xs): return dict(median=statistics.median(xs), min=min(xs), max=max(xs))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--repeats', type=int, default=7, help="timed (papermill, nbprod) pairs after the warm-up")
    ap.add_argument('--env-as-is', action='store_true',
                    help="keep the caller's bytecode settings (default: a private .pyc cache, as after a normal install)")
    ap.add_argument('--no-breakdown', action='store_true', help="skip the import/exit breakdown")
    ap.add_argument('--out', type=Path, default=RESULTS)
    args = ap.parse_args()
    console = Console()
    papermill = [str(BIN/'papermill'), 'nbs/nb.ipynb', 'out.ipynb', '-p', 'x', '2']
    nbprod = [str(BIN/'nbprod'), 'run', 'nbs/nb.ipynb', '-p', 'x=2']

    with tempfile.TemporaryDirectory(prefix='nbprod-bench-') as tmp:
        root = Path(tmp)/'bench'
        root.mkdir()
        make_project(root)
        env = {k: v for k, v in os.environ.items() if not k.startswith('NBPROD_')}
        if not args.env_as_is:   # PYTHONDONTWRITEBYTECODE with an uncompiled venv would recompile every import each run
            env.pop('PYTHONDONTWRITEBYTECODE', None)
            env['PYTHONPYCACHEPREFIX'] = str(Path(tmp)/'pycache')
        run = lambda cmd, **extra: timed(cmd, root, {**env, **extra})

        console.print(f"warm-up (project in {root})")
        first = {'papermill': run(papermill), 'nbprod': run(nbprod)}   # nbprod's creates the SQLite store
        cold_store = run(nbprod, NBPROD_STORE=str(Path(tmp)/'fresh-store'))  # a new store, all else warm
        times = {'papermill': [], 'nbprod': []}
        for i in range(args.repeats):
            times['papermill'].append(run(papermill))
            times['nbprod'].append(run(nbprod))
            console.print(f"  pair {i+1}/{args.repeats}: papermill {times['papermill'][-1]:.2f}s  "
                          f"nbprod {times['nbprod'][-1]:.2f}s")
        breakdown = None
        if not args.no_breakdown:
            console.print("breakdown (imports and interpreter exit, in child processes)")
            breakdown = {'papermill alone': child_imports({'import papermill': 'import papermill'}, root, env),
                         'nbprod run': child_imports(IMPORTS, root, env),
                         'nbprod run, gc off+freeze': child_imports(IMPORTS, root, env, gc=False)}

    ratios = [n/p for p, n in zip(times['papermill'], times['nbprod'])]
    s = {k: stats(v) for k, v in times.items()}
    ratio, ratio_of_medians = statistics.median(ratios), s['nbprod']['median']/s['papermill']['median']

    t = Table('tool', 'median s', 'min s', 'max s', 'first run s', title=f"{args.repeats} alternating pairs")
    for k in times: t.add_row(k, *(f"{s[k][m]:.2f}" for m in ('median', 'min', 'max')), f"{first[k]:.2f}")
    console.print(t)
    console.print(f"nbprod with a fresh store (cold SQLite): {cold_store:.2f}s")
    ok = ratio <= TARGET
    console.print(f"median ratio nbprod/papermill: [bold]{ratio:.2f}[/bold] (ratio of medians {ratio_of_medians:.2f}); "
                  f"target <= {TARGET}: " + ("[green]met[/green]" if ok else "[red]not met[/red]"))
    if breakdown:
        b = Table('seconds', *breakdown, title="breakdown (medians of 3 processes)")
        for k in [*IMPORTS, 'interpreter exit']:
            b.add_row(k, *(f"{v[k]:.3f}" if k in v else '' for v in breakdown.values()))
        console.print(b)

    r3 = lambda xs: [round(x, 3) for x in xs]
    result = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
        host=dict(cpu_count=os.cpu_count(), platform=platform.platform()), python=platform.python_version(),
        versions={p: version(p) for p in ('nbprod', 'papermill', 'mlflow')},
        command=shlex.join([sys.executable, *sys.argv]),
        commands=dict(papermill=shlex.join(papermill), nbprod=shlex.join(nbprod)),
        bytecode='caller environment' if args.env_as_is else 'private PYTHONPYCACHEPREFIX cache',
        repeats=args.repeats, first_run={k: round(v, 3) for k, v in first.items()},
        cold_store_nbprod=round(cold_store, 3), times={k: r3(v) for k, v in times.items()}, ratios=r3(ratios),
        medians={k: round(v['median'], 3) for k, v in s.items()}, ratio=round(ratio, 3),
        ratio_of_medians=round(ratio_of_medians, 3), target=TARGET, target_met=ok)
    if breakdown: result['breakdown'] = breakdown
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + '\n')
    console.print(f"wrote {args.out}")


if __name__ == '__main__':
    main()
