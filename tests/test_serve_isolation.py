"""Two projects served at once on one machine, by two `nbprod serve`: each answers only for its own models and keys, every
port of theirs (HAProxy's, Serve's, the replicas', Ray's) listens on 127.0.0.1 only, HAProxy's admin socket is owner-only,
and a third `nbprod serve` on a port in use is refused before Ray starts."""
import os, shutil, stat, subprocess, threading, time, warnings
from pathlib import Path

import pytest

from conftest import Project, call, cmdline, free_port, listening, sigint_ignored, stop_server, tree, wait_ready


def _project(root: Path, name: str, model: str, factor: int):
    "A project `name` serving `model` (v1 champion: factor * (100 * temp + hr)) on a free port, with a key for every model."
    import mlflow
    import pandas as pd
    from sklearn.linear_model import LinearRegression
    from nbprod.auth import create_key
    from nbprod.serving import _mlflow
    from nbprod.store import experiment_id
    root.mkdir()
    p = Project(root)
    (root/'pyproject.toml').write_text(f'[project]\nname = "{name}"\n\n[tool.nbprod]\n\n[tool.nbprod.serve.models.{model}]\n')
    port = free_port()
    (root/'settings.ini').write_text(f'[DEFAULT]\nserve_port = {port}\n')
    s = p.settings()
    client = _mlflow(s)          # (MLflow's tracking URI is this project's from here on)
    X = pd.DataFrame({'temp': [0.1, 0.5, 0.9], 'hr': [1, 8, 17]})
    with mlflow.start_run(experiment_id=experiment_id(s)), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        mlflow.sklearn.log_model(LinearRegression().fit(X, factor * (X.temp * 100 + X.hr)), name='model', input_example=X.head(2),
                                 registered_model_name=model, serialization_format='cloudpickle')
    client.set_registered_model_alias(model, 'champion', '1')
    _, key = create_key(s, 'tests')
    return p, port, key


class Served:
    def __init__(self, p, port, key, model, factor, ignore_sigint=False):
        self.p, self.port, self.key, self.model, self.factor = p, port, key, model, factor
        self.url = f'http://127.0.0.1:{port}'
        self.ignore_sigint = ignore_sigint
        self.proc = p.popen('serve', ignore_sigint=ignore_sigint)
        self.out, self.err = [], []   # read as it comes, so that a full pipe never blocks the server
        self.readers = [threading.Thread(target=lambda f=f, into=into: into.extend(f), daemon=True)
                        for f, into in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for r in self.readers: r.start()

    def printed(self):
        return f"stdout:\n{''.join(self.out)[-3000:]}\nstderr:\n{''.join(self.err)[-3000:]}"


@pytest.fixture(scope='module')
def two(tmp_path_factory):
    "Projects alpha (model `bikes`) and beta (model `taxis`), both served at once, started in parallel."
    base = tmp_path_factory.mktemp('iso')
    a = _project(base/'alpha', 'alpha', 'bikes', 1)
    b = _project(base/'beta', 'beta', 'taxis', 2)
    servers = [Served(*a, 'bikes', 1, ignore_sigint=True), Served(*b, 'taxis', 2)]   # alpha as a script's background job starts it
    try:
        for s in servers:
            try: wait_ready(s.proc, s.url)
            except AssertionError as e: raise AssertionError(f"{e}\n{s.printed()}") from None
        yield servers
    finally:
        stopped = [stop_server(s.proc) for s in servers]   # Ctrl-C; what is left of a tree that did not stop is ended
        for s in servers:
            for r in s.readers: r.join(10)
    for s, ok in zip(servers, stopped):       # each stopped by its Ctrl-C, alpha's too, though it was started with SIGINT ignored
        assert ok and s.proc.returncode == 0 and 'stopping' in ''.join(s.err), s.printed()


def test_each_answers_only_for_its_own_models_and_keys(two):
    from nbprod.audit import read_audit
    sent = {}
    for s in two:
        for i in range(12):
            rid = f'{s.model}-{i}'
            status, body, _ = call(f'{s.url}/v1/models/{s.model}/predict', {'temp': 0.5, 'hr': 8}, s.key, headers={'X-Request-ID': rid})
            assert status == 200 and body['model'] == s.model and abs(body['prediction'] - 58 * s.factor) < 1e-6, (s.model, status, body)
        sent[s.model] = {f'{s.model}-{i}' for i in range(12)}
    for s, other in (two, two[::-1]):
        status, body, _ = call(f'{s.url}/v1/models/{other.model}/predict', {'temp': 0.5, 'hr': 8}, s.key)
        assert status == 404 and 'no model named' in body['error'], body            # the other project's model is not here
        status, body, _ = call(f'{s.url}/v1/models/{s.model}/predict', {'temp': 0.5, 'hr': 8}, other.key)
        assert status == 401 and 'unknown API key' in body['error'], body           # nor are its keys
    for s, other in (two, two[::-1]):       # each project's audit log holds its own requests, all of them, and none of the other's
        audit = set(read_audit(s.p.settings().store/'audit', s.model).request_id)
        assert sent[s.model] <= audit and not sent[other.model] & audit, (s.model, sorted(audit)[:5])


def _haproxy_configs(pids):
    "The configuration file of each HAProxy among `pids` (after its -f)."
    out = set()
    for pid in pids:
        args = cmdline(pid).split()
        if args and os.path.basename(args[0]) == 'haproxy' and '-f' in args: out.add(Path(args[args.index('-f') + 1]))
    return out


def test_every_listening_socket_is_on_loopback(two):
    "Every TCP socket any process of either tree listens on (nbprod serve, Ray's, the replicas', HAProxy's) is on 127.0.0.1 or ::1."
    ports = []
    for s in two:
        pids = {s.proc.pid, *tree(s.proc)}
        socks = listening(pids)
        assert any(port == s.port for _, _, port in socks), socks
        wide = [(pid, addr, port, cmdline(pid)[:80]) for pid, addr, port in socks if addr not in ('127.0.0.1', '::1')]
        assert not wide, wide
        ports.append({port for *_, port in socks})
    assert not ports[0] & ports[1], ports[0] & ports[1]     # no port of one project is the other's


def test_haproxy_admin_socket_is_owner_only(two):
    if not all(_haproxy_configs(tree(s.proc)) for s in two):
        assert os.environ.get('RAY_SERVE_ENABLE_HA_PROXY') == '0' or not shutil.which('haproxy'), "nbprod serve runs no HAProxy"
        pytest.skip("HAProxy is not the proxy here")
    dirs = []
    for s in two:
        for cfg in _haproxy_configs(tree(s.proc)):
            sock = cfg.parent/'admin.sock'
            mode = os.stat(sock).st_mode
            assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600, oct(mode)
            for d in (cfg.parent, cfg.parent.parent):                 # the node's directory, and the one nbprod made
                assert stat.S_IMODE(d.stat().st_mode) == 0o700, (d, oct(d.stat().st_mode))
            assert 'haproxy-serve' not in str(cfg), cfg
            dirs.append(cfg.parent.parent)
    assert len(set(dirs)) == 2, dirs                                  # one directory per project


def test_a_port_in_use_is_refused_before_ray_starts(two):
    alpha, beta = two
    for args, env in ((('serve',), None),                                            # alpha's own port: its server has it
                      (('serve', '--port', beta.port), None),
                      (('serve',), alpha.p.env(NBPROD_SERVE_PORT=str(beta.port)))):
        t0 = time.monotonic()
        r = alpha.p.cli(*args, env=env, timeout=60)
        took, said = time.monotonic() - t0, ' '.join(r.stderr.split())
        assert r.returncode != 0 and "key 'serve_port'" in said and 'address in use' in said, r.stderr
        assert 'NBPROD_SERVE_PORT' in said and '--port' in said and 'Ray' not in said, r.stderr
        assert took < 30, took           # refused at once (the CLI's imports), not after starting Ray


def test_a_server_started_with_sigint_ignored_listens_for_ctrl_c(two):
    "A background job of a non-interactive shell (or nohup) starts with SIGINT ignored, and Python keeps it so: nbprod serve listens all the same (the fixture's Ctrl-C stops it)."
    alpha, beta = two
    assert alpha.ignore_sigint and not sigint_ignored(alpha.proc.pid) and not sigint_ignored(beta.proc.pid)
