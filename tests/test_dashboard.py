"""The dashboard's pages in Streamlit's AppTest on a filled store (tests/dashboard_store.py), the approval button behind a
login, and `nbprod dashboard` itself: refused when opened without a login, started, answering, stopped by SIGTERM.
The bike-share example's tests show the pages on a store filled by the real pipeline and replay, and in a real browser."""
import os, signal, subprocess, sys, time, urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from dashboard_store import fill  # noqa: E402
from nbprod.dashboard_server import wait_ready  # noqa: E402

ENTRY = Path(__file__).resolve().parents[1]/'apps'/'dashboard'/'app.py'


@pytest.fixture(scope='module')
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp('toyshop')
    return fill(root, runs=30, versions=4, windows=12)


@pytest.fixture
def app(store, monkeypatch):
    from streamlit.testing.v1 import AppTest
    from nbprod import dashboard
    for k in list(os.environ):
        if k.startswith('NBPROD_'): monkeypatch.delenv(k)
    monkeypatch.setenv('NBPROD_PROJECT', str(store.root))
    dashboard._settings.clear()
    import streamlit as st
    st.cache_data.clear()
    yield lambda: AppTest.from_file(str(ENTRY), default_timeout=60)
    dashboard._settings.clear()


def kinds(at) -> dict:
    "How many elements of each type the page shows."
    acc = {}
    def walk(node):
        t = getattr(node, 'type', None)
        if t: acc[t] = acc.get(t, 0) + 1
        kids = getattr(node, 'children', None)
        for c in (kids.values() if isinstance(kids, dict) else []): walk(c)
    walk(at._tree)
    return acc


def texts(at) -> str:
    return ' '.join(str(getattr(x, 'value', '')) for kind in ('title', 'header', 'subheader', 'markdown', 'caption', 'info', 'warning', 'error', 'success')
                    for x in getattr(at, kind))


def test_every_page_on_a_filled_store(app, store):
    at = app().run()
    assert not at.exception, at.exception
    m = {x.label: x.value for x in at.metric}
    assert m['models served'] == '1' and m['awaiting approval'] == '1' and m['alerts (24 h)'] == '2', m   # recorded just now
    assert 'toyshop' in texts(at)
    served = at.dataframe[0].value
    assert served.model.tolist() == ['bikes'] and served.champion.tolist() == ['3'] and served.challenger.tolist() == ['4']
    assert kinds(at).get('vega_lite_chart') == 1                       # runs per day

    at.switch_page('runs.py').run()
    assert not at.exception, at.exception
    table = at.dataframe[0].value
    assert len(table) == 30 and {'kind', 'status', 'params.lr', 'metrics.val_mae'} <= set(table.columns)
    pipe = table[table.kind == 'pipeline'].iloc[0]
    at.selectbox(key='pick_run').set_value(pipe.run_id).run()
    assert kinds(at).get('graphviz_chart') == 1                        # the pipeline's DAG
    assert [d.value for d in at.dataframe if 'step' in d.value.columns][0].step.tolist() in (['fit', 'prep'], ['prep', 'fit'])
    failed = table[(table.kind == 'step') & (table.status == 'FAILED')].iloc[0]
    at.multiselect(key='f_status').set_value(['FAILED']).run()
    assert set(at.dataframe[0].value.status) == {'FAILED'}
    at.selectbox(key='pick_run').set_value(failed.run_id).run()
    assert 'the validation set is empty' in at.error[0].value
    at.multiselect(key='f_status').set_value([]).run()
    at.text_input(key='f_text').set_value('lr=0.2').run()
    assert set(at.dataframe[0].value['params.lr']) == {'0.2'}

    at.switch_page('models.py').run()
    assert not at.exception, at.exception
    versions = at.dataframe[0].value
    assert versions.version.tolist() == ['4', '3', '2', '1'] and versions.aliases.tolist()[:2] == ['challenger', 'champion']
    history = at.dataframe[1].value
    assert set(history.by) == {'ana', 'retrain loop 20260801-0000-ab12'} and 'moved away' in set(history.action)
    assert {x.label for x in at.metric} >= {'run', 'notebook', 'git commit'}
    assert 'Training data profile' in texts(at) and kinds(at).get('vega_lite_chart') == 2   # alias timeline, metrics compared

    at.switch_page('serving.py').run()
    assert not at.exception, at.exception
    assert 'No traffic in the last 500 buckets' in texts(at)               # the fill's traffic is from July
    at.selectbox(key='bucket').set_value('1 day').run()
    m = {x.label: x.value for x in at.metric}
    assert m['requests'] == f"{12 * 60 + 3 * 2:,}" and m['errors'] == '6', m
    assert 4.0 <= float(m['p50 (median of buckets)'].split()[0]) <= 10.0, m      # gamma(2, 4 ms): a median near 6.7 ms
    assert float(m['p99 (worst bucket)'].split()[0]) >= 25.0, m                   # the 50 ms errors and the gamma's tail
    assert kinds(at).get('vega_lite_chart') == 3                       # requests/s, latency, errors

    at.switch_page('drift.py').run()
    assert not at.exception, at.exception
    assert kinds(at).get('vega_lite_chart') == 3                       # heatmap, distribution, performance
    perf = at.dataframe[0].value
    assert perf.labels.sum() == 100 and set(perf.metric) == {'mae'}

    at.switch_page('alerts.py').run()
    assert not at.exception, at.exception
    alerts = at.dataframe[0].value
    assert sorted(alerts.subject) == ['mae', 'temp']
    assert 'waits for a decision' in texts(at) and 'needs a logged-in user' in texts(at)
    assert not [b for b in at.button if b.label in ('Approve', 'Veto')]   # no login, no approval

    at.switch_page('audit.py').run()
    at.text_input(key='audit_rid').set_value('req-0-0').run()
    assert not at.exception, at.exception
    m = {x.label: x.value for x in at.metric}
    assert m['model'] == 'bikes' and m['version'] == '3' and m['variant'] == 'champion'
    assert 'Explanation' in texts(at) and kinds(at).get('vega_lite_chart') == 1
    at.text_input(key='audit_rid').set_value('no-such-request').run()
    assert "no prediction with request id 'no-such-request'" in at.warning[0].value


def test_approval_needs_a_login_and_names_the_user(app, store, monkeypatch):
    from nbprod.aliases import alias_history
    from nbprod.retrain import Decisions
    from nbprod.store import tracking_client
    monkeypatch.setenv('NBPROD_DASHBOARD_AUTH', 'password')
    monkeypatch.setenv('NBPROD_DASHBOARD_PASSWORD', 'ana:s3cret,bo:hunter2')
    at = app().run()
    assert not at.metric and at.text_input(key='login_user') is not None      # nothing shown before the login
    at.switch_page('alerts.py').run()                                        # nor on another page
    assert [t.value for t in at.title] == ['nbprod'] and not at.dataframe
    assert [b.label for b in at.button] == ['Log in']
    at.text_input(key='login_user').set_value('bo'); at.text_input(key='login_password').set_value('s3cret'); at.button[0].click().run()
    assert at.error[0].value == 'wrong user or password' and not at.metric
    at.text_input(key='login_user').set_value('ana'); at.text_input(key='login_password').set_value('s3cret'); at.button[0].click().run()
    assert not at.exception, at.exception
    assert [t.value for t in at.title] == ['Alerts and decisions'] and any('logged in as **ana**' in c.value for c in at.sidebar.caption)
    at.switch_page('alerts.py').run()
    loop = '20260801-0000-ab12'
    at.text_input(key=f"note_{loop}").set_value('looks right').run()
    at.button(key=f"approve_{loop}").click().run()
    assert not at.exception, at.exception
    events = Decisions(store.store).events(loop=loop)
    assert [e.step for e in events][-2:] == ['approved', 'canary'], [(e.step, e.reasons) for e in events]
    assert events[-2].actor == 'ana (dashboard)' and events[-2].reasons.endswith('yes: looks right')
    h = alias_history(tracking_client(store), 'bikes')
    assert h.iloc[0].alias == 'challenger' and h.iloc[0].by == f"retrain loop {loop}"
    assert 'approved by ana' in at.success[0].value


def test_cli_refuses_an_open_dashboard_without_a_login(store):
    env = {k: v for k, v in os.environ.items() if not k.startswith('NBPROD_')}
    nbprod = str(Path(sys.executable).parent/'nbprod')
    r = subprocess.run([nbprod, 'dashboard', '--host', '0.0.0.0'], cwd=store.root, capture_output=True, text=True, env={**env, 'COLUMNS': '200'})
    assert r.returncode == 2 and 'opens the dashboard to the network, but dashboard_auth = none' in r.stderr, r.stderr
    r = subprocess.run([nbprod, 'dashboard'], cwd=store.root, capture_output=True, text=True,
                       env={**env, 'COLUMNS': '200', 'NBPROD_DASHBOARD_AUTH': 'password'})
    assert r.returncode == 2 and 'NBPROD_DASHBOARD_PASSWORD is empty' in r.stderr, r.stderr
    r = subprocess.run([nbprod, 'dashboard'], cwd=store.root, capture_output=True, text=True,
                       env={**env, 'COLUMNS': '200', 'NBPROD_DASHBOARD_AUTH': 'oidc'})
    assert r.returncode == 2 and 'dashboard_auth = oidc needs dashboard_allowed' in r.stderr, r.stderr
    r = subprocess.run([nbprod, 'dashboard'], cwd=store.root, capture_output=True, text=True,
                       env={**env, 'COLUMNS': '200', 'NBPROD_DASHBOARD_AUTH': 'oidc', 'NBPROD_DASHBOARD_ALLOWED': '@example.com'})
    assert r.returncode == 2 and 'dashboard_auth = oidc needs dashboard_oidc_secrets' in r.stderr, r.stderr
    assert not (store.store/'dashboard'/'dashboard.json').exists()


@pytest.mark.parametrize('sig, ignored', [(signal.SIGTERM, False), (signal.SIGINT, True)])   # Ctrl-C to one started with SIGINT ignored (nohup, a script's background job)
def test_cli_serves_until_sigterm_or_ctrl_c(store, sig, ignored):
    import threading
    from conftest import _ignore_sigint, sigint_ignored
    from nbprod.serving import free_port
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith('NBPROD_')}
    p = subprocess.Popen([str(Path(sys.executable).parent/'nbprod'), 'dashboard', '--port', str(port)], cwd=store.root,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**env, 'COLUMNS': '200'},
                         preexec_fn=_ignore_sigint if ignored else None)
    lines, ready = [], threading.Event()
    def read():
        for line in p.stdout:
            lines.append(line)
            if 'Ctrl-C stops' in line: ready.set()
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert ready.wait(60), f"no URL printed within 60 s: {''.join(lines)}"
        assert f"on http://127.0.0.1:{port}" in ''.join(lines)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=5) as r: assert r.read() == b'ok'
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r: assert b'<div id="root">' in r.read()
        assert not sigint_ignored(p.pid)
        p.send_signal(sig)
        assert p.wait(30) == 0, p.stderr.read()
        reader.join(10)
        assert 'stopping...' in p.stderr.read()
    finally:
        if p.poll() is None: p.kill()
    with pytest.raises(OSError): urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2)


def test_the_server_ends_when_the_cli_is_killed(store):
    "A `nbprod dashboard` killed outright (SIGKILL) leaves no Streamlit server behind."
    from nbprod.serving import free_port
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith('NBPROD_')}
    p = subprocess.Popen([str(Path(sys.executable).parent/'nbprod'), 'dashboard', '--port', str(port)], cwd=store.root,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        wait_ready(f"http://127.0.0.1:{port}", p)            # what `nbprod dashboard --detach` waits with
        p.kill(); p.wait()
        deadline = time.monotonic() + 20
        while True:
            try: urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2)
            except OSError: break
            assert time.monotonic() < deadline, "the Streamlit server outlived nbprod dashboard by 20 s"
            time.sleep(0.3)
    finally:
        if p.poll() is None: p.kill()


def test_a_server_open_to_the_network_shows_nothing_without_a_login(store):
    "`streamlit run` of the dashboard by hand listens on every interface: with dashboard_auth = none, a browser gets only the refusal."
    from playwright.sync_api import sync_playwright
    from nbprod.serving import free_port
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith('NBPROD_')}, 'NBPROD_PROJECT': str(store.root)}
    p = subprocess.Popen([sys.executable, '-m', 'streamlit', 'run', str(ENTRY), '--server.port', str(port), '--server.headless', 'true',
                          '--browser.gatherUsageStats', 'false'], cwd=store.root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(f"http://127.0.0.1:{port}", p)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path='/usr/bin/chromium', headless=True, args=['--no-sandbox'])
            page = browser.new_page()
            for path in ('', 'runs', 'alerts'):
                page.goto(f"http://127.0.0.1:{port}/{path}")
                page.get_by_text('listens beyond this machine without a login').wait_for(timeout=60_000)
                page.wait_for_function("() => !document.querySelector('[data-testid=stStatusWidget]')", timeout=60_000)
                assert page.get_by_text('Models in production').count() == 0 and page.get_by_text('open a run').count() == 0
            browser.close()
    finally:
        p.terminate()
        try: p.wait(15)
        except subprocess.TimeoutExpired: p.kill()
