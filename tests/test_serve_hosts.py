"""`nbprod serve` with `open_access = true`, over real HTTP on 127.0.0.1: a page on another site that reaches the endpoint
through DNS rebinding (`Host: evil.example:PORT`, a matching `Origin`) is refused, and nothing of it is audited, while the
endpoint's own names and `serve_public_hosts` are answered; and `validate_ranges` (the setting, and a served model's own):
a number outside the training range is warned of, refused with 422, or let through, and the published schema agrees."""
import uuid

import pytest

from conftest import Project, call, free_port, wait_ready, stop_collect

FAR = {'temp': 0.5, 'hr': 30}          # training saw hr from 1 to 17
NEAR = {'temp': 0.5, 'hr': 8}


@pytest.fixture(scope='module')
def served(tmp_path_factory):
    "Open access; models `warned` (the setting's validate_ranges, warn), `strict` (refuse) and `lax` (off), one registered model with its training domain; `api.example.com` in serve_public_hosts."
    import mlflow, warnings
    import pandas as pd
    from sklearn.linear_model import LinearRegression
    from nbprod.serving import _mlflow
    from nbprod.store import experiment_id
    from nbprod.validation import domain_of
    p = Project(tmp_path_factory.mktemp('hosts'))
    (p.root/'pyproject.toml').write_text(
        '[project]\nname = "hosts"\n\n[tool.nbprod]\n\n'
        '[tool.nbprod.serve.models.warned]\nregistered_model = "bikeshare"\n\n'
        '[tool.nbprod.serve.models.strict]\nregistered_model = "bikeshare"\nvalidate_ranges = "refuse"\n\n'
        '[tool.nbprod.serve.models.lax]\nregistered_model = "bikeshare"\nvalidate_ranges = "off"\n')
    port = free_port()
    (p.root/'settings.ini').write_text(f'[DEFAULT]\nserve_port = {port}\nopen_access = true\nprofile_traffic = false\n'
                                       'serve_public_hosts = api.example.com\n')
    s = p.settings()
    assert (s.validate_ranges, s.open_access) == ('warn', True)
    client = _mlflow(s)
    X = pd.DataFrame({'temp': [0.1, 0.5, 0.9], 'hr': [1, 8, 17]})
    with mlflow.start_run(experiment_id=experiment_id(s)), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        mlflow.sklearn.log_model(LinearRegression().fit(X, X.temp * 100 + X.hr), name='model', input_example=X.head(2),
                                 registered_model_name='bikeshare', serialization_format='cloudpickle',
                                 metadata={'nbprod': {'domain': domain_of(X)}})   # what track.log_model keeps of the training data
    client.set_registered_model_alias('bikeshare', 'champion', '1')
    proc = p.popen('serve')
    url = f'http://127.0.0.1:{port}'
    try:
        wait_ready(proc, url)
        yield p, url, port
    finally:
        out, err = stop_collect(proc)             # Ctrl-C; a server that does not stop has its whole tree ended
    assert proc.returncode == 0, err[-3000:]


def _audit(p, model):
    from nbprod.audit import read_audit, verify_audit
    store = p.settings().store/'audit'
    assert all(c.status != 'problem' for c in verify_audit(store, model))
    return read_audit(store, model)


def _ids(p):
    return {r for m in ('warned', 'strict', 'lax') for r in _audit(p, m).request_id}


def test_a_rebound_page_is_refused_and_the_endpoints_names_answer(served):
    "The DNS-rebinding attack: Host evil.example:PORT with its Origin, under open access: 421 naming the Host and serve_public_hosts, on every route but /healthz; nothing audited. 127.0.0.1, localhost and serve_public_hosts answer."
    p, url, port = served
    evil = {'Host': f'evil.example:{port}', 'Origin': f'http://evil.example:{port}'}
    refused = []
    for route in ('predict', 'explain'):
        rid = f'rebound-{uuid.uuid4().hex[:8]}'
        status, body, headers = call(f'{url}/v1/models/warned/{route}', NEAR, headers={**evil, 'X-Request-ID': rid})
        assert status == 421, (route, status, body)
        assert f"Host 'evil.example:{port}'" in body['error'] and f'127.0.0.1:{port}' in body['error'], body
        assert 'serve_public_hosts' in body['hint'] and body['request_id'] == rid, body
        refused.append(rid)
    status, body, _ = call(f'{url}/v1/models/warned/predict', b'{"temp": 0.5, "hr": 8}',
                           headers={**evil, 'Content-Type': 'text/plain'})                        # the simple cross-site POST a page can send
    assert status == 421, (status, body)
    for path in ('/openapi.json', '/v1/models', '/readyz', '/metrics'):
        status, body, _ = call(f'{url}{path}', headers=evil)
        assert status == 421 and 'warned' not in str(body), (path, status, body)
    status, body, _ = call(f'{url}/v1/feedback', {'model': 'warned', 'labels': [{'request_id': refused[0], 'label': 1.0}]}, headers=evil)
    assert status == 421, body
    assert call(f'{url}/healthz', headers=evil)[0] == 200                                         # an orchestrator's probe: any Host
    answered = []
    for host in (f'127.0.0.1:{port}', f'localhost:{port}', 'api.example.com', f'api.example.com:{port}'):
        rid = f'named-{uuid.uuid4().hex[:8]}'
        status, body, _ = call(f'{url}/v1/models/warned/predict', NEAR, headers={'Host': host, 'Origin': f'http://{host}', 'X-Request-ID': rid})
        assert status == 200 and body['request_id'] == rid, (host, status, body)
        answered.append(rid)
    status, body, _ = call(f'{url}/v1/models/warned/predict', NEAR, headers={'Host': f'127.0.0.1:{port}', 'Origin': f'http://evil.example:{port}'})
    assert status == 403, body                                                                    # the right Host, another site's Origin
    status, body, _ = call(f'{url}/v1/models/warned/predict', b'{"temp": 0.5, "hr": 8}', headers={'Content-Type': 'text/plain'})
    assert status == 415, body                                                                    # JSON only, even with the right Host
    audited = _ids(p)
    assert set(answered) <= audited and not set(refused) & audited, (answered, refused)


def test_validate_ranges_warn_refuse_off(served):
    "hr = 30 (training: 1 to 17): warn answers 200 with a warning, flagged in the audit record; refuse answers 422 naming field, value and range, audits nothing; off answers 200 without a warning. The published schema carries the range only where it is refused."
    p, url, _ = served
    rids = {m: f'{m}-{uuid.uuid4().hex[:8]}' for m in ('warned', 'strict', 'lax')}
    status, body, _ = call(f'{url}/v1/models/warned/predict', FAR, headers={'X-Request-ID': rids['warned']})
    assert status == 200 and body['warnings'] == [{'record': None, 'field': 'hr', 'reason': '30 is outside the training range [1.0, 17.0]'}], body
    status, body, _ = call(f'{url}/v1/models/strict/predict', FAR, headers={'X-Request-ID': rids['strict']})
    assert status == 422 and body['error'] == "invalid input: field 'hr': 30 is outside the training range [1.0, 17.0]", body
    assert body['errors'] == [{'record': None, 'field': 'hr', 'reason': '30 is outside the training range [1.0, 17.0]'}], body
    status, body, _ = call(f'{url}/v1/models/strict/predict', [NEAR, FAR])                       # in a batch: the record named
    assert status == 422 and body['errors'][0]['record'] == 1, body
    status, body, _ = call(f'{url}/v1/models/lax/predict', FAR, headers={'X-Request-ID': rids['lax']})
    assert status == 200 and 'warnings' not in body, body
    assert call(f'{url}/v1/models/strict/predict', NEAR)[0] == 200                               # inside the range: answered
    warned = _audit(p, 'warned').set_index('request_id')
    assert warned.loc[rids['warned'], 'warnings'] == [{'field': 'hr', 'reason': '30 is outside the training range [1.0, 17.0]'}], warned.loc[rids['warned']]
    lax = _audit(p, 'lax').set_index('request_id')
    assert 'warnings' not in lax.columns or not isinstance(lax.loc[rids['lax'], 'warnings'], list), lax.loc[rids['lax']]
    assert rids['strict'] not in set(_audit(p, 'strict').request_id)
    status, spec, _ = call(f'{url}/openapi.json')                                                 # open access: every model's schema
    assert status == 200, spec
    hr = {m: spec['paths'][f'/v1/models/{m}/predict']['post']['requestBody']['content']['application/json']['schema']['oneOf'][0]['properties']['hr']
          for m in ('warned', 'strict', 'lax')}
    assert (hr['strict']['minimum'], hr['strict']['maximum']) == (1.0, 17.0), hr
    assert hr['warned']['maximum'] == hr['lax']['maximum'] == 2**63 - 1, hr                      # a long's own bounds: 30 is allowed
