"""`nbprod serve` over real HTTP on 127.0.0.1: a registered model behind Ray Serve, with keys, validation and the audit log."""
import json, os, shutil, signal, subprocess, threading, time, warnings
from pathlib import Path

import pytest

from conftest import Project, call, end_leftovers, end_tree, free_port, wait_ready


@pytest.fixture(scope='module')
def served(tmp_path_factory):
    "A project with model `bikeshare` (v1 champion) and a key, served by `nbprod serve` for the whole module."
    import mlflow
    import pandas as pd
    from sklearn.linear_model import LinearRegression
    from nbprod.auth import create_key
    from nbprod.serving import _mlflow
    from nbprod.store import experiment_id
    p = Project(tmp_path_factory.mktemp('serve'))
    (p.root/'pyproject.toml').write_text('[project]\nname = "demo"\n\n[tool.nbprod]\n\n[tool.nbprod.serve.models.bikeshare]\nchallenger = "challenger"\npii = ["client_id"]\n'
                                         '\n[tool.nbprod.serve.models.bikeshare-shadow]\nregistered_model = "bikeshare"\nchallenger = "challenger"\nshadow = true\n')
    port = free_port()
    (p.root/'settings.ini').write_text(f'[DEFAULT]\nserve_port = {port}\nmax_records = 50\nregistry_poll_s = 1\n')
    s = p.settings()
    client = _mlflow(s)
    X = pd.DataFrame({'temp': [0.1, 0.5, 0.9], 'hr': [1, 8, 17]})
    for k in (1, 2):
        with mlflow.start_run(experiment_id=experiment_id(s)), warnings.catch_warnings():
            warnings.simplefilter('ignore')
            mlflow.sklearn.log_model(LinearRegression().fit(X, k * (X.temp * 100 + X.hr)), name='model', input_example=X.head(2),
                                     registered_model_name='bikeshare', serialization_format='cloudpickle')
    client.set_registered_model_alias('bikeshare', 'champion', '1')
    _, key = create_key(s, 'tests', ['bikeshare', 'bikeshare-shadow'])
    _, other = create_key(s, 'other-team', ['bikeshare-shadow'])   # a key for another served model
    proc = p.popen('serve')
    url = f'http://127.0.0.1:{port}'
    out, err = [], []   # what nbprod serve prints, read as it comes (the banner comes once serve.run returns, after /readyz answers)
    readers = [threading.Thread(target=lambda f=f, into=into: into.extend(f), daemon=True) for f, into in ((proc.stdout, out), (proc.stderr, err))]
    for r in readers: r.start()
    printed = lambda: f"stdout:\n{''.join(out)[-3000:]}\nstderr:\n{''.join(err)[-3000:]}"
    try:
        try: wait_ready(proc, url)
        except AssertionError as e: raise AssertionError(f"{e}\n{printed()}") from None   # the readers hold what it printed
        deadline = time.time() + 60
        while not any('serving on' in l for l in out):
            assert proc.poll() is None and time.time() < deadline, f"no banner from nbprod serve\n{printed()}"
            time.sleep(0.2)
        listening = [l.split() for l in Path('/proc/net/tcp').read_text().splitlines()[1:]]
        mine = [l[1] for l in listening if l[3] == '0A' and int(l[1].split(':')[1], 16) == port]
        assert mine and all(a.startswith('0100007F:') for a in mine), mine    # 127.0.0.1 only
        yield p, url, key, other, client, proc
    finally:
        if proc.poll() is None: proc.send_signal(signal.SIGINT)   # nbprod serve stops Serve and its Ray
        try: proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            ended = end_tree(proc)                                 # its Ray and HAProxy too: nothing left to answer the next module
            raise AssertionError(f"nbprod serve did not stop within 120 s of Ctrl-C; ended {len(ended)} processes\n{printed()}") from None
        else: end_leftovers(proc)                                 # what a stop that did end left behind
        for r in readers: r.join(10)
    assert not any(r.is_alive() for r in readers), "nbprod serve's output did not end with it"
    out, err = ''.join(out), ''.join(err)
    assert proc.returncode == 0 and 'stopping' in err, err
    chosen = os.environ.get('RAY_SERVE_ENABLE_HA_PROXY', '1' if shutil.which('haproxy') else '0') == '1'   # as nbprod chooses
    assert ('HTTP proxy: HAProxy' if chosen else 'HTTP proxy: default') in out, out


def test_predict_one_and_many_with_request_id(served):
    p, url, key, *_ = served
    status, body, headers = call(f'{url}/v1/models/bikeshare/predict', {'temp': 0.5, 'hr': 8}, key, headers={'X-Request-ID': 'r-1', 'X-Client-ID': 'c9'})
    assert status == 200 and body['request_id'] == 'r-1' and body['version'] == '1' and body['variant'] == 'champion', body
    assert abs(body['prediction'] - 58.0) < 1e-6 and headers['x-model-version'] == '1'
    status, body, _ = call(f'{url}/v1/models/bikeshare/predict', [{'temp': 0.5, 'hr': 8}] * 3, key)
    assert status == 200 and len(body['predictions']) == 3


def test_explain_gives_contributions_that_add_up(served):
    "v1 is 100*temp + hr, explained exactly against its MLflow input example (temp 0.1 and 0.5, hr 1 and 8)."
    p, url, key, *_ = served
    status, body, headers = call(f'{url}/v1/models/bikeshare/explain', {'temp': 0.5, 'hr': 8}, key, headers={'X-Request-ID': 'why-1'})
    assert status == 200 and (body['request_id'], body['version'], body['method'], body['exact']) == ('why-1', '1', 'linear', True), body
    e = body['explanation']
    assert abs(e['contributions']['temp'] - 100 * (0.5 - 0.3)) < 1e-6 and abs(e['contributions']['hr'] - (8 - 4.5)) < 1e-6, e
    assert abs(e['base_value'] + sum(e['contributions'].values()) - e['prediction']) < 1e-6 and abs(e['prediction'] - 58) < 1e-6
    assert headers['x-model-version'] == '1'
    status, body, _ = call(f'{url}/v1/models/bikeshare/explain', [{'temp': 0.5, 'hr': 8}, {'temp': 0.1}], key)
    assert status == 422 and body['errors'][0]['field'] == 'hr', body
    assert call(f'{url}/v1/models/bikeshare/explain', {'temp': 0.5, 'hr': 8})[0] == 401


@pytest.mark.parametrize('body, key, status, text', [
    ({'temp': 0.5, 'hr': 8}, None, 401, 'no API key'),
    ({'temp': 0.5, 'hr': 8}, 'nbp_00000000_wrong', 401, 'unknown API key'),
    ({'temp': 0.5}, 'KEY', 422, 'missing field'),
    ({'temp': 'x', 'hr': 8}, 'KEY', 422, 'expected a number'),
    (b'{"temp": 0.5,', 'KEY', 400, 'malformed JSON'),
    ([], 'KEY', 422, 'empty list'),
    ([{'temp': 0.5, 'hr': 8}] * 51, 'KEY', 422, 'at most 50'),
])
def test_bad_requests_are_4xx_and_the_server_goes_on(served, body, key, status, text):
    p, url, good, *_ = served
    got, answer, _ = call(f'{url}/v1/models/bikeshare/predict', body, good if key == 'KEY' else key)
    assert got == status and text in answer['error'], answer
    assert call(f'{url}/v1/models/bikeshare/predict', {'temp': 0.5, 'hr': 8}, good)[0] == 200


def test_wrong_scope_is_403_and_models_lists_fields(served):
    p, url, key, other, *_ = served
    status, body, _ = call(f'{url}/v1/models/bikeshare/predict', {'temp': 0.5, 'hr': 8}, other)
    assert status == 403 and "may not call model 'bikeshare'" in body['error']
    status, body, _ = call(f'{url}/v1/models', key=key)
    assert status == 200 and body['models'][0]['inputs'] == [{'name': 'temp', 'type': 'double', 'required': True},
                                                              {'name': 'hr', 'type': 'long', 'required': True}]
    assert call(f'{url}/healthz')[0] == 200


def _until(predicate, proc, seconds=60):
    deadline = time.time() + seconds
    while not predicate():
        assert time.time() < deadline and proc.poll() is None, "the registry change did not reach the endpoint"
        time.sleep(0.5)


def test_ab_split_and_sticky_clients_over_http(served):
    "Challenger v2 at 30 %: the split holds over 400 requests, a client id always lands on the same variant."
    from nbprod.serving import set_traffic
    p, url, key, other, client, proc = served
    client.set_registered_model_alias('bikeshare', 'challenger', '2')
    set_traffic(p.settings(), 'bikeshare', 0.3)
    predict = lambda **h: call(f'{url}/v1/models/bikeshare/predict', {'temp': 0.5, 'hr': 8}, key, headers=h)[1]
    _until(lambda: any(predict()['variant'] == 'challenger' for _ in range(20)), proc)
    got = [predict()['variant'] for _ in range(400)]
    share = got.count('challenger') / len(got)
    assert 0.22 < share < 0.38, share
    for c in ('alice', 'bob', 'carol'):
        assert len({predict(**{'X-Client-ID': c})['variant'] for _ in range(10)}) == 1
    set_traffic(p.settings(), 'bikeshare', 0.0)
    client.delete_registered_model_alias('bikeshare', 'challenger')
    _until(lambda: all(predict()['variant'] == 'champion' for _ in range(20)), proc)


def test_shadow_sees_a_copy_and_is_only_audited(served):
    "Model `bikeshare-shadow` (same registered model, shadow = true): the client gets v1's answer; v2's is in the audit log."
    from nbprod.audit import read_audit
    p, url, key, other, client, proc = served
    client.set_registered_model_alias('bikeshare', 'challenger', '2')
    try:
        deadline, i = time.time() + 60, 0
        while True:                      # until the replica has loaded the challenger as the shadow
            rid, i = f'shadow-{i}', i + 1
            status, body, _ = call(f'{url}/v1/models/bikeshare-shadow/predict', {'temp': 0.5, 'hr': 8}, key, headers={'X-Request-ID': rid})
            assert status == 200 and (body['version'], body['variant']) == ('1', 'champion') and abs(body['prediction'] - 58) < 1e-6, body
            time.sleep(0.3)
            audit = read_audit(p.settings().store/'audit', 'bikeshare-shadow')
            mine = audit[audit.request_id == rid]
            if (mine.variant == 'shadow:challenger').any(): break
            assert time.time() < deadline and proc.poll() is None, "the shadow never answered"
        shadow = mine[mine.variant == 'shadow:challenger'].iloc[0]
        assert shadow.version == '2' and abs(json.loads(shadow.outputs) - 116) < 1e-6          # v2 = 2 * (100 * temp + hr)
        assert mine[mine.variant == 'champion'].version.tolist() == ['1']
    finally:
        client.delete_registered_model_alias('bikeshare', 'challenger')


def test_promotion_under_load_drops_nothing(served):
    "Champion v1 -> v2 while requests flow: every request answered 200, by v1 then v2, no restart."
    import threading
    p, url, key, other, client, proc = served
    answers, stop = [], threading.Event()
    def load():
        while not stop.is_set():
            status, body, _ = call(f'{url}/v1/models/bikeshare/predict', {'temp': 0.5, 'hr': 8}, key)
            answers.append((status, body.get('version') if isinstance(body, dict) else body))
    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads: t.start()
    try:
        time.sleep(2)
        client.set_registered_model_alias('bikeshare', 'champion', '2')
        _until(lambda: answers and answers[-1][1] == '2', proc)
        time.sleep(2)
    finally:
        stop.set()
        for t in threads: t.join()
    assert answers and all(s == 200 for s, _ in answers), [a for a in answers if a[0] != 200][:5]
    versions = [v for _, v in answers]
    assert versions[0] == '1' and versions[-1] == '2' and len(answers) > 50, (len(answers), versions[:3], versions[-3:])
    status, body, _ = call(f'{url}/v1/models/bikeshare/predict', {'temp': 0.5, 'hr': 8}, key)
    assert status == 200 and abs(body['prediction'] - 116.0) < 1e-6


def test_answered_predictions_are_in_the_audit_log(served):
    from nbprod.audit import read_audit
    p, url, key, *_ = served
    status, body, _ = call(f'{url}/v1/models/bikeshare/predict', {'temp': 0.9, 'hr': 17}, key, headers={'X-Request-ID': 'audit-me', 'X-Client-ID': 'alice'})
    assert status == 200
    df = read_audit(p.settings().store/'audit', 'bikeshare')
    row = df[df.request_id == 'audit-me'].iloc[0]
    assert row.key == 'tests' and row.client_id.startswith('hmac:') and json.loads(row.inputs) == {'temp': 0.9, 'hr': 17}
    assert abs(json.loads(row.outputs) - body['prediction']) < 1e-9


def test_fuzz_1000_bad_requests_no_5xx(served):
    "Generated bad bodies and headers (hypothesis), to /predict and /explain: every answer is 4xx, none 5xx, and the server still answers."
    from hypothesis import HealthCheck, given, settings, strategies as st
    p, url, key, *_ = served
    scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70), st.text(max_size=20),
                        st.floats(allow_nan=True, allow_infinity=True))
    json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)
    near_records = st.fixed_dictionaries({}, optional={'temp': scalars, 'hr': scalars, 'extra': scalars})   # missing, wrong types, unknown
    bodies = st.one_of(json_values.map(lambda v: json.dumps(v).encode()), near_records.map(lambda v: json.dumps(v).encode()),
                       st.lists(near_records, max_size=60).map(lambda v: json.dumps(v).encode()), st.binary(max_size=200))
    keys = st.sampled_from([None, 'KEY', 'nbp_12345678_wrong', '', 'KEY KEY'])
    seen = []

    @settings(max_examples=1000, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(body=bodies, k=keys, route=st.sampled_from(['predict', 'predict', 'explain']))
    def one(body, k, route):
        status, answer, _ = call(f'{url}/v1/models/bikeshare/{route}', body, key if k == 'KEY' else (f'{key} {key}' if k == 'KEY KEY' else k))
        seen.append(status)
        assert status < 500, (status, body[:200], answer)
        if status >= 400: assert isinstance(answer, dict) and answer.get('error'), answer

    one()
    assert len(seen) >= 1000 and sum(s >= 400 for s in seen) > 900, seen[:20]
    assert call(f'{url}/healthz')[0] == 200
    assert call(f'{url}/v1/models/bikeshare/predict', {'temp': 0.5, 'hr': 8}, key)[0] == 200


def test_generated_app_and_serve_build(served):
    "`nbprod apps` writes apps/serve.py (drift detected), `nbprod serve --build` writes the RayService's Serve config."
    import yaml
    from nbprod.apps import apps_drift
    p, *_ = served
    assert apps_drift(p.root) == ["apps/serve.py is missing (run nbprod apps)"]
    r = p.cli('apps')
    assert r.returncode == 0 and 'apps/serve.py' in r.stdout, r.stderr
    assert apps_drift(p.root) == [] and 'POST /v1/models/bikeshare/predict' in (p.root/'apps'/'serve.py').read_text()
    r = p.cli('serve', '--build', 'serve_config.yaml')
    assert r.returncode == 0, r.stdout + r.stderr
    [app] = yaml.safe_load((p.root/'serve_config.yaml').read_text())['applications']
    assert app['import_path'] == 'apps.serve:app' and app['runtime_env']['env_vars']['NBPROD_PROFILE'] == 'DEFAULT'
    deployments = {d['name']: d for d in app['deployments']}
    assert set(deployments) == {'nbprod', 'nbprod-explain'}, deployments          # the endpoint, and its explanations' own process
    assert deployments['nbprod']['max_queued_requests'] == 256
    assert deployments['nbprod']['backpressure_config'] == {'status_code': 503, 'retry_after_s': 1.0}   # overload: 503 + Retry-After
    assert deployments['nbprod-explain']['ray_actor_options']['num_cpus'] == 0


def test_keys_reach_the_running_replicas_without_a_restart(served):
    "A key created while serving is answered within a second or two; once revoked, 401; a key for a model not served is refused when made."
    from nbprod.auth import create_key, revoke_key
    from nbprod.errors import NbprodError
    p, url, key, *_ = served
    s = p.settings()
    _, fresh = create_key(s, 'made-while-serving', ['bikeshare'])
    ask = lambda k: call(f'{url}/v1/models/bikeshare/predict', {'temp': 0.5, 'hr': 8}, k)[0]
    deadline = time.time() + 10
    while ask(fresh) != 200: assert time.time() < deadline, "a new key was not accepted within 10 s"; time.sleep(0.2)
    revoke_key(s, 'made-while-serving')
    deadline = time.time() + 10
    while ask(fresh) != 401: assert time.time() < deadline, "a revoked key was still answered after 10 s"; time.sleep(0.2)
    assert ask(key) == 200
    with pytest.raises(NbprodError, match="no served model named 'taxi'"): create_key(s, 'typo', ['taxi'])



def test_a_rotated_key_works_at_once_and_its_old_secret_until_the_grace_ends(served):
    "nbprod keys rotate while serving: the new secret answers within seconds, the old one through its grace (6 s here), then 401."
    from nbprod.auth import create_key, rotate_key
    p, url, *_ = served
    s = p.settings()
    _, old = create_key(s, 'rotating', ['bikeshare'])
    ask = lambda k: call(f'{url}/v1/models/bikeshare/predict', {'temp': 0.5, 'hr': 8}, k)[0]
    deadline = time.time() + 10
    while ask(old) != 200: assert time.time() < deadline, "a new key was not accepted within 10 s"; time.sleep(0.2)
    _, new, _ = rotate_key(s, 'rotating', grace=6)
    deadline = time.time() + 10
    while ask(new) != 200: assert time.time() < deadline, "a rotated key's new secret was not accepted within 10 s"; time.sleep(0.2)
    assert ask(old) == 200                                   # within its grace
    deadline = time.time() + 20
    while ask(old) != 401: assert time.time() < deadline, "the old secret was still answered 14 s after its grace"; time.sleep(0.3)
    assert ask(new) == 200


def test_serve_refuses_to_start_without_keys(tmp_path):
    "No key and no open_access: every request would be 401, so nbprod serve refuses at once, saying how to make one, before Ray starts."
    root = tmp_path/'nokeys'
    root.mkdir()
    (root/'pyproject.toml').write_text('[project]\nname = "nokeys"\n\n[tool.nbprod]\n\n[tool.nbprod.serve.models.bikeshare]\n')
    (root/'settings.ini').write_text(f'[DEFAULT]\nserve_port = {free_port()}\n')
    p = Project(root)
    import mlflow, pandas as pd
    from sklearn.linear_model import LinearRegression
    from nbprod.serving import _mlflow
    from nbprod.store import experiment_id
    st, was = p.settings(), (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
    try:
        client = _mlflow(st)
        X = pd.DataFrame({'temp': [0.1, 0.5], 'hr': [1, 8]})
        with mlflow.start_run(experiment_id=experiment_id(st)), warnings.catch_warnings():
            warnings.simplefilter('ignore')
            mlflow.sklearn.log_model(LinearRegression().fit(X, X.temp), name='model', input_example=X, registered_model_name='bikeshare',
                                     serialization_format='cloudpickle')
        client.set_registered_model_alias('bikeshare', 'champion', '1')
    finally:                                     # the module's other tests go on with the served project's MLflow
        mlflow.set_tracking_uri(was[0]); mlflow.set_registry_uri(was[1])
    t0 = time.monotonic()
    r = p.cli('serve', timeout=120)
    said = ' '.join(r.stderr.split())
    assert r.returncode == 2 and 'no API keys: every request would be refused (401)' in said and 'nbprod keys create NAME' in said, r.stderr
    assert 'Ray' not in said and time.monotonic() - t0 < 60


def test_labels_cannot_be_poisoned_by_another_key(served):
    "The attack of issue 18: a second key relabels another client's predictions with 1e300 and strings, and sends made-up ids; all refused, the owner's label stands."
    from nbprod.auth import create_key
    from nbprod.feedback import read_labels
    p, url, key, *_ = served
    _, attacker = create_key(p.settings(), 'attacker', ['bikeshare'])
    time.sleep(1.5)                                                         # the replicas follow the key file within a second
    status, body, _ = call(f'{url}/v1/models/bikeshare/predict', {'temp': 0.5, 'hr': 8}, key, headers={'X-Request-ID': 'victim-1'})
    assert status == 200
    poison = [{'request_id': 'victim-1', 'label': 1e300}, {'request_id': 'victim-1', 'label': 'lots'}] + [{'request_id': f'fake-{i}', 'label': 1} for i in range(998)]
    status, answer, _ = call(f'{url}/v1/feedback', {'model': 'bikeshare', 'labels': poison}, attacker)
    assert status == 422 and 'none of the 1000 labels was stored' in answer['error'] and len(answer['errors']) == 50, answer
    status, answer, _ = call(f'{url}/v1/feedback', {'model': 'bikeshare', 'labels': [{'request_id': 'victim-1', 'label': 57.5}]}, key)
    assert status == 200 and answer['accepted'] == 1, answer
    status, answer, _ = call(f'{url}/v1/feedback', {'model': 'bikeshare', 'labels': [{'request_id': 'victim-1', 'label': 1e300}], 'replace': True}, key)
    assert status == 403 and 'labels scope' in answer['error'], answer
    labels = read_labels(p.settings().store, 'bikeshare')
    assert labels[labels.request_id == 'victim-1'].label.tolist() == [57.5] and not labels.request_id.str.startswith('fake-').any()


def test_request_ids_are_unique_and_headers_bounded(served):
    "One X-Request-ID twice: 409, one record in the audit log; a 12 KB X-Client-ID: 400, nothing written."
    from nbprod.audit import read_audit
    p, url, key, *_ = served
    ask = lambda **h: call(f'{url}/v1/models/bikeshare/predict', [{'temp': 0.5, 'hr': 8}] * 3, key, headers=h)
    assert ask(**{'X-Request-ID': 'once-only'})[0] == 200
    status, answer, _ = ask(**{'X-Request-ID': 'once-only'})
    assert status == 409 and answer['errors'][0]['field'] == 'X-Request-ID', answer
    status, answer, _ = ask(**{'X-Client-ID': 'c' * 12_000, 'X-Request-ID': 'big-client'})
    assert status == 400 and answer['errors'][0]['field'] == 'X-Client-ID', answer
    status, answer, _ = call(f'{url}/v1/models/bikeshare/predict', b'{"temp": 0.5, "hr": 8}', key, headers={'Content-Type': 'text/plain'})
    assert status == 415, answer
    df = read_audit(p.settings().store/'audit', 'bikeshare')
    assert (df.request_id == 'once-only').sum() == 3 and not (df.request_id == 'big-client').any()
