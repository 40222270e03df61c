"""The dashboard on the store the replay filled (the session's `replayed` fixture: the real pipeline, a real endpoint, July and
August 2011, labels, alerts, retrain loops): every page in Streamlit's AppTest, the project's forecast page, then all of
them in a real browser (Debian's chromium, headless, driven by Playwright), with a screenshot of each page in
tests/output/dashboard/."""
import os, subprocess, sys
from pathlib import Path

import nbprod_apps
import pytest

from conftest import clean_env

OUTPUT = Path(__file__).resolve().parent/'output'/'dashboard'
CHROMIUM = '/usr/bin/chromium'


@pytest.fixture
def app(replayed, monkeypatch):
    from streamlit.testing.v1 import AppTest
    import streamlit as st

    from nbprod import dashboard
    root, _ = replayed
    for k in list(os.environ):
        if k.startswith('NBPROD_'): monkeypatch.delenv(k)
    monkeypatch.setenv('NBPROD_PROJECT', str(root))
    monkeypatch.setenv('NBPROD_PROFILE', 'replay')
    monkeypatch.chdir(root)
    dashboard._settings.clear()
    st.cache_data.clear()
    entry = Path(nbprod_apps.__file__).parent/'dashboard'/'app.py'
    yield lambda: AppTest.from_file(str(entry), default_timeout=120)
    dashboard._settings.clear()


def kinds(at) -> dict:
    acc = {}
    def walk(node):
        t = getattr(node, 'type', None)
        if t: acc[t] = acc.get(t, 0) + 1
        kids = getattr(node, 'children', None)
        for c in (kids.values() if isinstance(kids, dict) else []): walk(c)
    walk(at._tree)
    return acc


def shown(at) -> str:
    return ' '.join(str(getattr(x, 'value', '')) for kind in ('title', 'header', 'subheader', 'markdown', 'caption', 'info', 'warning', 'error', 'success')
                    for x in getattr(at, kind))


def test_every_page_on_the_replayed_store(app, replayed):
    from nbprod.audit import read_audit
    from nbprod.settings import load_settings
    root, _ = replayed
    s = load_settings(root, profile='replay', env={})
    at = app().run()
    assert not at.exception, at.exception
    m = {x.label: x.value for x in at.metric}
    assert m['models served'] == '1' and int(m['alerts (24 h)']) >= 2, m
    served = at.dataframe[0].value
    assert served.model.tolist() == ['bikeshare'] and served.champion.notna().all()
    assert 'bikeshare' in shown(at) and 'temp drifted' in shown(at)           # the hot July, as an alert
    pipelines = at.dataframe[1].value
    assert set(pipelines.name) == {'train'} and 'FINISHED' in set(pipelines.status)

    at.switch_page('runs.py').run()
    assert not at.exception, at.exception
    runs = at.dataframe[0].value
    assert {'pipeline', 'step'} <= set(runs.kind) and 'metrics.val_mae' in runs.columns
    at.selectbox(key='pick_run').set_value(runs[runs.kind == 'pipeline'].run_id.iloc[-1]).run()
    assert kinds(at).get('graphviz_chart') == 1 and 'Steps' in shown(at)
    steps = [d.value for d in at.dataframe if 'step' in d.value.columns][0]
    assert set(steps.step) >= {'ingest', 'features', 'train', 'evaluate'}
    train = runs[(runs.kind == 'step') & (runs.notebook == 'nbs/02_train.ipynb')].run_id.iloc[-1]
    at.selectbox(key='pick_run').set_value(train).run()
    assert kinds(at).get('iframe') == 1 and 'Executed notebook' in shown(at)     # the output notebook, rendered inline

    at.switch_page('models.py').run()
    assert not at.exception, at.exception
    versions = at.dataframe[0].value
    assert len(versions) >= 2 and 'champion' in set(versions.aliases) and 'metrics.val_mae' in versions.columns
    history = at.dataframe[1].value
    assert any('nbs/02_train.ipynb' in b for b in history.by)                 # the train notebook set the first champion
    assert {x.label: x.value for x in at.metric}['notebook'] == '02_train.ipynb'
    assert 'Training data profile' in shown(at)

    at.switch_page('serving.py').run()
    assert not at.exception, at.exception
    m = {x.label: x.value for x in at.metric}
    assert int(m['requests'].replace(',', '')) > 0, m
    assert kinds(at).get('vega_lite_chart') == 3

    at.switch_page('drift.py').run()
    assert not at.exception, at.exception
    assert kinds(at).get('vega_lite_chart') >= 2                             # heatmap, distribution (and performance)
    assert at.selectbox(key='drift_feature').options[:1] and 'temp' in at.selectbox(key='drift_feature').options
    assert len(at.dataframe) == 1 and at.dataframe[0].value.labels.sum() > 0   # the labels that came back

    at.switch_page('alerts.py').run()
    assert not at.exception, at.exception
    alerts = at.dataframe[0].value
    assert {'temp', 'atemp'} <= set(alerts[alerts.level == 'breach'].subject)
    assert kinds(at).get('expander', 0) >= 2                                 # a retrain loop each

    rid = read_audit(s.store/'audit', 'bikeshare').request_id.iloc[0]
    at.switch_page('audit.py').run()
    at.text_input(key='audit_rid').set_value(rid).run()
    assert not at.exception, at.exception
    m = {x.label: x.value for x in at.metric}
    assert m['model'] == 'bikeshare' and m['variant'] in ('champion', 'challenger')

    at.switch_page(os.path.relpath(root/'apps'/'pages'/'forecast.py', Path(nbprod_apps.__file__).parent/'dashboard')).run()
    assert not at.exception, at.exception
    assert 'bikes an hour' in shown(at) and kinds(at).get('vega_lite_chart') == 1
    run = next(b for b in at.button if b.label == 'Run')              # the form's button (the sidebar also has Reload data)
    at.selectbox(key='weathersit').set_value('light rain/snow'); at.slider(key='hr').set_value(8); run.click().run()
    assert 'expected at 8:00' in shown(at) and 'light rain/snow weather' in shown(at)


PAGES = [('', 'overview', ['Models in production', 'bikeshare', 'drifted'], True), ('runs', 'runs', ['open a run'], False),
         ('models', 'models', ['Alias history', 'Lineage'], True), ('serving', 'serving', ['Requests per second'], True),
         ('drift', 'drift', ['Performance on labelled answers'], True), ('alerts', 'alerts', ['Retrain decisions', 'Alerts'], True),
         ('audit?request_id={rid}', 'audit', ['Inputs', 'bikeshare'], False), ('app-forecast', 'forecast', ['bikes an hour'], True)]


def test_every_page_in_a_real_browser(replayed):
    from playwright.sync_api import sync_playwright
    from nbprod.audit import read_audit
    from nbprod.serving import free_port
    from nbprod.settings import load_settings
    assert Path(CHROMIUM).exists(), "Debian's chromium is missing: `make sysdeps` installs it"
    root, _ = replayed
    s = load_settings(root, profile='replay', env={})
    rid = read_audit(s.store/'audit', 'bikeshare').request_id.iloc[0]
    nbprod = str(Path(sys.executable).parent/'nbprod')
    port = free_port()
    for old in OUTPUT.glob('*.png'): old.unlink()
    OUTPUT.mkdir(parents=True, exist_ok=True)
    try:
        r = subprocess.run([nbprod, 'dashboard', '--profile', 'replay', '--detach', '--port', str(port)], cwd=root, capture_output=True,
                           text=True, env=clean_env(), timeout=120)
        assert r.returncode == 0 and f"http://127.0.0.1:{port}" in r.stdout, r.stdout + r.stderr
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=['--no-sandbox'])
            page = browser.new_page(viewport={'width': 1400, 'height': 1000})
            for path, name, texts, chart in PAGES:
                page.goto(f"http://127.0.0.1:{port}/{path.format(rid=rid)}")
                for t in texts: page.get_by_text(t).first.wait_for(timeout=60_000)
                if chart: page.locator('.vega-embed canvas, .vega-embed svg').first.wait_for(timeout=60_000)
                # the script has run to its end (Streamlit's "Running..." widget is gone), then the charts draw
                page.wait_for_function("() => !document.querySelector('[data-testid=stStatusWidget]')", timeout=60_000)
                page.wait_for_timeout(500)
                assert page.locator('[data-testid=stException]').count() == 0, f"{name}: {page.locator('[data-testid=stException]').first.inner_text()}"
                page.screenshot(path=str(OUTPUT/f"{name}.png"), full_page=True)
            browser.close()
    finally:
        stop = subprocess.run([nbprod, 'dashboard', '--profile', 'replay', '--stop'], cwd=root, capture_output=True, text=True, env=clean_env(), timeout=60)
    assert 'stopped the dashboard' in stop.stdout, stop.stdout + stop.stderr
    shots = {p.name: p.stat().st_size for p in OUTPUT.glob('*.png')}
    assert set(shots) == {f"{n}.png" for _, n, _, _ in PAGES}, shots
    assert min(shots.values()) > 20_000, shots          # a picture of a page, not of a blank one
