"""Settings through the CLI: profiles, NBPROD_<KEY> overrides, and one clear error for each bad input."""
import time

import pytest


def test_profile_and_env_override_choose_where_runs_go(project):
    (project.root/'settings.ini').write_text('[DEFAULT]\n\n[staging]\nstore = .staging-store\nexperiment = proj-staging\n')
    project.notebook('n', "x = 1", "y = x")
    assert project.cli('run', 'nbs/n.ipynb', '--profile', 'staging').returncode == 0
    assert project.cli('run', 'nbs/n.ipynb', env=project.env(NBPROD_PROFILE='staging')).returncode == 0
    staged = project.runs('staging')
    assert len(staged) == 2 and {r.data.tags['nbprod.profile'] for r in staged} == {'staging'}
    assert (project.root/'.staging-store'/'mlflow.db').exists() and not (project.root/'.nbprod').exists()
    r = project.cli('run', 'nbs/n.ipynb', env=project.env(NBPROD_EXPERIMENT='other'))
    assert r.returncode == 0
    exp = project.client().get_experiment_by_name('other')
    assert len(project.client().search_runs([exp.experiment_id])) == 1


@pytest.mark.parametrize('ini,env,args,expected', [
    ('[DEFAULT]\ncell_timout = 3\n', {}, [], ["unknown key", "section 'DEFAULT'", "key 'cell_timout'", "allowed: store, "]),
    ('[DEFAULT]\ncell_timeout = soon\n', {}, [], ["bad value for cell_timeout", "value 'soon'", "an integer >= 0"]),
    ('[DEFAULT]\n\n[staging]\nrender_html = maybe\n', {}, ['--profile', 'staging'],
     ["section 'staging'", "key 'render_html'", "value 'maybe'", "allowed: true or false"]),
    ('[DEFAULT]\n', {}, ['--profile', 'prod'], ["no profile 'prod'", "allowed: DEFAULT", "add a [prod] section"]),
    ('[DEFAULT]\n', {'NBPROD_PROFILE': 'prod'}, [], ["no profile 'prod'"]),
    ('[DEFAULT]\n', {'NBPROD_LOG_LEVEL': 'LOUD'}, [], ["environment variable NBPROD_LOG_LEVEL", "value 'LOUD'", "DEBUG, INFO"]),
    ('[DEFAULT]\nray_address = not an address\n', {}, [], ["key 'ray_address'", "host:port"]),
    ('[DEFAULT\n', {}, [], ["settings.ini cannot be parsed"]),
])
def test_bad_settings_give_one_clear_error_and_record_nothing(project, ini, env, args, expected):
    (project.root/'settings.ini').write_text(ini)
    project.notebook('n', "x = 1", "open('ran', 'w').write('yes')")
    r = project.cli('run', 'nbs/n.ipynb', *args, env=project.env(**env))
    assert r.returncode == 2, r.stdout + r.stderr
    err = ' '.join(r.stderr.split())
    assert 'settings.ini' in err or 'environment variable' in err
    for e in expected: assert e in err, err
    assert 'Traceback' not in r.stderr
    assert not (project.root/'.nbprod').exists() and not (project.root/'nbs'/'ran').exists()


def test_bad_project_table_is_refused(project):
    (project.root/'pyproject.toml').write_text('[project]\nname = "proj"\n\n[tool.nbprod]\nexperiments = "x"\n')
    project.notebook('n', "x = 1", "y = x")
    r = project.cli('run', 'nbs/n.ipynb')
    assert r.returncode == 2 and "section 'tool.nbprod', key 'experiments'" in r.stderr and 'allowed: experiment, secrets' in r.stderr


def test_outside_a_project(tmp_path):
    import subprocess
    from conftest import NBPROD
    r = subprocess.run([NBPROD, 'runs'], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 2 and 'no nbprod project' in r.stderr and 'nbprod new' in r.stderr


def test_unreachable_tracking_server_stops_the_run_with_a_clear_error(project):
    (project.root/'settings.ini').write_text('[DEFAULT]\ntracking_uri = http://127.0.0.1:9\nartifact_root = file:///tmp/unused\n')
    project.notebook('n', "x = 1", "import time; time.sleep(2)", "from nbprod import track\ntrack.log_metric('a', 1)",
                     "open('finished', 'w').write('yes')")
    t0 = time.time()
    r = project.cli('run', 'nbs/n.ipynb', env=project.env(MLFLOW_HTTP_REQUEST_MAX_RETRIES='0', MLFLOW_HTTP_REQUEST_TIMEOUT='3'))
    assert time.time() - t0 < 120  # the kernel's track call is told at once, not after its 300 s wait
    assert r.returncode == 2, r.stdout + r.stderr
    assert 'the run could not be recorded in http://127.0.0.1:9' in r.stderr and 'check tracking_uri' in r.stderr
    assert 'Traceback' not in r.stderr
    assert not (project.root/'nbs'/'finished').exists()  # the notebook was stopped, not run untracked to the end
