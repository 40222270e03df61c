"""Secret parameters reach the kernel through its environment and never land in anything stored or printed."""
import base64, html, json, re
from urllib.parse import quote, quote_plus

TOKEN = 'tok-5f3a9c1e-very-secret'
PASSWORD = 'pw-Zx81-also-secret'


def every_stored_byte(project):
    "The bytes of everything the run left on disk: the store (SQLite database, artifacts) and the project folder."
    for p in sorted(project.root.rglob('*')):
        if p.is_file() and '.git' not in p.parts:
            yield p, p.read_bytes()


def test_secrets_never_stored_or_printed(project):
    (project.root/'pyproject.toml').write_text(
        '[project]\nname = "proj"\n\n[tool.nbprod]\nexperiment = "proj"\n\n[tool.nbprod.secrets]\napi_token = "PROJ_API_TOKEN"\n')
    (project.root/'settings.ini').write_text('[DEFAULT]\nsecrets = db_password=PROJ_DB_PASSWORD\n')
    project.notebook('secret', "api_token = ''\ndb_password = ''\nrows = 10",
                     "print('token:', api_token)\nprint('password:', db_password)\nassert len(api_token) > 10",
                     "import os\nfrom nbprod import track\ntrack.log_param('connection', f'db://u:{db_password}@h')\n"
                     "track.log_metric('rows', rows)",
                     "raise RuntimeError(f'cannot connect with {api_token}')")
    r = project.cli('run', 'nbs/secret.ipynb', '-p', 'rows=5', '-p', f'db_password={PASSWORD}',
                    env=project.env(PROJ_API_TOKEN=TOKEN))
    assert r.returncode == 1  # the last cell fails on purpose: the error message holds the secret too
    [run] = project.runs()
    assert run.data.params == {'rows': '5', 'api_token': '***', 'db_password': '***', 'connection': 'db://u:***@h'}
    assert run.data.tags['nbprod.secrets'] == 'api_token,db_password'
    assert 'cannot connect with ***' in run.data.tags['nbprod.error.evalue']
    out = re.search(r'output notebook: (\S+)', r.stderr).group(1)
    text = open(out).read()
    assert 'token: ***' in text and 'password: ***' in text
    assert "environ['PROJ_API_TOKEN']" in text  # the stored notebook names the variable, not the value
    checked = 0
    for path, data in every_stored_byte(project):
        assert TOKEN.encode() not in data and PASSWORD.encode() not in data, f"secret leaked into {path}"
        checked += 1
    assert checked >= 4  # mlflow.db, the .ipynb, the .html, the kernel log at least
    assert TOKEN not in r.stdout + r.stderr and PASSWORD not in r.stdout + r.stderr


def test_missing_secret_keeps_the_default(project):
    (project.root/'settings.ini').write_text('[DEFAULT]\nsecrets = api_token=UNSET_TOKEN_VAR\n')
    project.notebook('s', "api_token = 'none'", "print(api_token)")
    r = project.cli('run', 'nbs/s.ipynb')
    assert r.returncode == 0, r.stderr
    [run] = project.runs()
    assert 'nbprod.secrets' not in run.data.tags and run.data.params == {}


# A secret of 26 characters whose base64 holds '+' and '/' (so its URL-safe base64 differs) and that URL- and
# HTML-encoding change: every form below is a different string.
LONG = 'Tok?5f3a>9c1E~Very Secret!'


def forms_of(secret, user='alice'):
    "Each form a notebook may print or log the secret in, computed here independently of nbprod's own list."
    b = secret.encode()
    std, url = base64.b64encode(b).decode(), base64.urlsafe_b64encode(b).decode()
    return {'raw': secret, 'upper': secret.upper(), 'lower': secret.lower(), 'b64': std, 'b64url': url,
            'b64nopad': std.rstrip('='), 'b64urlnopad': url.rstrip('='), 'quote': quote(secret, safe=''),
            'quote_plus': quote_plus(secret), 'html': html.escape(secret), 'hex': b.hex(), 'HEX': b.hex().upper(),
            'basic': base64.b64encode(f'{user}:{secret}'.encode()).decode()}


FORMS_NOTEBOOK = [
    # every form, printed (the output notebook, its HTML) and written to stderr (the kernel's log)
    "import base64, html, json, os, sys\nfrom urllib.parse import quote, quote_plus\n"
    "b = api_token.encode()\nstd, url = base64.b64encode(b).decode(), base64.urlsafe_b64encode(b).decode()\n"
    "forms = {'raw': api_token, 'upper': api_token.upper(), 'lower': api_token.lower(), 'b64': std, 'b64url': url,\n"
    "         'b64nopad': std.rstrip('='), 'b64urlnopad': url.rstrip('='), 'quote': quote(api_token, safe=''),\n"
    "         'quote_plus': quote_plus(api_token), 'html': html.escape(api_token), 'hex': b.hex(), 'HEX': b.hex().upper(),\n"
    "         'basic': base64.b64encode(f'alice:{api_token}'.encode()).decode()}\n"
    "for k, v in forms.items(): print(k, v); print(k, v, file=sys.stderr)\n"
    "from IPython.display import HTML, display\ndisplay(HTML('<b>' + forms['html'] + '</b>'))",
    # MLflow's fluent API, in a run of its own
    "import mlflow\nfrom nbprod import track\nclient, rid = track.current_run()\n"
    "with mlflow.start_run(run_name='direct ' + forms['quote'], description='see ' + forms['basic']) as fluent:\n"
    "    for k, v in forms.items(): mlflow.log_param(f'fluent_{k}', v)\n"
    "    mlflow.log_params({f'params_{k}': v for k, v in forms.items()})\n"
    "    for k, v in forms.items(): mlflow.set_tag(f'tag_{k}', v)\n"
    "    mlflow.set_tags({f'tags_{k}': v for k, v in forms.items()})\n"
    "    mlflow.log_text('\\n'.join(forms.values()), 'fluent/forms.txt')\n"
    "    mlflow.log_dict(forms, 'fluent/forms.json')\n"
    "print('fluent run', fluent.info.run_id)",
    # MlflowClient on nbprod's own run, track, and a line appended to nbprod's tracking file by hand
    "from mlflow.entities import Param, RunTag\n"
    "for k, v in forms.items():\n"
    "    client.log_param(rid, f'client_{k}', v)\n    client.set_tag(rid, f'client_{k}', v)\n"
    "    track.log_param(f'track_{k}', v)\n"
    "client.log_batch(rid, params=[Param(f'batch_{k}', v) for k, v in forms.items()], tags=[RunTag(f'batch_{k}', v) for k, v in forms.items()])\n"
    "client.log_text(rid, '\\n'.join(forms.values()), 'client/forms.txt')\n"
    "client.log_dict(rid, forms, 'client/forms.json')\n"
    "with open('forms.txt', 'w') as f: f.write('\\n'.join(forms.values()))\n"
    "client.log_artifact(rid, 'forms.txt', 'client')\n"
    "with open(os.environ['NBPROD_LOG_FILE'], 'a') as f: f.write(json.dumps({'param': 'by_hand', 'value': forms['basic']}) + '\\n')",
    # a binary file that holds the secret is refused, with a message
    "with open('model.bin', 'wb') as f: f.write(b'\\x00\\xff' + api_token.encode() + b'\\x00')\n"
    "try: client.log_artifact(rid, 'model.bin')\nexcept Exception as e: print('refused:', type(e).__name__, e)\n"
    "os.remove('model.bin'); os.remove('forms.txt')",
    "raise ValueError('cannot connect with ' + forms['quote_plus'] + ' or ' + forms['upper'])",
]


def test_every_form_of_a_secret_is_scrubbed_from_mlflow_writes(project):
    forms = forms_of(LONG)
    assert len(set(forms.values())) == len(forms)   # the secret was chosen so: each form is its own check
    (project.root/'settings.ini').write_text('[DEFAULT]\nsecrets = api_token=PROJ_API_TOKEN\n')
    project.notebook('forms', "api_token = ''", *FORMS_NOTEBOOK)
    r = project.cli('run', 'nbs/forms.ipynb', env=project.env(PROJ_API_TOKEN=LONG))
    assert r.returncode == 1, r.stderr   # the last cell fails on purpose, quoting two forms
    runs = {x.data.tags.get('nbprod.kind', 'fluent'): x for x in project.runs()}
    assert len(runs) == 2, runs.keys()
    fluent = runs.pop('fluent')
    [ours] = runs.values()
    # every value written through each call arrived, as ***
    for k in forms:
        for name in (f'client_{k}', f'batch_{k}', f'track_{k}'): assert ours.data.params[name] == '***', (name, ours.data.params[name])
        for name in (f'client_{k}', f'batch_{k}'): assert ours.data.tags[name] == '***', (name, ours.data.tags[name])
        for name in (f'fluent_{k}', f'params_{k}'): assert fluent.data.params[name] == '***', (name, fluent.data.params[name])
        for name in (f'tag_{k}', f'tags_{k}'): assert fluent.data.tags[name] == '***', (name, fluent.data.tags[name])
    assert ours.data.params['by_hand'] == '***'
    assert fluent.info.run_name == 'direct ***' and fluent.data.tags['mlflow.note.content'] == 'see ***'
    assert "cannot connect with *** or ***" in ours.data.tags['nbprod.error.evalue']
    client = project.client()
    for run, folder in ((ours, 'client'), (fluent, 'fluent')):
        got = {a.path for a in client.list_artifacts(run.info.run_id, folder)}
        assert got == {f'{folder}/forms.txt', f'{folder}/forms.json'}, got
        text = open(client.download_artifacts(run.info.run_id, f'{folder}/forms.txt')).read()
        assert text.splitlines() == ['***'] * len(forms), text
        assert json.load(open(client.download_artifacts(run.info.run_id, f'{folder}/forms.json'))) == {k: '***' for k in forms}
    out = re.search(r'output notebook: (\S+)', r.stderr).group(1)
    text = open(out).read()
    assert 'refused: TrackingError' in text and 'holds a secret' in text   # the binary file, refused with a message
    assert text.count('<b>***</b>') == 1 and 'raw ***' in text and 'basic ***' in text
    assert 'model.bin' not in {a.path for a in client.list_artifacts(ours.info.run_id)}
    # nothing the run left on disk holds any form: the store (database, artifacts, notebooks, HTML, kernel log), the project
    checked = 0
    for path, data in every_stored_byte(project):
        for k, v in forms.items(): assert v.encode() not in data, f"the {k} form of the secret leaked into {path}"
        checked += 1
    assert checked >= 8
    for k, v in forms.items(): assert v not in r.stdout + r.stderr, k
