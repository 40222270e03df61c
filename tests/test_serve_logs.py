"""A failed request's values stay out of the endpoint's log: over real HTTP (uvicorn in this process, the app `nbprod serve` runs),
the log of a request that a model, a `preprocess` or a bug failed holds its request id and the type of the error, and none of
the values it sent unless `log_failed_inputs = true`; a personal (pii) field's value never."""
import io, json, logging, socket, threading, time

import httpx
import pytest

from nbprod.api import INLINE_BODY_BYTES, Endpoint, ServedModel, Variant, build_app
from nbprod.auth import KeyRing
from nbprod.secrets import WITHHELD
from nbprod.validation import InputField, RequestValidator

EMAIL, TEMP = 'jane.roe@example.com', '41.987654321'      # a personal value, and one that is not


class Quoting:
    "A model that fails quoting the first record, as many do (pandas, scikit-learn)."
    def predict(self, X): raise ValueError(f"bad {X.iloc[0].to_dict()}")


def refuse(df):
    "A `preprocess` that refuses a record quoting it: the client's 422."
    raise ValueError(f"refused {df.iloc[0].to_dict()}")


def buggy(df):
    "A `preprocess` with a bug whose message quotes the record: a 500."
    raise TypeError(f"cannot scale {df.email[0]} at {df.temp[0]}")


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(params=[False, True], ids=['default', 'log_failed_inputs'])
def served(request):
    "`(base URL, captured text of the 'nbprod.api' log, log_failed_inputs)` of a uvicorn server on 127.0.0.1 serving the app."
    import uvicorn
    validator = RequestValidator('people', [InputField('email', 'string'), InputField('temp', 'double')], max_records=1000, max_bytes=1_000_000)
    model = lambda name, **kw: ServedModel(name, validator, [Variant('champion', '1', Quoting())], pii=('email',), **kw)
    endpoint = Endpoint({'model': model('model'), 'refusing': model('refusing', preprocess=refuse), 'buggy': model('buggy', preprocess=buggy)},
                        KeyRing(open_access=True))
    app = build_app(endpoint, log_failed_inputs=request.param)
    caught = io.StringIO()
    handler = logging.StreamHandler(caught)
    handler.setFormatter(logging.Formatter('%(levelname)s %(name)s %(message)s'))
    logger = logging.getLogger('nbprod.api')
    logger.addHandler(handler)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host='127.0.0.1', port=port, log_level='warning', lifespan='off'))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started: break
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    try: yield f"http://127.0.0.1:{port}", caught, request.param
    finally:
        server.should_exit = True
        thread.join(10)
        logger.removeHandler(handler)
        build_app(endpoint)                    # the filter back to the default for the rest of the session


def _post(url, model, body, rid):
    return httpx.post(f"{url}/v1/models/{model}/predict", content=json.dumps(body), timeout=30,
                      headers={'Content-Type': 'application/json', 'X-Request-ID': rid})


def _logged(caught, rid):
    "What the log says after `request <rid> failed` (the line and its traceback), or '' when it has no such line."
    text = caught.getvalue()
    at = text.find(f"request {rid} failed")
    return text[at:] if at >= 0 else ''


@pytest.mark.parametrize('model,error', [('model', 'ValueError'), ('buggy', 'TypeError')])
@pytest.mark.parametrize('size', ['small', 'big'])
def test_a_failed_prediction_logs_no_values(served, model, error, size):
    url, caught, keep = served
    record = {'email': EMAIL, 'temp': float(TEMP)}
    body = record if size == 'small' else [record] * 400      # a big body is checked in a thread: the pii is noted all the same
    assert size == 'small' or len(json.dumps(body)) > INLINE_BODY_BYTES
    rid = f"{model}-{size}-{keep}"
    r = _post(url, model, body, rid)
    assert (r.status_code, r.json()) == (500, {'request_id': rid, 'error': f"internal error: {error}"})
    text = _logged(caught, rid)
    assert text and f"{error}:" in text and 'Traceback' in text, caught.getvalue()
    assert EMAIL not in caught.getvalue()                        # never, with or without log_failed_inputs
    if keep: assert TEMP in text and '***' in text, text         # the message, the personal value replaced
    else: assert TEMP not in caught.getvalue() and WITHHELD in text, text


def test_a_refused_record_is_answered_not_logged(served):
    url, caught, keep = served
    r = _post(url, 'refusing', {'email': EMAIL, 'temp': float(TEMP)}, f"refused-{keep}")
    assert r.status_code == 422 and EMAIL in r.json()['error']   # the client is told what it sent, and why it is refused
    r = _post(url, 'model', {'email': 'x@example.com', 'temp': 1.0}, f"after-{keep}")   # a failure after it: the log is written
    assert r.status_code == 500 and _logged(caught, f"after-{keep}")
    assert f"refused-{keep}" not in caught.getvalue() and EMAIL not in caught.getvalue() and TEMP not in caught.getvalue()
