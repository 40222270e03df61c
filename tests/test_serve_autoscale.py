"""`serve_replicas = auto`: under load, Ray Serve's autoscaler adds a replica to an `nbprod serve` endpoint, and every
request is answered while it does."""
import signal, threading, time

from conftest import Project, call, free_port, wait_ready, stop_collect
from sleepy import register


def replicas(proc):
    "The Serve replicas of the endpoint `proc` (nbprod serve) started (not its explanations' process: one, never scaled)."
    import psutil
    out = []
    for c in psutil.Process(proc.pid).children(recursive=True):
        try:
            cmd = ' '.join(c.cmdline())
            if 'ServeReplica' in cmd and 'nbprod-explain' not in cmd: out.append(c.pid)
        except psutil.Error: pass
    return out


def test_autoscaling_adds_a_replica_under_load(tmp_path):
    from nbprod.auth import create_key
    p = Project(tmp_path)
    (p.root/'pyproject.toml').write_text('[project]\nname = "scale"\n\n[tool.nbprod]\n\n[tool.nbprod.serve.models.sleepy]\n')
    port = free_port()
    (p.root/'settings.ini').write_text(f'[DEFAULT]\nserve_port = {port}\nserve_replicas = auto\nmin_replicas = 1\nmax_replicas = 2\n'
                                       'target_ongoing_requests = 2\nupscale_delay_s = 1\n')
    register(p)
    _, key = create_key(p.settings(), 'tests', ['sleepy'])
    proc = p.popen('serve')
    url = f'http://127.0.0.1:{port}'
    answers, stop, threads = [], threading.Event(), []
    try:
        wait_ready(proc, url)
        assert len(replicas(proc)) == 1
        def load():
            while not stop.is_set():
                try: answers.append(call(f'{url}/v1/models/sleepy/predict', {'temp': 0.5, 'wait': 0.05}, key)[0])
                except OSError as e: answers.append(type(e).__name__)   # a dropped connection: not answered
        threads = [threading.Thread(target=load) for _ in range(8)]   # 8 in progress against a target of 2 per replica
        for t in threads: t.start()
        deadline = time.time() + 120
        while len(replicas(proc)) < 2:
            assert time.time() < deadline, "no second replica after 2 minutes of load"
            time.sleep(1)
        wait_ready(proc, url)
        time.sleep(3)
    finally:
        stop.set()
        for t in threads: t.join(timeout=30)   # every request in flight answered before the server stops
        out, err = stop_collect(proc)             # Ctrl-C; a server that does not stop has its whole tree ended
    assert proc.returncode == 0, err
    assert len(answers) > 50 and set(answers) == {200}, sorted(set(answers))
