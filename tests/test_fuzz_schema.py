"""A schema-driven fuzzer against a real `nbprod serve`: schemathesis reads the endpoint's published `/openapi.json` and sends
what it allows (positive) and what it forbids (negative) to every operation, with a fixed seed and a bounded number of
examples. Nothing is answered 5xx, every answer fits the published schema, a request the schema allows is answered, one it
forbids is refused with 4xx, the server is healthy after, and every request answered 200 is in the audit log exactly once
with a chain that verifies."""
import json, subprocess, sys, textwrap, threading, time, warnings
from collections import Counter

import pytest

from conftest import Project, call, free_port, stop_server, wait_ready

# The model a new user would bring: text categories (weathersit), integer categories (season), a flag and two numbers,
# through a scikit-learn pipeline with a one-hot encoder; logged by nbprod's own log_model, which records what training saw
LOG = textwrap.dedent('''
    import numpy as np, pandas as pd
    from sklearn.compose import make_column_transformer
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder
    from nbprod import track
    rng = np.random.default_rng(0)
    n = 400
    X = pd.DataFrame({'weathersit': rng.choice(['clear', 'mist', 'light rain', 'heavy rain'], n),
                      'season': pd.Categorical(rng.integers(1, 5, n)), 'holiday': rng.random(n) < 0.05,
                      'temp': rng.uniform(0.05, 0.95, n), 'hr': rng.integers(0, 24, n)})
    y = 100 * X.temp + X.hr + (X.weathersit == 'clear') * 20 - X.holiday * 30
    model = make_pipeline(make_column_transformer((OneHotEncoder(handle_unknown='error'), ['weathersit', 'season']),
                                                  remainder='passthrough'), Ridge(alpha=1.0)).fit(X, y)
    track.log_model(model, X_example=X, registered_name='rentals', alias='champion')
    track.end()
''')

SEED = 20261208


@pytest.fixture(scope='module')
def served(tmp_path_factory):
    "A project serving `rentals` (the pipeline above) with a key that may predict and label, for the whole module."
    from nbprod.auth import create_key
    root = tmp_path_factory.mktemp('fuzz')/'proj'
    root.mkdir()
    p = Project(root)
    (root/'pyproject.toml').write_text('[project]\nname = "fuzz"\n\n[tool.nbprod]\n\n[tool.nbprod.serve.models.rentals]\n')
    port = free_port()
    (root/'settings.ini').write_text(f'[DEFAULT]\nserve_port = {port}\nmax_records = 20\n')
    subprocess.run(['git', 'init', '-q', '-b', 'main'], cwd=root, check=True)
    r = subprocess.run([sys.executable, '-c', LOG], cwd=root, capture_output=True, text=True, env=p.env(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    _, key = create_key(p.settings(), 'fuzzer', ['rentals'], scopes=['predict', 'labels'])
    proc = p.popen('serve')
    out, err = [], []
    readers = [threading.Thread(target=lambda f=f, into=into: into.extend(f), daemon=True) for f, into in ((proc.stdout, out), (proc.stderr, err))]
    for t in readers: t.start()
    url = f'http://127.0.0.1:{port}'
    try:
        try: wait_ready(proc, url)
        except AssertionError as e: raise AssertionError(f"{e}\n{''.join(err)[-3000:]}") from None
        yield p, url, key
    finally:
        stopped = stop_server(proc)
        for t in readers: t.join(10)
    assert stopped and proc.returncode == 0, ''.join(err)[-3000:]
    assert 'Traceback' not in ''.join(err), ''.join(err)[-5000:]   # nothing the fuzzer sent crashed a handler


def _schema(url, key):
    import schemathesis
    from schemathesis.config import SchemathesisConfig
    status, published, _ = call(f'{url}/openapi.json', key=key)
    assert status == 200 and published['paths'], published
    config = SchemathesisConfig()
    schema = schemathesis.openapi.from_dict(published, config=config)
    schema.config.base_url = url
    return published, schema


def test_the_published_schema_names_the_categories(served):
    "The request schema carries what training saw: each category field as an enum of exactly those values."
    p, url, key = served
    published, _ = _schema(url, key)
    body = published['paths']['/v1/models/rentals/predict']['post']['requestBody']['content']['application/json']['schema']
    record = body['oneOf'][0]
    record = published['components']['schemas'][record['$ref'].rsplit('/', 1)[1]] if '$ref' in record else record
    props = record['properties']
    enum = lambda f: next(a['enum'] for a in [props[f], *props[f].get('anyOf', [])] if 'enum' in a)
    assert sorted(enum('weathersit')) == ['clear', 'heavy rain', 'light rain', 'mist'], props['weathersit']
    assert sorted(enum('season')) == [1, 2, 3, 4], props['season']
    assert record.get('additionalProperties') is False, record


def _fuzz(schema, url, key, mode, examples, checks, answered, statuses):
    "Send `examples` cases of each operation in `mode` (positive or negative), fixed seed; each answer goes through `checks`."
    from hypothesis import HealthCheck, given, seed, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    failures = []
    for result in schema.get_all_operations():
        op = result.ok()
        path = op.path

        @seed(SEED)
        @settings(max_examples=examples, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck),
                  phases=['generate'])
        @given(case=op.as_strategy(generation_mode=mode))
        def one(case):
            headers = {'Authorization': f'Bearer {key}'}
            response = case.call(base_url=url, headers=headers, timeout=60)
            statuses[(path, mode.value)][response.status_code] += 1
            if response.status_code == 200 and path.endswith(('/predict', '/explain')):
                body = response.json()
                answered[body['request_id']] = len(body.get('predictions', body.get('explanations', [None])))
            try: case.validate_response(response, checks=checks(path), headers=headers)
            except (Exception, BaseExceptionGroup) as e:   # one failure does not stop the others: all are reported together
                kind = next((line.strip('- ') for line in str(e).splitlines() if line.startswith('- ')), type(e).__name__)
                failures.append((f"{mode.value} {op.method.upper()} {path} -> {response.status_code}: {kind}",
                                 f"{response.text[:300]}\n    sent: {json.dumps(case.body, default=str)[:300]}"))

        try: one()
        except Unsatisfiable:                        # nothing to negate: an operation with no body and no parameters
            assert mode == GenerationMode.NEGATIVE and not op.body and not list(op.iter_parameters()), (mode, path)
    return failures


def test_schemathesis_from_the_live_openapi(served):
    """Positive and negative cases of every published operation: zero 5xx, every answer fits the schema (status, content type,
    body), what the schema allows for a prediction is answered 200, what it forbids is refused 4xx; the server is healthy
    after; every request answered 200 is in the audit log exactly once, and the log verifies."""
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (content_type_conformance, negative_data_rejection, positive_data_acceptance,
                                                   response_schema_conformance)
    from nbprod.audit import read_audit, verify_audit
    p, url, key = served
    _, schema = _schema(url, key)
    answered, statuses = {}, {}
    statuses = type('Tally', (dict,), {'__missing__': lambda self, k: self.setdefault(k, Counter())})()
    base = [not_a_server_error, response_schema_conformance, content_type_conformance]
    predicts = lambda path: path.startswith('/v1/models/')
    t0 = time.monotonic()
    failures = _fuzz(schema, url, key, GenerationMode.POSITIVE, 120, lambda path: base + ([positive_data_acceptance] if predicts(path) else []),
                     answered, statuses)
    failures += _fuzz(schema, url, key, GenerationMode.NEGATIVE, 120, lambda path: base + ([negative_data_rejection] if predicts(path) else []),
                      answered, statuses)
    took = time.monotonic() - t0
    sent = sum(sum(c.values()) for c in statuses.values())
    tally = {f'{path} {mode}': dict(c) for (path, mode), c in sorted(statuses.items())}
    kinds = Counter(kind for kind, _ in failures)
    example = dict(failures[::-1])                  # one example of each kind
    assert not failures, (f"{len(failures)} failures in {sent} requests ({took:.0f} s):\n" +
                          '\n'.join(f"{n} x {kind}\n    answer: {example[kind]}" for kind, n in kinds.most_common()) + f"\n{json.dumps(tally)}")
    assert sent >= 500 and not any(code >= 500 for c in statuses.values() for code in c), tally
    # the fuzzer reached the model: positive predictions were answered, negative ones refused
    assert statuses[('/v1/models/rentals/predict', 'positive')][200] >= 50, tally
    assert statuses[('/v1/models/rentals/predict', 'negative')][422] + statuses[('/v1/models/rentals/predict', 'negative')][400] >= 50, tally
    assert call(f'{url}/healthz')[0] == 200
    status, body, _ = call(f'{url}/v1/models/rentals/predict', {'weathersit': 'clear', 'season': 2, 'holiday': False, 'temp': 0.5, 'hr': 8}, key)
    assert status == 200, body
    answered[body['request_id']] = 1
    # every answered request in the audit log exactly once (one record per answered record), and the chain verifies
    with warnings.catch_warnings():
        warnings.simplefilter('error')              # no torn or unreadable line either
        df = read_audit(p.settings().store/'audit', 'rentals')
    df = df[df.variant.notna()]                     # predictions (labels are records too)
    counts = df.groupby('request_id')['index'].agg(['count', 'nunique'])
    missing = set(answered) - set(counts.index)
    assert not missing, f"{len(missing)} answered requests are not in the audit log, e.g. {sorted(missing)[:3]}"
    wrong = {rid: (int(counts.loc[rid, 'count']), n) for rid, n in answered.items() if (counts.loc[rid, 'count'], counts.loc[rid, 'nunique']) != (n, n)}
    assert not wrong, f"requests whose records are not in the log exactly once (found, expected): {dict(list(wrong.items())[:5])}"
    assert not set(counts.index) - set(answered), "records of requests that were never answered 200"
    checks = verify_audit(p.settings().store/'audit', 'rentals')
    assert checks and all(c.status == 'ok' for c in checks), checks
