"""`nbprod serve` under stress, over real HTTP on 127.0.0.1: overload is refused at once with 503 and Retry-After, and a
replica killed with SIGKILL under load loses none of the predictions it answered from the audit log. Two replicas:
their metrics and their traffic profiles add up."""
import signal, threading, time
from collections import Counter

import pytest

from conftest import Project, call, free_port, wait_ready, stop_collect
from sleepy import register


@pytest.fixture(scope='module')
def served(tmp_path_factory):
    "Two replicas that take 4 requests each, 4 more may wait; the model is `sleepy.Sleepy`."
    from nbprod.auth import create_key
    p = Project(tmp_path_factory.mktemp('faults'))
    (p.root/'pyproject.toml').write_text('[project]\nname = "faults"\n\n[tool.nbprod]\n\n[tool.nbprod.serve.models.sleepy]\n')
    port = free_port()
    (p.root/'settings.ini').write_text(f'[DEFAULT]\nserve_port = {port}\nserve_replicas = 2\nmax_ongoing_requests = 4\n'
                                       'max_queued_requests = 4\nretry_after_s = 3\nprofile_flush_s = 1\n')
    s = p.settings()
    register(p)
    _, key = create_key(s, 'tests', ['sleepy'])
    _, scrape = create_key(s, 'prometheus', scopes=['metrics'])   # /metrics answers only a key with the metrics scope
    proc = p.popen('serve')
    url = f'http://127.0.0.1:{port}'
    try:
        wait_ready(proc, url)
        yield p, f'{url}/v1/models/sleepy/predict', key, proc, scrape
    finally:
        out, err = stop_collect(proc)             # Ctrl-C; a server that does not stop has its whole tree ended
    assert proc.returncode == 0, err


def test_metrics_add_up_across_replicas(served):
    "Requests answered by both replicas: every scrape of /metrics, whichever replica answers it, counts them all."
    from prometheus_client.parser import text_string_to_metric_families
    p, url, key, proc, scrape = served
    statuses = []
    def five():
        for _ in range(5): statuses.append(call(url, {'temp': 0.5, 'wait': 0.05}, key)[0])
    deadline = time.time() + 60
    while True:                           # bursts of 30 at once until both replicas have answered some (HAProxy adds the second within seconds)
        threads = [threading.Thread(target=five) for _ in range(6)]
        for t in threads: t.start()
        for t in threads: t.join(timeout=60)
        files = list((p.settings().store/'audit'/'sleepy').rglob('*.jsonl'))
        if len(files) == 2: break
        assert time.time() < deadline, files
    answered = statuses.count(200)
    assert answered >= len(statuses) // 2 and set(statuses) <= {200, 503}, statuses   # 503: over the limits, refused before nbprod
    time.sleep(1.5)                       # each replica sends its counts every second
    base = url.rsplit('/v1/', 1)[0]
    for _ in range(6):
        status, text, _ = call(f'{base}/metrics', key=scrape)
        assert status == 200
        counted = sum(x.value for f in text_string_to_metric_families(text) for x in f.samples
                      if x.name == 'nbprod_requests_total' and x.labels['code'] == '200')
        assert counted == answered, (answered, text)
    # the traffic profiles: each replica wrote its part; merged, they are the profile of every answered record
    from nbprod.audit import read_audit
    from nbprod.profiles import merge, profile, summary
    from nbprod.windows import windows
    store = p.settings().store
    deadline = time.time() + 30                              # each replica writes every second (profile_flush_s)
    while merge(windows(store/'profiles', 'sleepy').values()).rows < answered and time.time() < deadline: time.sleep(0.5)
    parts = list((store/'profiles'/'sleepy'/'windows').glob('*/v1/*.bin'))
    assert len({f.name for f in parts}) == 2, parts          # one file per replica (and window)
    traffic = merge(windows(store/'profiles', 'sleepy').values())
    audit = read_audit(store/'audit', 'sleepy')
    assert traffic.rows == len(audit) == answered
    import json, pandas as pd
    every = profile(pd.DataFrame([{**json.loads(i), 'prediction': json.loads(o)} for i, o in zip(audit.inputs, audit.outputs)]))
    a, b = summary(traffic), summary(every)
    assert a['count'].to_dict() == b['count'].to_dict() and a['max'].to_dict() == b['max'].to_dict()
    assert abs(a.loc['wait', 'mean'] - b.loc['wait', 'mean']) < 1e-9


def _burst(url, key, n, wait, rid=''):
    "n requests at once; [(status, seconds, headers, request id)]."
    got = [None] * n
    def one(i):
        t0 = time.perf_counter()
        status, body, headers = call(url, {'temp': 0.5, 'wait': wait}, key, headers={'X-Request-ID': f'{rid}{i}'} if rid else None)
        got[i] = (status, time.perf_counter() - t0, {k.lower(): v for k, v in headers.items()}, f'{rid}{i}')
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads: t.start()
    for t in threads: t.join(timeout=60)
    return got


def test_overload_is_503_with_retry_after_not_a_timeout(served):
    "40 requests of 1.5 s at once against room for 8 (+4 waiting): the rest are refused at once, the server goes on."
    p, url, key, proc, scrape = served
    assert call(url, {'temp': 0.5, 'wait': 0.0}, key)[0] == 200
    got = _burst(url, key, 40, 1.5)
    codes = Counter(s for s, *_ in got)
    assert set(codes) == {200, 503} and codes[200] >= 8 and codes[503] >= 5, codes   # room for 8 at once, 4 waiting (plus what HAProxy holds)
    refused = [(t, h) for s, t, h, _ in got if s == 503]
    assert all(h.get('retry-after') == '3' for _, h in refused), refused[:3]
    assert max(t for t, _ in refused) < 1.5, sorted(t for t, _ in refused)[-3:]   # refused, not left to time out
    status, body, _ = call(url, {'temp': 0.5, 'wait': 0.0}, key)
    assert status == 200 and abs(body['prediction'] - 50) < 1e-9


def _replica_pids(proc):
    import psutil
    found = {}
    for c in psutil.Process(proc.pid).children(recursive=True):   # only processes this test started
        try: cmd = ' '.join(c.cmdline())
        except psutil.Error: continue
        if 'ServeReplica' in cmd and 'nbprod' in cmd and 'nbprod-explain' not in cmd: found[c.pid] = c   # the endpoint's, not the explanations' process
    return found


def test_sigkill_a_replica_under_load_loses_no_answered_prediction(served):
    "8 clients for 8 s; a replica is killed with SIGKILL after 3 s. Every request answered 200 is in the audit log."
    import psutil
    from nbprod.audit import read_audit
    p, url, key, proc, scrape = served
    replicas = _replica_pids(proc)
    assert len(replicas) == 2, replicas
    victim = sorted(replicas)[0]
    answers, stop = [], threading.Event()
    def load(c):
        i = 0
        while not stop.is_set():
            rid = f'kill-{c}-{i}'
            try: status = call(url, {'temp': 0.5, 'wait': 0.002}, key, headers={'X-Request-ID': rid}, timeout=20)[0]
            except OSError as e: status = type(e).__name__   # a connection cut by the kill: not answered
            answers.append((rid, status))
            i += 1
    threads = [threading.Thread(target=load, args=(c,)) for c in range(8)]
    for t in threads: t.start()
    try:
        time.sleep(3)
        before = sum(s == 200 for _, s in answers)
        replicas[victim].send_signal(signal.SIGKILL)
        time.sleep(5)
    finally:
        stop.set()
        for t in threads: t.join(timeout=30)
    assert not psutil.pid_exists(victim) or psutil.Process(victim).status() == psutil.STATUS_ZOMBIE
    answered = {rid for rid, s in answers if s == 200}
    assert before > 50 and len(answered) > before + 50, (before, len(answered), Counter(s for _, s in answers))   # served on after the kill
    audit = read_audit(p.settings().store/'audit', 'sleepy')
    missing = answered - set(audit.request_id)
    assert not missing, f"{len(missing)} answered predictions are not in the audit log, e.g. {sorted(missing)[:5]}"
    files = list((p.settings().store/'audit'/'sleepy').rglob(f'*-{victim}.jsonl'))
    assert files and files[0].stat().st_size > 0, "the killed replica had answered nothing: the test proved nothing"
    wait_ready(proc, url.rsplit('/v1/', 1)[0], seconds=120)


def test_a_request_that_breaks_the_model_fails_alone(served):
    "6 requests at once, batched together; 2 break the model: those 2 get a 500 with their request id, the other 4 their prediction."
    p, url, key, proc, scrape = served
    got = [None] * 6
    def one(i):
        for _ in range(50):   # a replica may still be coming back from the SIGKILL test: a 503 says to try again
            status, body, _ = call(url, {'temp': -1.0 if i % 4 == 0 else 0.5, 'wait': 0.2}, key, headers={'X-Request-ID': f'mixed-{i}'})
            if status != 503: break
            time.sleep(0.2)
        got[i] = (status, body)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads: t.start()
    for t in threads: t.join(timeout=60)
    for i, (status, body) in enumerate(got):
        if i % 4 == 0: assert status == 500 and body == {'request_id': f'mixed-{i}', 'error': 'internal error: ValueError'}, (i, status, body)
        else: assert status == 200 and abs(body['prediction'] - 50) < 1e-9, (i, status, body)
