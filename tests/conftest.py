"""Fixtures for cross-process tests: throw-away nbprod projects, notebooks, and the `nbprod` CLI in a subprocess."""
import http.client, json, os, subprocess, sys, time, urllib.error, urllib.request
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

BIN = Path(sys.executable).parent
NBPROD = str(BIN/'nbprod')


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

    def popen(self, *args, env=None):
        return subprocess.Popen([NBPROD, *map(str, args)], cwd=self.root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env or self.env())

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
