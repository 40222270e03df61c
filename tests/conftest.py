"""Fixtures for cross-process tests: throw-away nbprod projects, notebooks, and the `nbprod` CLI in a subprocess; the process
trees servers grow, ended when their stop fails, and a check after each module that it left no process of its own running."""
import http.client, json, os, signal, subprocess, sys, time, urllib.error, urllib.request, uuid
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

BIN = Path(sys.executable).parent
NBPROD = str(BIN/'nbprod')

# Every process this pytest run starts inherits RUN_MARK in its environment (Project.env keeps it: it does not start with
# NBPROD_), so that one reparented to init (Ray's raylet and gcs_server, HAProxy) is still known as ours; a server started
# with Project.popen carries TREE_MARK too, its own.
RUN_MARK, TREE_MARK = 'PYTEST_NBPROD_RUN', 'PYTEST_NBPROD_TREE'
os.environ[RUN_MARK] = uuid.uuid4().hex


def _ignore_sigint():
    "In a child before it runs the command: SIGINT ignored, as a non-interactive shell leaves it for a background job (Python then keeps it ignored)."
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def sigint_ignored(pid: int) -> bool:
    "Whether process `pid` ignores SIGINT now (from its SigIgn mask)."
    for line in Path(f'/proc/{pid}/status').read_text().splitlines():
        if line.startswith('SigIgn:'): return bool(int(line.split()[1], 16) & (1 << (signal.SIGINT - 1)))
    return False


class Project:
    "A throw-away nbprod project in a git repository, with helpers to write notebooks and run the CLI."
    def __init__(self, root: Path):
        self.root = root

    def notebook(self, name, params, *cells):
        "Write nbs/<name>.ipynb: a parameters cell with source `params`, then one code cell per source."
        nb = new_notebook(cells=[new_markdown_cell(f"# {name}"),
                                 *([new_code_cell(params, metadata={'tags': ['parameters']})] if params is not None else []),
                                 *[new_code_cell(c) for c in cells]])
        nb.metadata.kernelspec = {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'}
        path = self.root/'nbs'/f"{name}.ipynb"
        path.parent.mkdir(exist_ok=True)
        nbformat.write(nb, path)
        return path

    def env(self, **extra):
        env = {k: v for k, v in os.environ.items() if not k.startswith('NBPROD_')}
        env.update(COLUMNS='200', NO_COLOR='1', **extra)
        return env

    def cli(self, *args, env=None, timeout=180):
        "Run `nbprod ARGS` in the project; returns the CompletedProcess."
        return subprocess.run([NBPROD, *map(str, args)], cwd=self.root, capture_output=True, text=True,
                              env=env or self.env(), timeout=timeout)

    def popen(self, *args, env=None, ignore_sigint=False):
        "Start `nbprod ARGS` in the project (`ignore_sigint`: as a background job of a script or `nohup` starts it, SIGINT ignored); its processes (Ray's, HAProxy) carry a marker `end_tree(proc)` finds them by."
        tree = uuid.uuid4().hex
        proc = subprocess.Popen([NBPROD, *map(str, args)], cwd=self.root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env={**(env or self.env()), TREE_MARK: tree}, preexec_fn=_ignore_sigint if ignore_sigint else None)
        proc.tree_mark = tree
        return proc

    def settings(self, profile=None):
        from nbprod.settings import load_settings
        return load_settings(self.root, profile, env={})

    def client(self, profile=None):
        from nbprod.store import tracking_client
        return tracking_client(self.settings(profile))

    def runs(self, profile=None):
        "All runs of the project's experiment, newest first (empty when nothing was recorded)."
        s = self.settings(profile)
        if not (s.store/'mlflow.db').exists(): return []
        c = self.client(profile)
        exp = c.get_experiment_by_name(s.experiment)
        return [] if exp is None else c.search_runs([exp.experiment_id], order_by=['attributes.start_time DESC'])

    def commit(self):
        git = ['git', '-c', 'user.name=t', '-c', 'user.email=t@example.com']
        subprocess.run([*git, 'add', '-A'], cwd=self.root, check=True, capture_output=True)
        subprocess.run([*git, 'commit', '-qm', 'test'], cwd=self.root, check=True, capture_output=True)
        return subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=self.root, capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope='module')
def ray_session(proj):
    "One local Ray for a module's in-process work, started as nbprod starts it for the module's own `proj` fixture, ended with nbprod's shutdown."
    from nbprod.cluster import connect, shutdown
    ray = connect(proj.settings())
    yield ray
    shutdown()


@pytest.fixture
def project(tmp_path):
    root = tmp_path/'proj'
    root.mkdir()
    (root/'pyproject.toml').write_text('[project]\nname = "proj"\n\n[tool.nbprod]\nexperiment = "proj"\n')
    (root/'settings.ini').write_text('[DEFAULT]\n')
    (root/'.gitignore').write_text('.nbprod/\n')
    subprocess.run(['git', 'init', '-q', '-b', 'main'], cwd=root, check=True)
    return Project(root)


def pid_alive(pid: int) -> bool:
    try: os.kill(pid, 0)
    except ProcessLookupError: return False
    # a zombie still answers kill(0); read its state
    try: return Path(f'/proc/{pid}/stat').read_text().split(')')[-1].split()[0] != 'Z'
    except OSError: return False


def free_port() -> int:
    "A free port Ray will not take for itself while the test's server starts (see nbprod.serving.free_port)."
    from nbprod.serving import free_port
    return free_port()


def call(url, body=None, key=None, method=None, headers=None, timeout=30):
    "(status, JSON body, headers) of one HTTP request; `body` is JSON-encoded unless it is bytes."
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method or ('POST' if data is not None else 'GET'),
                                 headers={'Content-Type': 'application/json', **({'Authorization': f'Bearer {key}'} if key else {}), **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r: return r.status, _json(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e: return e.code, _json(e.read()), dict(e.headers)


def _json(raw: bytes):
    try: return json.loads(raw)
    except ValueError: return raw.decode(errors='replace')   # Ray Serve's own answers (before the app is up, backpressure) are text


def wait_ready(proc, url, seconds=180):
    "Wait until `nbprod serve` (process `proc`) answers /readyz at `url`."
    deadline = time.time() + seconds
    while True:
        assert proc.poll() is None, proc.communicate()
        try:
            if call(f'{url}/readyz')[0] == 200: return
        except (urllib.error.URLError, http.client.HTTPException, OSError): pass
        assert time.time() < deadline, "the endpoint did not become ready"
        time.sleep(1)


# --- process trees -----------------------------------------------------------------------------------------------

_TICK = os.sysconf('SC_CLK_TCK')


def _stat(pid: int):
    "(parent pid, start time in clock ticks since boot, state) of process `pid`, or None when it is gone."
    try: raw = Path(f'/proc/{pid}/stat').read_text()
    except OSError: return None
    f = raw.rpartition(')')[2].split()
    return int(f[1]), int(f[19]), f[0]


def _ticks_now() -> int:
    return int(float(Path('/proc/uptime').read_text().split()[0]) * _TICK)


def _pids():
    return [int(d) for d in os.listdir('/proc') if d.isdigit()]


def _marked(name: str, value: str) -> set[int]:
    "Processes whose environment (as they were started) holds `name=value`."
    needle = f'{name}={value}'.encode()
    out = set()
    for pid in _pids():
        try: env = Path(f'/proc/{pid}/environ').read_bytes()
        except OSError: continue
        if needle in env.split(b'\0'): out.add(pid)
    return out


def descendants(pid: int) -> set[int]:
    "The processes below `pid` (children, theirs, ...), not `pid` itself."
    children = {}
    for p in _pids():
        st = _stat(p)
        if st: children.setdefault(st[0], []).append(p)
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out: out.add(c); todo.append(c)
    return out


def cmdline(pid: int) -> str:
    try: return Path(f'/proc/{pid}/cmdline').read_bytes().replace(b'\0', b' ').decode(errors='replace').strip()
    except OSError: return ''


def _alive(procs: dict[int, int]) -> dict[int, int]:
    "The processes of `{pid: start time}` still running as themselves (a pid reused since, or a zombie, is not)."
    out = {}
    for pid, t in procs.items():
        st = _stat(pid)
        if st and st[1] == t and st[2] not in 'ZX': out[pid] = t
    return out


def _identify(pids) -> dict[int, int]:
    return {p: st[1] for p in pids if (st := _stat(p)) and st[2] not in 'ZX'}


def end_processes(procs: dict[int, int], grace: float = 10) -> list[str]:
    "SIGTERM the processes `{pid: start time}`, SIGKILL those left after `grace` s; the command lines of those that were running."
    procs = _alive(procs)
    ended = [f'{pid} {cmdline(pid)}' for pid in procs]
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5)):
        for pid in _alive(procs):
            try: os.kill(pid, sig)
            except OSError: pass
        deadline = time.time() + wait
        while _alive(procs) and time.time() < deadline: time.sleep(0.1)
        procs = _alive(procs)
        if not procs: break
    return ended


def tree(proc) -> dict[int, int]:
    "`{pid: start time}` of what `proc` (a Popen) started and still runs: its descendants, and the processes carrying its marker."
    pids = descendants(proc.pid) | (_marked(TREE_MARK, proc.tree_mark) if getattr(proc, 'tree_mark', None) else set())
    return _identify(pids - {proc.pid})


def end_tree(proc, grace: float = 10) -> list[str]:
    "End `proc` (a Popen) and everything it started (Ray's processes, HAProxy), even reparented: for a server whose stop failed."
    procs = tree(proc)
    if proc.poll() is None: procs[proc.pid] = _stat(proc.pid)[1]
    ended = end_processes(procs, grace)
    try: proc.wait(5)
    except subprocess.TimeoutExpired: pass
    return ended


def stop_server(proc, timeout: float = 120) -> bool:
    "Ctrl-C `proc`, wait `timeout` s for it to end; whatever of its tree is left then (or after a stop that failed) is ended. True when it stopped by itself."
    try:
        if proc.poll() is None: proc.send_signal(signal.SIGINT)
        try: proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired: return False
        deadline = time.time() + 15              # Ray's workers end a moment after the driver
        while tree(proc) and time.time() < deadline: time.sleep(0.2)
        return not tree(proc)
    finally: end_tree(proc)


def stop_collect(proc, timeout: float = 120) -> tuple[str, str]:
    "Ctrl-C `proc` (a server started with pipes) and read what it printed; a server that does not stop within `timeout` s has its whole tree ended and fails the test."
    if proc.poll() is None: proc.send_signal(signal.SIGINT)
    try: out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        ended = end_tree(proc)
        out, err = proc.communicate()
        raise AssertionError(f"{proc.args} did not stop within {timeout:.0f} s of Ctrl-C; ended {len(ended)} processes of its tree\n"
                             f"stderr:\n{err[-3000:]}") from None
    end_leftovers(proc)
    return out, err


def end_leftovers(proc, wait: float = 15) -> list[str]:
    "After `proc` ended: give what it started `wait` s to end (Ray's workers end a moment after the driver), then end the rest."
    deadline = time.time() + wait
    while tree(proc) and time.time() < deadline: time.sleep(0.2)
    return end_tree(proc)


def in_session(sid: int) -> dict[int, int]:
    "`{pid: start time}` of the processes of session `sid` (a process started with start_new_session=True has its pid as its session's id)."
    out = {}
    for pid in _pids():
        try: f = Path(f'/proc/{pid}/stat').read_text().rpartition(')')[2].split()
        except OSError: continue
        if int(f[4]) == sid and f[0] not in 'ZX': out[pid] = int(f[19])
    return out


def stop_ray_node(proc, wait: float = 30) -> list[str]:
    "SIGTERM a `ray start --block` started with start_new_session=True (it stops the processes it started), then end what of its session is left after `wait` s (agents that outlive it)."
    procs = {**in_session(proc.pid), **_identify(descendants(proc.pid))}   # (a process of it that made a session of its own too)
    proc.send_signal(signal.SIGTERM)
    try: proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    deadline = time.time() + wait
    while (left := _alive({**procs, **in_session(proc.pid)})) and time.time() < deadline: time.sleep(0.5)
    return end_processes(left, grace=5) if left else []


def listening(pids) -> list[tuple[int, str, int]]:
    "`(pid, address, port)` of each TCP socket in LISTEN that processes `pids` hold open (IPv4 and IPv6)."
    inodes = {}
    for pid in pids:
        try: fds = os.listdir(f'/proc/{pid}/fd')
        except OSError: continue
        for fd in fds:
            try: link = os.readlink(f'/proc/{pid}/fd/{fd}')
            except OSError: continue
            if link.startswith('socket:['): inodes.setdefault(link[8:-1], pid)
    out = []
    for table, v6 in (('tcp', False), ('tcp6', True)):
        try: lines = Path(f'/proc/net/{table}').read_text().splitlines()[1:]
        except OSError: continue
        for line in lines:
            f = line.split()
            if f[3] != '0A' or f[9] not in inodes: continue          # 0A: LISTEN
            hexaddr, hexport = f[1].split(':')
            raw = bytes.fromhex(hexaddr)
            import ipaddress
            if v6: addr = ipaddress.IPv6Address(b''.join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
            else: addr = ipaddress.IPv4Address(raw[::-1])
            out.append((inodes[f[9]], str(addr.ipv4_mapped or addr) if v6 else str(addr), int(hexport, 16)))
    return out


@pytest.fixture(scope='module', autouse=True)
def no_process_left(request):
    "After each module: no process this run started during the module may still run; any left is ended and the module fails."
    since, me = _ticks_now(), os.getpid()
    yield
    def left():
        pids = (_marked(RUN_MARK, os.environ[RUN_MARK]) | descendants(me)) - {me}
        return {p: t for p, t in _identify(pids).items() if t >= since - _TICK}
    deadline = time.time() + 20                  # a server stopped a moment ago: its Ray's workers end a few seconds later
    while (procs := left()) and time.time() < deadline: time.sleep(0.5)
    if procs:
        ended = end_processes(procs)
        pytest.fail(f"{request.module.__name__} left {len(ended)} processes running (now ended):\n" + '\n'.join(ended), pytrace=False)
