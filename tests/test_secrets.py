"""Secret parameters reach the kernel through its environment and never land in anything stored or printed."""
import re

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
