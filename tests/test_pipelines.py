"""Pipelines and sweeps across processes: the CLI, a real Ray head started here, real kernels, MLflow on SQLite.

One Ray head (`ray start --head` on 127.0.0.1) serves the module: most runs reach it through
`NBPROD_RAY_ADDRESS`, which is the cluster path. `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` keeps that
head on the loopback interface (Ray otherwise binds every interface), and token authentication is
on for the head and its clients alike. The SIGKILL test uses the embedded default (a
local Ray started by `nbprod run` itself), so both paths run here.
"""
import json, os, re, signal, socket, subprocess, sys, time
from pathlib import Path

import pytest

from conftest import BIN, Project, pid_alive, stop_ray_node

STAMP = '''import json, os, time
from pathlib import Path
os.makedirs("../stamps", exist_ok=True)
Path(f"../stamps/{name}.start").write_text(json.dumps({"t": time.time(), "pid": os.getpid(), "ppid": os.getppid()}))
t0 = time.time()
while wait_for and not Path(f"../stamps/{wait_for}.start").exists() and time.time() - t0 < 60:   # proves parallelism
    time.sleep(0.2)
while Path(f"../hold.{name}").exists() and time.time() - json.loads(Path(f"../stamps/{name}.start").read_text())["t"] < 120:
    time.sleep(0.2)
time.sleep(sleep)'''
FAIL = 'assert not Path(f"../fail.{name}").exists(), f"step {name} told to fail"'
WRITE = '''os.makedirs("../out", exist_ok=True)
if not Path(f"../nowrite.{name}").exists(): Path(f"../out/{name}.txt").write_text(f"{name} {scale}")
Path(f"../stamps/{name}.end").write_text(str(time.time()))
from nbprod import track
track.log_metric("scale", scale)'''

PIPELINES = '''
[tool.nbprod.pipelines.diamond]
description = "a -> (b, c) -> d"
parameters = {sleep = 1.0}

[tool.nbprod.pipelines.diamond.steps.a]
notebook = "nbs/stamp.ipynb"
products = ["out/a.txt"]
parameters = {name = "a"}

[tool.nbprod.pipelines.diamond.steps.b]
notebook = "nbs/stamp.ipynb"
inputs = ["out/a.txt"]
products = ["out/b.txt"]
parameters = {name = "b", wait_for = "c"}

[tool.nbprod.pipelines.diamond.steps.c]
notebook = "nbs/scaled.ipynb"
inputs = ["out/a.txt"]
products = ["out/c.txt"]
parameters = {name = "c", wait_for = "b"}

[tool.nbprod.pipelines.diamond.steps.d]
notebook = "nbs/stamp.ipynb"
needs = ["b", "c"]
products = ["out/d.txt"]
parameters = {name = "d", sleep = 0.0}
'''


def make_project(root: Path, pipelines: str = PIPELINES) -> Project:
    root.mkdir(parents=True)
    (root/'pyproject.toml').write_text('[project]\nname = "pipes"\n\n[tool.nbprod]\nexperiment = "pipes"\n' + pipelines)
    (root/'settings.ini').write_text('[DEFAULT]\n')
    subprocess.run(['git', 'init', '-q', '-b', 'main'], cwd=root, check=True)
    p = Project(root)
    p.notebook('stamp', 'name = "x"\nsleep = 0.0\nscale = 1\nwait_for = ""', STAMP, FAIL, WRITE)
    p.notebook('scaled', 'name = "x"\nsleep = 0.0\nscale = 1\nfactor = 1\nwait_for = ""', STAMP, FAIL, WRITE)
    return p


RAY_ENV = {'RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER': '0', 'RAY_AUTH_MODE': 'token'}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def ray_head(tmp_path_factory):
    "A Ray head on 127.0.0.1, started with `ray start --head --block` and ended through that process."
    port = free_port()
    env = {**os.environ, **RAY_ENV}
    log = open(tmp_path_factory.mktemp('ray')/'head.log', 'w')
    proc = subprocess.Popen([str(BIN/'ray'), 'start', '--head', '--block', f'--port={port}', '--node-ip-address=127.0.0.1',
                             '--num-cpus=2', '--include-dashboard=false', '--disable-usage-stats'],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    address = f'127.0.0.1:{port}'
    try:
        deadline = time.time() + 120
        session = lambda: re.search(r'(/\S*?/session_[\w\-]+)/logs', Path(log.name).read_text())
        while not session() or subprocess.run([str(BIN/'ray'), 'status', f'--address={address}'], capture_output=True, env=env).returncode:
            assert proc.poll() is None and time.time() < deadline, Path(log.name).read_text()[-3000:]
            time.sleep(1)
        yield address, Path(session().group(1))
    finally:
        _stop_head(proc, log)


def _stop_head(proc, log):
    stop_ray_node(proc)                # `ray start --block` stops the processes it started; what outlives it is ended
    log.close()


@pytest.fixture
def pipes(tmp_path, ray_head):
    p = make_project(tmp_path/'pipes')
    p.address,p.session = ray_head
    return p


def cli(p: Project, *args, timeout=300):
    return p.cli(*args, env=p.env(NBPROD_RAY_ADDRESS=p.address, **RAY_ENV), timeout=timeout)


def stamps(p: Project) -> dict:
    d = p.root/'stamps'
    return {f.stem: (json.loads(f.read_text())['t'], float((d/f'{f.stem}.end').read_text()) if (d/f'{f.stem}.end').exists() else None)
            for f in d.glob('*.start')}


def wait_until_held(proc, p: Project, step: str, timeout: float = 180) -> int:
    "Wait until `step` (held by its hold file) has started under `proc`; returns its kernel's pid."
    start, deadline = p.root/'stamps'/f'{step}.start', time.time() + timeout
    while not start.exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    return json.loads(start.read_text())['pid']


def pipeline_runs(p: Project):
    return [r for r in p.runs() if r.data.tags.get('nbprod.kind') == 'pipeline']


def children(p: Project, run_id):
    return {r.data.tags['nbprod.step']: r for r in p.runs() if r.data.tags.get('nbprod.parent_run') == run_id}


def test_dag_order_parallelism_nesting_and_cluster(pipes):
    r = cli(pipes, 'run', 'diamond')
    assert r.returncode == 0, r.stdout + r.stderr
    t = stamps(pipes)
    assert t['a'][1] <= min(t['b'][0], t['c'][0])              # b and c start after a ended
    assert max(t['b'][1], t['c'][1]) <= t['d'][0]             # d starts after both ended
    assert t['b'][0] < t['c'][1] and t['c'][0] < t['b'][1]    # b and c overlapped: each waited to see the other start
    for line in ['pipeline diamond: FINISHED', 'a ', 'b ', 'c ', 'd ', 'output notebooks:']:
        assert line in r.stdout, r.stdout
    [parent] = pipeline_runs(pipes)
    kids = children(pipes, parent.info.run_id)
    assert set(kids) == {'a', 'b', 'c', 'd'} and all(k.info.status == 'FINISHED' for k in kids.values())
    assert all(k.data.tags['mlflow.parentRunId'] == parent.info.run_id for k in kids.values())
    assert kids['d'].data.params == {'name': 'd', 'sleep': '0.0'}
    assert kids['b'].data.params == {'name': 'b', 'sleep': '1.0', 'wait_for': 'c'}
    assert parent.info.status == 'FINISHED' and parent.data.params == {'sleep': '1.0'}
    assert json.loads(kids['a'].data.tags['nbprod.products']).keys() == {'out/a.txt'}
    # the steps ran on the cluster started above: their Ray workers logged into that head's session
    for k in kids.values():
        assert list((pipes.session/'logs').glob(f"*{k.data.tags['nbprod.pid']}*")), k.data.tags['nbprod.pid']


def test_cache_then_changed_parameter_reruns_dependants_only(pipes):
    assert cli(pipes, 'run', 'diamond').returncode == 0
    first = stamps(pipes)
    r = cli(pipes, 'run', 'diamond')
    assert r.returncode == 0, r.stderr
    assert r.stdout.count('CACHED') == 4, r.stdout
    assert stamps(pipes) == first                             # nothing ran
    # `factor` is declared by c's notebook only: it re-runs c and, downstream, d
    r = cli(pipes, 'run', 'diamond', '-p', 'factor=3')
    assert r.returncode == 0, r.stdout + r.stderr
    now = stamps(pipes)
    assert now['a'] == first['a'] and now['b'] == first['b']
    assert now['c'] != first['c'] and now['d'] != first['d']
    rows = {line.split()[0]: line.split()[1] for line in r.stdout.splitlines() if line.split()[:1] in (['a'], ['b'], ['c'], ['d'])}
    assert rows == {'a': 'CACHED', 'b': 'CACHED', 'c': 'FINISHED', 'd': 'FINISHED'}, r.stdout
    # --force re-runs everything
    r = cli(pipes, 'run', 'diamond', '-p', 'factor=3', '--force')
    assert r.returncode == 0 and 'CACHED' not in r.stdout
    assert stamps(pipes)['a'] != now['a']


def test_failing_branch_other_finishes_then_resume(pipes):
    (pipes.root/'fail.c').touch()
    r = cli(pipes, 'run', 'diamond')
    assert r.returncode == 1, r.stdout + r.stderr
    assert 'FAILED step c' in r.stderr and 'cell:  3' in r.stderr and 'AssertionError: step c told to fail' in r.stderr
    notebook = r.stderr.split('output notebook: ')[1].split()[0]
    assert Path(notebook).exists() and 'told to fail' in Path(notebook).read_text()
    t = stamps(pipes)
    assert t['b'][1] is not None and 'd' not in t             # b finished; d never started
    [parent] = pipeline_runs(pipes)
    assert parent.info.status == 'FAILED'
    tags = parent.data.tags
    assert [tags[f'nbprod.step.{s}.status'] for s in 'abcd'] == ['FINISHED', 'FINISHED', 'FAILED', 'SKIPPED']
    rid = parent.info.run_id
    assert f'nbprod run --resume {rid}' in r.stderr.replace('\n', ' ')
    (pipes.root/'fail.c').unlink()
    r = cli(pipes, 'run', '--resume', rid)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = {line.split()[0]: line.split()[1] for line in r.stdout.splitlines() if line.split()[:1] in (['a'], ['b'], ['c'], ['d'])}
    assert rows == {'a': 'REUSED', 'b': 'REUSED', 'c': 'FINISHED', 'd': 'FINISHED'}, r.stdout
    assert stamps(pipes)['b'] == t['b']
    resumed = [x for x in pipeline_runs(pipes) if x.info.run_id != rid][0]
    assert resumed.data.tags['nbprod.resumed_from'] == rid and resumed.info.status == 'FINISHED'
    # a finished pipeline has nothing to resume; bad input is refused before anything runs
    r = cli(pipes, 'run', '--resume', resumed.info.run_id)
    assert r.returncode == 2 and 'nothing to resume' in r.stderr
    r = cli(pipes, 'run', '--resume', rid, '-p', 'sleep=2')
    assert r.returncode == 2 and 'parameters of the run it resumes' in r.stderr


def test_product_not_written_fails_the_step(pipes):
    (pipes.root/'nowrite.c').touch()
    r = cli(pipes, 'run', 'diamond')
    assert r.returncode == 1 and 'did not write out/c.txt' in r.stdout + r.stderr, r.stdout + r.stderr
    [parent] = pipeline_runs(pipes)
    assert children(pipes, parent.info.run_id)['c'].info.status == 'FAILED'


GATED = '''
[tool.nbprod.pipelines.gated]
[tool.nbprod.pipelines.gated.steps.make]
notebook = "nbs/table.ipynb"
products = ["out/rows.csv"]
[tool.nbprod.pipelines.gated.steps.use]
notebook = "nbs/stamp.ipynb"
inputs = ["out/rows.csv"]
parameters = {name = "use"}

[tool.nbprod.checks.rows]
files = ["out/rows.csv"]
required = ["value"]
columns.value = {min = 0, max = 10, max_null_fraction = 0}
'''


def gated_project(root, pipelines=GATED) -> Project:
    p = make_project(root, pipelines)
    p.notebook('table', 'scale = 1', '''import os, pandas as pd
os.makedirs("../out", exist_ok=True)
pd.DataFrame({"value": [i * scale for i in range(5)]}).to_csv("../out/rows.csv", index=False)''')
    return p


def test_data_check_gate_stops_the_pipeline_with_a_report(tmp_path, ray_head):
    p = gated_project(tmp_path/'gated')
    p.address = ray_head[0]
    r = cli(p, 'run', 'gated', '-p', 'scale=100')
    out = (r.stdout + r.stderr).replace('\n', ' ')
    assert r.returncode == 1, out
    assert "data checks failed: check 'rows' on out/rows.csv (5 rows): 1 of 3 failed" in out, out
    assert 'value: range (expected values in [0, 10]): min 0, max 400' in out, out
    [parent] = pipeline_runs(p)
    tags = parent.data.tags
    assert (tags['nbprod.step.make.status'], tags['nbprod.step.use.status']) == ('FAILED', 'SKIPPED')
    assert not (p.root/'stamps'/'use.start').exists()         # the step after the gate never ran
    make = children(p, parent.info.run_id)['make']
    assert make.info.status == 'FAILED'
    [report] = json.loads(Path(p.client().download_artifacts(make.info.run_id, 'nbprod/data_checks.json', str(tmp_path))).read_text())
    assert report['passed'] is False and report['rows'] == 5
    assert [x['check'] for x in report['results'] if not x['passed']] == ['range']
    assert (p.root/'out'/'rows.csv').exists()                # the data is kept, to look at
    r = cli(p, 'run', 'gated', '-p', 'scale=2')                # good data passes the gate
    assert r.returncode == 0, r.stdout + r.stderr
    assert (p.root/'stamps'/'use.start').exists()


def test_bad_data_check_is_refused_before_anything_runs(tmp_path):
    p = gated_project(tmp_path/'badcheck', GATED.replace('min = 0, max = 10', 'min = 20, max = 10'))
    r = p.cli('run', 'gated')
    assert r.returncode == 2 and 'min 20 is above max 10' in r.stderr, r.stdout + r.stderr
    assert 'tool.nbprod.checks.rows' in r.stderr and p.runs() == []


@pytest.mark.parametrize('old, new, message', [
    ('products = ["out/a.txt"]\n', 'products = ["out/a.txt"]\nneeds = ["d"]\n', "has a cycle: "),
    ('needs = ["b", "c"]', 'needs = ["b", "zz"]', "needs an unknown step 'zz'"),
    ('notebook = "nbs/scaled.ipynb"', 'notebook = "nbs/missing.ipynb"', "no notebook at nbs/missing.ipynb"),
    ('inputs = ["out/a.txt"]\nproducts = ["out/b.txt"]', 'inputs = ["out/nobody.txt"]\nproducts = ["out/b.txt"]',
     "reads out/nobody.txt, which no step makes"),
    ('', '-p nope=1', "no step of pipeline 'diamond' declares a parameter 'nope'"),
    ('', '-p sleep=abc', "must be float, not 'abc'"),
    ('', 'zz', "no pipeline 'zz'"),
])
def test_validation_errors_before_anything_runs(tmp_path, old, new, message):
    assert old == '' or old in PIPELINES
    p = make_project(tmp_path/'v', PIPELINES.replace(old, new) if old else PIPELINES)
    args = ['run', 'diamond', *new.split()] if new.startswith('-p') else ['run', new] if not old else ['run', 'diamond']
    r = p.cli(*args)
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stderr.replace('\n', ' '), r.stderr
    assert not (p.root/'stamps').exists() and p.runs() == []    # nothing ran, nothing recorded


def test_sweep_with_a_failing_point(pipes):
    pipes.notebook('fit', 'alpha = 1.0\nkind = "a"', 'from nbprod import track',
                   'assert alpha != 0, "alpha must not be 0"', 'track.log_metric("loss", (alpha - 0.5) ** 2)')
    r = cli(pipes, 'sweep', 'nbs/fit.ipynb', '-p', 'alpha=0,0.6,2', '-p', 'kind=a,b', '--sort', 'loss')
    assert r.returncode == 1, r.stdout + r.stderr
    rows = [l.split() for l in r.stdout.splitlines() if l.split()[:1] and l.split()[0] in ('0.0', '0.6', '2.0')]
    assert [(x[0], x[2]) for x in rows] == [('0.6', 'FINISHED')] * 2 + [('2.0', 'FINISHED')] * 2 + [('0.0', 'FAILED')] * 2, r.stdout
    assert 'alpha=0.0, kind=a: cell 3: AssertionError: alpha must not be 0' in r.stderr.replace('\n', ' '), r.stderr
    runs = pipes.runs()
    [parent] = [x for x in runs if x.data.tags.get('nbprod.kind') == 'sweep']
    kids = [x for x in runs if x.data.tags.get('nbprod.parent_run') == parent.info.run_id]
    assert sorted(k.info.status for k in kids) == ['FAILED'] * 2 + ['FINISHED'] * 4
    assert parent.info.status == 'FAILED' and parent.data.params == {'grid.alpha': '0,0.6,2', 'grid.kind': 'a,b'}
    r = cli(pipes, 'sweep', 'nbs/fit.ipynb', '-p', 'alpha=1,x')
    assert r.returncode == 2 and "must be float, not 'x'" in r.stderr and len(pipes.runs()) == len(runs)


def test_unreachable_cluster_is_refused_at_once(tmp_path):
    "A ray_address where nothing listens: exit 2 within seconds, naming the address; the sweep's run ends FAILED."
    p = make_project(tmp_path/'u')
    p.notebook('fit', 'alpha = 1.0', 'print(alpha)')
    address = f'127.0.0.1:{free_port()}'
    t0 = time.monotonic()
    r = p.cli('sweep', 'nbs/fit.ipynb', '-p', 'alpha=1,2', env=p.env(NBPROD_RAY_ADDRESS=address), timeout=120)
    assert r.returncode == 2 and f'no Ray cluster answers at {address}' in r.stderr and 'ray_address' in r.stderr, r.stderr
    assert time.monotonic() - t0 < 60 and 'Traceback' not in r.stderr
    [parent] = p.runs()
    assert parent.data.tags['nbprod.kind'] == 'sweep' and parent.info.status == 'FAILED'
    r = p.cli('run', 'diamond', env=p.env(NBPROD_RAY_ADDRESS=address), timeout=120)
    assert r.returncode == 2 and f'no Ray cluster answers at {address}' in r.stderr, r.stderr
    assert [x.info.status for x in pipeline_runs(p)] == ['FAILED']


def test_resume_after_the_runner_is_killed(tmp_path):
    "SIGKILL `nbprod run` mid-step (embedded Ray): its Ray, worker and kernel go; --resume reruns only that step."
    p = make_project(tmp_path/'k')
    (p.root/'hold.b').touch()
    proc = p.popen('run', 'diamond')
    kernel = wait_until_held(proc, p, 'b')
    deadline = time.time() + 180
    while not any(r.data.tags.get('nbprod.step.c.status') for r in pipeline_runs(p)):   # c (parallel to b) is recorded
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    [parent] = pipeline_runs(p)
    b = children(p, parent.info.run_id)['b']
    worker = int(b.data.tags['nbprod.pid'])
    deadline = time.time() + 60
    while pid_alive(kernel) or pid_alive(worker):   # the local Ray goes with its driver, the kernel with its worker
        assert time.time() < deadline, f"kernel {kernel} alive: {pid_alive(kernel)}; worker {worker}: {pid_alive(worker)}"
        time.sleep(0.5)
    (p.root/'hold.b').unlink()
    r = p.cli('run', '--resume', parent.info.run_id, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = {line.split()[0]: line.split()[1] for line in r.stdout.splitlines() if line.split()[:1] in (['a'], ['b'], ['c'], ['d'])}
    assert rows == {'a': 'REUSED', 'b': 'FINISHED', 'c': 'REUSED', 'd': 'FINISHED'}, r.stdout
    old = p.client().get_run(parent.info.run_id)
    assert old.info.status == 'KILLED' and p.client().get_run(b.info.run_id).info.status == 'KILLED'


def test_secrets_reach_steps_on_the_cluster_and_are_never_stored(tmp_path, ray_head):
    "The secret is set only in the runner's environment: it travels with the task to the cluster's worker, never as a param."
    p = make_project(tmp_path/'s', '''
[tool.nbprod.secrets]
api_token = "PIPES_API_TOKEN"

[tool.nbprod.pipelines.secret.steps.use]
notebook = "nbs/secret.ipynb"
products = ["out/len.txt"]
''')
    p.notebook('secret', 'api_token = ""', 'import os; os.makedirs("../out", exist_ok=True)',
               'assert api_token[:3] == "s3c" and len(api_token) == 12, "the secret did not arrive"',
               'open("../out/len.txt", "w").write(str(len(api_token))); print(api_token)')
    r = p.cli('run', 'secret', env=p.env(NBPROD_RAY_ADDRESS=ray_head[0], PIPES_API_TOKEN='s3cr3t-value', **RAY_ENV))
    assert r.returncode == 0, r.stdout + r.stderr
    assert (p.root/'out'/'len.txt').read_text() == '12'
    leaks = [f for f in p.root.rglob('*') if f.is_file() and b's3cr3t-value' in f.read_bytes()]
    assert leaks == [] and 's3cr3t-value' not in r.stdout + r.stderr


def test_sigterm_stops_the_pipeline_running_steps_end_killed(pipes):
    (pipes.root/'hold.b').touch()
    proc = subprocess.Popen([str(BIN/'nbprod'), 'run', 'diamond'], cwd=pipes.root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=pipes.env(NBPROD_RAY_ADDRESS=pipes.address, **RAY_ENV))
    kernel = wait_until_held(proc, pipes, 'b')
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out + err
    [parent] = pipeline_runs(pipes)
    assert parent.info.status == 'KILLED'
    assert f'KILLED pipeline run {parent.info.run_id} stopped; `nbprod run --resume {parent.info.run_id}`' in err.replace('\n', ' ')
    kids = children(pipes, parent.info.run_id)
    deadline = time.time() + 30            # (the step's own process writes its end; on a busy machine a moment after the CLI returns)
    while kids['b'].info.status == 'RUNNING' and time.time() < deadline:
        time.sleep(0.5)
        kids = children(pipes, parent.info.run_id)
    assert kids['b'].info.status == 'KILLED' and 'd' not in kids, {k: r.info.status for k, r in kids.items()}
    deadline = time.time() + 30
    while pid_alive(kernel):
        assert time.time() < deadline, f"kernel {kernel} still running"
        time.sleep(0.5)
