"""`nbprod serve` against callers that push, over real HTTP on 127.0.0.1: nothing about the models answers without a key
(OpenAPI per key, docs pages unpublished, /metrics to its own key), per-key rate limits answered 429 with Retry-After, and
/explain with its own record limit and threads, so that four clients explaining 1,000 records at a time do not stall a
fifth client's predictions."""
import json, math, signal, subprocess, sys, threading, time, uuid
from collections import Counter

import pytest

from conftest import Project, call, free_port, wait_ready, stop_collect

RECORD = {'temp': 0.5, 'hr': 8}


def ask(*args, **kw):
    "`conftest.call`, with the answer's header names in lower case."
    status, body, headers = call(*args, **kw)
    return status, body, {k.lower(): v for k, v in headers.items()}


@pytest.fixture(scope='module')
def served(tmp_path_factory):
    "Models `bikeshare` and `taxi` (the same registered model); keys: unlimited, default-limited (5/s, burst 5), its own limit (1/s, burst 2), taxi's, metrics, expiring."
    import mlflow, warnings
    import pandas as pd
    from sklearn.linear_model import LinearRegression
    from nbprod.auth import create_key
    from nbprod.serving import _mlflow
    from nbprod.store import experiment_id
    p = Project(tmp_path_factory.mktemp('limits'))
    (p.root/'pyproject.toml').write_text('[project]\nname = "limits"\n\n[tool.nbprod]\n\n[tool.nbprod.serve.models.bikeshare]\n'
                                         '\n[tool.nbprod.serve.models.taxi]\nregistered_model = "bikeshare"\n')
    port = free_port()
    (p.root/'settings.ini').write_text(f'[DEFAULT]\nserve_port = {port}\nmax_records = 2000\nexplain_max_records = 1000\n'
                                       'rate_limit_rps = 5\nrate_limit_burst = 5\nprofile_traffic = false\n')
    s = p.settings()
    client = _mlflow(s)                     # MLflow's tracking URI: the project's store
    X = pd.DataFrame({'temp': [0.1, 0.5, 0.9], 'hr': [1, 8, 17]})
    with mlflow.start_run(experiment_id=experiment_id(s)), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        mlflow.sklearn.log_model(LinearRegression().fit(X, X.temp * 100 + X.hr), name='model', input_example=X.head(2),
                                 registered_model_name='bikeshare', serialization_format='cloudpickle')
    client.set_registered_model_alias('bikeshare', 'champion', '1')
    keys = {name: create_key(s, name, models, scopes, **kw)[1] for name, models, scopes, kw in [
        ('load', ['bikeshare'], ['predict'], {'rate': 0}),            # no limit: the load test's clients
        ('default', ['bikeshare'], ['predict'], {}),                  # the settings' 5/s, burst 5
        ('tight', ['bikeshare'], ['predict'], {'rate': 1, 'burst': 2}),
        ('taxi-team', ['taxi'], ['predict'], {}),
        ('prometheus', ['*'], ['metrics'], {}),
        ('short-lived', ['bikeshare'], ['predict'], {'expires': 3})]}
    proc = p.popen('serve')
    url = f'http://127.0.0.1:{port}'
    try:
        wait_ready(proc, url)
        yield p, url, keys
    finally:
        out, err = stop_collect(proc)             # Ctrl-C; a server that does not stop has its whole tree ended
    assert proc.returncode == 0, err[-3000:]


def _audited(p, model='bikeshare'):
    "The model's audit log, checked: `verify_audit` finds no problem."
    from nbprod.audit import read_audit, verify_audit
    store = p.settings().store/'audit'
    checks = verify_audit(store, model)
    assert checks and all(c.status != 'problem' for c in checks), [c for c in checks if c.status == 'problem']
    return read_audit(store, model)


def test_nothing_about_the_models_answers_without_a_key(served):
    "/openapi.json: 401 without a key (forged, huge, expired), a key's own models with one; /docs and /redoc unpublished; a 404 before auth names nothing."
    p, url, keys = served
    huge = 'nbp_00000000_' + 'x' * 10_000
    for key in (None, 'nbp_00000000_forged', 'not-even-a-key', huge):
        for path in ('/openapi.json', '/v1/models', '/metrics'):
            status, body, headers = ask(f'{url}{path}', key=key)
            assert status == 401 and 'bikeshare' not in json.dumps(body) and 'taxi' not in json.dumps(body), (path, key and key[:20], status, body)
            assert headers['www-authenticate'].startswith('Bearer'), headers
    status, body, _ = call(f'{url}/openapi.json', key=huge)
    assert 'over the limit of 4,096' in body['error'], body
    status, spec, _ = call(f'{url}/openapi.json', key=keys['default'])
    assert status == 200 and {'/v1/models/bikeshare/predict', '/v1/models/bikeshare/explain', '/healthz'} <= set(spec['paths']), spec['paths'].keys()
    assert 'taxi' not in json.dumps(spec), [p for p in spec['paths'] if 'taxi' in p]
    explain = spec['paths']['/v1/models/bikeshare/explain']['post']['requestBody']['content']['application/json']['schema']
    assert explain['oneOf'][1]['maxItems'] == 1000, explain                          # explain_max_records, in the schema
    status, spec, _ = call(f'{url}/openapi.json', key=keys['taxi-team'])
    assert status == 200 and '/v1/models/taxi/predict' in spec['paths'] and 'bikeshare' not in json.dumps(spec)
    status, spec, _ = call(f'{url}/openapi.json', key=keys['prometheus'])           # a key that may call no model: no model's route
    assert status == 200 and not [x for x in spec['paths'] if x.startswith('/v1/models/')], spec['paths'].keys()
    for page in ('/docs', '/redoc'):
        for key in (None, keys['default']):
            status, body, _ = call(f'{url}{page}', key=key)
            assert status == 404 and 'publish_docs' in body['hint'] and 'bikeshare' not in json.dumps(body), body
    for route in ('predict', 'explain'):                                              # an unknown model: 401 first, no names
        status, body, _ = call(f'{url}/v1/models/nope/{route}', RECORD)
        assert status == 401 and 'bikeshare' not in json.dumps(body) and 'taxi' not in json.dumps(body), body
    status, body, _ = call(f'{url}/v1/models/nope/predict', RECORD, keys['taxi-team'])
    assert status == 404 and body['hint'] == 'models served here that your key may call: taxi', body
    time.sleep(3)                                                                      # the short-lived key expires
    status, body, _ = call(f'{url}/openapi.json', key=keys['short-lived'])
    assert status == 401 and 'expired' in body['error'], body
    status, body, _ = call(f'{url}/v1/models/bikeshare/predict', RECORD, keys['short-lived'])
    assert status == 401 and 'expired' in body['error'], body
    assert call(f'{url}/healthz')[0] == 200 and call(f'{url}/readyz')[0] == 200         # the probes stay open


def test_metrics_answer_only_a_metrics_key(served):
    from prometheus_client.parser import text_string_to_metric_families
    p, url, keys = served
    rid = f'm-{uuid.uuid4().hex[:8]}'
    assert call(f'{url}/v1/models/bikeshare/predict', RECORD, keys['load'], headers={'X-Request-ID': rid})[0] == 200
    status, body, _ = call(f'{url}/metrics', key=keys['load'])                      # a key to predict is not a key to the metrics
    assert status == 403 and 'nbprod keys create prometheus --scope metrics' in body['hint'], body
    status, body, _ = call(f'{url}/v1/models/bikeshare/predict', RECORD, keys['prometheus'])   # nor the other way round
    assert status == 403 and "no 'predict' scope" in body['error'], body
    time.sleep(1.5)                                                                     # the replica sends its counts every second
    status, text, headers = ask(f'{url}/metrics', key=keys['prometheus'])
    assert status == 200 and headers['content-type'].startswith('text/plain'), (status, text)
    ok = sum(x.value for f in text_string_to_metric_families(text) for x in f.samples
             if x.name == 'nbprod_requests_total' and x.labels['code'] == '200' and x.labels['model'] == 'bikeshare')
    assert ok >= 1, text


def test_rate_limits_per_key_with_retry_after(served):
    "A key over its limit gets 429 with Retry-After (whole seconds, >= 1) and a body naming the limit; other keys are not slowed; after Retry-After it is answered again; every 200 is in the audit log once."
    p, url, keys = served
    answered, refused = [], []
    def send(key, n, tag):
        out = []
        for i in range(n):
            rid = f'{tag}-{uuid.uuid4().hex[:10]}'
            status, body, headers = ask(f'{url}/v1/models/bikeshare/predict', RECORD, keys[key], headers={'X-Request-ID': rid})
            (answered if status == 200 else refused).append(rid)
            out.append((status, body, headers))
        return out
    got = send('tight', 4, 'tight')                          # 1/s, burst 2: two at once, then refused
    assert [s for s, _, _ in got[:2]] == [200, 200] and got[3][0] == 429, [(s, b) for s, b, _ in got]
    status, body, headers = got[3]
    wait = headers['retry-after']
    assert wait.isdigit() and 1 <= int(wait) <= 2, headers
    assert "over its rate limit of 1 requests a second, 2 at once" in body['error'] and body['errors'][0]['field'] == 'Authorization', body
    assert [s for s, _, _ in send('default', 5, 'other')] == [200] * 5   # another key, at the same time: its own bucket (the settings' 5)
    assert send('default', 1, 'other')[0][0] == 429                       # ... which it can empty too
    assert all(s == 200 for s, _, _ in send('load', 30, 'load'))          # a key with rate 0: no limit
    time.sleep(int(wait))
    assert send('tight', 1, 'tight')[0][0] == 200                          # answered again after Retry-After
    labelled = [call(f'{url}/v1/feedback', {'model': 'bikeshare', 'labels': [{'request_id': answered[0], 'label': 58.0}]}, keys['tight'])
                for _ in range(4)]                                        # labels count against the same limit (2 at once, 1/s)
    assert [s for s, _, _ in labelled].count(429) >= 1 and all(s in (200, 422, 429) for s, _, _ in labelled), [(s, b) for s, b, _ in labelled]
    assert all('over its rate limit' in b['error'] for s, b, _ in labelled if s == 429)
    audit = _audited(p)
    counts = Counter(audit.request_id)
    assert all(counts[r] == 1 for r in answered), [r for r in answered if counts[r] != 1]
    assert not any(r in counts for r in refused), [r for r in refused if r in counts]


def test_explain_has_its_own_record_limit(served):
    p, url, keys = served
    status, body, _ = call(f'{url}/v1/models/bikeshare/explain', [RECORD] * 1001, keys['load'])
    assert status == 422 and body['error'] == '1001 records; /explain takes at most 1000 per request', body
    assert 'explain_max_records' in body['errors'][0]['reason'] and '/predict takes up to 2000' in body['hint'], body
    assert call(f'{url}/v1/models/bikeshare/predict', [RECORD] * 1001, keys['load'])[0] == 200


_EXPLAINER = r'''
import http.client, json, sys, time, uuid
host, port, key, until, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4]), sys.argv[5]
body = json.dumps([{"temp": (i % 100) / 100, "hr": i % 24} for i in range(1000)]).encode()
seen = []
while time.time() < until:
    rid = "x-" + uuid.uuid4().hex
    c = http.client.HTTPConnection(host, port, timeout=120)
    t = time.perf_counter()
    c.request("POST", "/v1/models/bikeshare/explain", body, {"Authorization": "Bearer " + key, "Content-Type": "application/json", "X-Request-ID": rid})
    r = c.getresponse()
    raw = r.read()                                   # (not parsed: the clients should load the endpoint, not the machine)
    seen.append({"rid": rid, "status": r.status, "s": time.perf_counter() - t, "retry_after": r.getheader("Retry-After"),
                 "n": raw.count(b'"base_value"'), "error": None if r.status == 200 else raw[:300].decode(errors="replace")})
    c.close()
    if r.status == 503: time.sleep(int(r.getheader("Retry-After") or 1))
json.dump(seen, open(out, "w"))
'''


def test_explanations_do_not_stall_predictions(served, tmp_path):
    "Four processes explaining 1,000 records a request, for 20 s; meanwhile one client's one-record predictions keep a p99 under 100 ms."
    p, url, keys = served
    host, port = url.split('//')[1].split(':')
    assert call(f'{url}/v1/models/bikeshare/explain', [RECORD] * 1000, keys['load'])[0] == 200   # the explainer is made
    for _ in range(20): call(f'{url}/v1/models/bikeshare/predict', RECORD, keys['load'])          # warm
    seconds = 20
    until = time.time() + seconds + 2
    clients = [subprocess.Popen([sys.executable, '-c', _EXPLAINER, host, port, keys['load'], str(until), str(tmp_path/f'explain-{i}.json')])
               for i in range(4)]
    try:
        time.sleep(2)                                                     # the explanations are under way
        latencies, statuses, rids = [], [], []
        while time.time() < until:
            rid = f'p-{uuid.uuid4().hex}'
            t = time.perf_counter()
            status, body, _ = call(f'{url}/v1/models/bikeshare/predict', RECORD, keys['load'], headers={'X-Request-ID': rid})
            latencies.append(time.perf_counter() - t)
            statuses.append(status)
            rids.append(rid)
            time.sleep(0.02)
        for c in clients: assert c.wait(timeout=180) == 0
    finally:
        for c in clients:
            if c.poll() is None: c.kill(); c.wait()
    explained = [x for i in range(4) for x in json.loads((tmp_path/f'explain-{i}.json').read_text())]
    kinds = Counter(x['status'] for x in explained)
    lat = sorted(latencies)
    p50, p99 = lat[len(lat) // 2], lat[math.ceil(0.99 * len(lat)) - 1]
    report = (f"{len(lat)} predictions: p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, max {lat[-1] * 1000:.1f} ms; "
              f"explanations {dict(kinds)}, each {sorted(x['s'] for x in explained)[len(explained) // 2]:.2f} s (median)")
    print(report)
    assert set(statuses) == {200} and len(lat) >= 200, (Counter(statuses), report)
    assert set(kinds) <= {200, 503} and kinds[200] >= 4, (explained[:3], report)
    assert all(x['n'] == 1000 for x in explained if x['status'] == 200)
    assert all(x['retry_after'] and int(x['retry_after']) >= 1 for x in explained if x['status'] == 503)
    assert p99 < 0.100, report
    audit = _audited(p)
    counts = Counter(audit.request_id)
    assert all(counts[r] == 1 for r in rids), [r for r in rids if counts[r] != 1][:5]
    assert all(counts[x['rid']] == 1000 for x in explained if x['status'] == 200)
    assert not any(x['rid'] in counts for x in explained if x['status'] != 200)
