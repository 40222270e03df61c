"""`nbprod.cluster.shutdown` against a real local Ray, in a fresh process: every process of the Ray nbprod started ends
(its workers too), the autoscaler's monitor first, by SIGKILL, so that Ray's own shutdown does not wait out the monitor's
second of grace (it reports to a GCS already gone)."""
import json, subprocess, sys, textwrap, time

import psutil

SCRIPT = textwrap.dedent('''
    import json, os, sys
    from pathlib import Path
    from nbprod.cluster import connect, shutdown
    from nbprod.settings import load_settings
    root = Path(sys.argv[1])
    (root/'pyproject.toml').write_text('[project]\\nname = "demo"\\n\\n[tool.nbprod]\\n')
    ray = connect(load_settings(root, env={}))

    @ray.remote
    def pid():
        import psutil
        return [os.getpid(), psutil.Process().create_time()]

    workers = ray.get([pid.remote() for _ in range(2)])
    import psutil
    from ray._private import node, worker    # Ray's own record of the processes it started for this driver
    started = {kind: [i.process for i in infos] for kind, infos in worker._global_node.all_processes.items()}
    ids = [[p.pid, psutil.Process(p.pid).create_time()] for procs in started.values() for p in procs]
    order, kill = [], node.Node._kill_process_impl
    def noted(self, kind, **kw):             # the order Ray's node ends its processes in, and whether the monitor still ran
        order.append([kind, started['monitor'][0].poll() is None])
        return kill(self, kind, **kw)
    node.Node._kill_process_impl = noted
    shutdown()
    shutdown()                               # again: nothing left to end, no error
    print(json.dumps({'connected': ray.is_initialized(), 'workers': workers, 'order': order,
                      'codes': {kind: [p.poll() for p in procs] for kind, procs in started.items()},
                      'processes': ids}))
''')


def test_shutdown_ends_the_local_ray_monitor_first(tmp_path):
    r = subprocess.run([sys.executable, '-c', SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert not out['connected']
    codes = out['codes']
    assert {'gcs_server', 'raylet', 'monitor'} <= set(codes), codes
    assert codes['monitor'] == [-9], codes                        # ended by SIGKILL
    order = dict(out['order'])
    assert list(order)[0] == 'monitor' and order['gcs_server'] is False, out['order']   # first: gone before the GCS went
    assert all(c is not None for cs in codes.values() for c in cs), codes   # every process Ray started has exited
    deadline = time.time() + 30                                   # the raylet ends its workers as it goes
    while (alive := [pid for pid, born in out['workers'] + out['processes'] if running(pid, born)]):
        assert time.time() < deadline, f"still running after shutdown: {alive}"
        time.sleep(0.2)


def running(pid: int, born: float) -> bool:
    "Whether the process that had id `pid` and started at `born` still runs (a later process may have the id)."
    try:
        p = psutil.Process(pid)
        return abs(p.create_time() - born) < 0.01 and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess: return False
