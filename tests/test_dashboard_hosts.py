"""The dashboard cannot be read through DNS rebinding or from another site: `nbprod dashboard` on 127.0.0.1 answers a request
only when its Host is one of the dashboard's own addresses, and a websocket or request with an Origin only when that is its
own. Checked over raw HTTP, a raw websocket speaking Streamlit's protocol, and a real browser (Debian's chromium) whose DNS
sends a foreign name to 127.0.0.1."""
import http.client, os, re, signal, subprocess, sys, time
from pathlib import Path

import pytest
import websocket
from streamlit.proto.BackMsg_pb2 import BackMsg
from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

from nbprod.dashboard_server import wait_ready

NAME = 'rebindshop'   # the project's name: what the app shows, and what a refused client must not see


@pytest.fixture(scope='module')
def port(tmp_path_factory):
    "One `nbprod dashboard` on a free port of 127.0.0.1 for the module, on a project of its own; ended by SIGTERM."
    from nbprod.serving import free_port
    root = tmp_path_factory.mktemp('hosts')
    (root/'pyproject.toml').write_text(f'[project]\nname = "{NAME}"\n[tool.nbprod]\n')
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith('NBPROD_')}
    p = subprocess.Popen([str(Path(sys.executable).parent/'nbprod'), 'dashboard', '--port', str(port)], cwd=root,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_ready(f"http://127.0.0.1:{port}", p)
        yield port
    finally:
        p.send_signal(signal.SIGTERM)
        try: p.wait(30)
        except subprocess.TimeoutExpired: p.kill(); p.wait()


def request(port, path, host, origin=None, method='GET') -> tuple[int, str]:
    "`(status, body)` of a raw HTTP request to 127.0.0.1:port with exactly this Host (and Origin)."
    c = http.client.HTTPConnection('127.0.0.1', port, timeout=30)
    try:
        c.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        c.putheader('Host', host)
        if origin: c.putheader('Origin', origin)
        c.putheader('Content-Length', '0')
        c.endheaders()
        r = c.getresponse()
        return r.status, r.read().decode(errors='replace')
    finally: c.close()


def stream(port, host, origin=None):
    "A websocket to Streamlit's endpoint with this Host and Origin: the open socket, or the HTTP status that refused it."
    try:
        return websocket.create_connection(f"ws://127.0.0.1:{port}/_stcore/stream", host=host, origin=origin, subprotocols=['streamlit'],
                                           timeout=60, suppress_origin=origin is None)
    except websocket.WebSocketBadStatusException as e:
        return e.status_code


def app_messages(ws) -> str:
    "What the app sends a session that asks for its first page, until the script has run (Streamlit's protobuf messages, as text)."
    ask = BackMsg()
    ask.rerun_script.query_string = ''
    ask.rerun_script.page_script_hash = ''
    ws.send_binary(ask.SerializeToString())
    got, deadline = [], time.monotonic() + 60
    while time.monotonic() < deadline:
        m = ForwardMsg()
        m.ParseFromString(ws.recv())
        got.append(str(m))
        if m.WhichOneof('type') == 'script_finished': break
    ws.close()
    return ''.join(got)


def test_the_page_answers_only_its_own_host(port):
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}"):
        status, body = request(port, '/', host)
        assert status == 200 and '<div id="root">' in body, (host, status, body[:200])
    script = re.search(r'src="\.?/?(static/js/[^"]+\.js)"', request(port, '/', f"127.0.0.1:{port}")[1]).group(1)
    assert request(port, f"/{script}", f"127.0.0.1:{port}")[0] == 200
    for host in (f"evil.example:{port}", 'evil.example', f"127.0.0.1:{port + 1}", f"127.0.0.1.evil.example:{port}"):
        for path in ('/', f"/{script}", '/_stcore/host-config'):
            status, body = request(port, path, host)
            assert status == 403, (host, path, status, body[:200])
            assert '<div id="root">' not in body and 'function' not in body and NAME not in body, body
            assert f"This nbprod dashboard answers at 127.0.0.1:{port}, localhost:{port}" in body, body
    # the health check alone answers any Host (an orchestrator's probe names the pod's address), and says nothing more
    assert request(port, '/_stcore/health', f"evil.example:{port}") == (200, 'ok')


def test_a_rebound_websocket_is_refused(port):
    "A page of evil.example whose name now resolves to 127.0.0.1: its websocket names evil.example in Host and Origin."
    assert stream(port, f"evil.example:{port}", f"http://evil.example:{port}") == 403
    assert stream(port, f"evil.example:{port}") == 403                                   # and without an Origin


def test_another_sites_websocket_is_refused(port):
    "A page of another site opening ws://127.0.0.1:PORT directly: the right Host, its own Origin."
    assert stream(port, f"127.0.0.1:{port}", 'http://evil.example') == 403
    assert stream(port, f"127.0.0.1:{port}", f"http://evil.example:{port}") == 403
    assert stream(port, f"127.0.0.1:{port}", 'null') == 403                            # a sandboxed frame
    assert stream(port, f"127.0.0.1:{port}", f"http://localhost:{port}") == 403        # another origin, though local


def test_the_own_origin_gets_the_app(port):
    for host in (f"127.0.0.1:{port}", f"localhost:{port}"):
        ws = stream(port, host, f"http://{host}")
        assert not isinstance(ws, int), f"refused with {ws}"
        got = app_messages(ws)
        assert 'script_finished: FINISHED_SUCCESSFULLY' in got and NAME in got, got[-2000:]
    ws = stream(port, f"127.0.0.1:{port}")                                              # a program: no Origin at all
    assert not isinstance(ws, int) and NAME in app_messages(ws)


def test_a_post_from_another_site_is_refused(port):
    status, body = request(port, '/_stcore/upload_file/s/w', f"127.0.0.1:{port}", 'http://evil.example', method='PUT')
    assert status == 403 and 'its Origin is another site' in body, (status, body)
    status, body = request(port, '/_stcore/upload_file/s/w', f"127.0.0.1:{port}", f"http://127.0.0.1:{port}", method='PUT')
    assert (status, body) == (403, 'XSRF token missing or invalid'), (status, body)   # past the guard: Streamlit's own XSRF check answers


def test_a_browser_sees_the_dashboard_and_a_rebound_page_sees_nothing(port):
    "Debian's chromium, its resolver sending evil.example to 127.0.0.1 (what DNS rebinding achieves)."
    from playwright.sync_api import sync_playwright
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path='/usr/bin/chromium', headless=True,
                                     args=['--no-sandbox', '--host-resolver-rules=MAP evil.example 127.0.0.1'])
        try:
            page = browser.new_page()
            r = page.goto(f"http://127.0.0.1:{port}/")
            assert r.status == 200
            page.get_by_text('Models in production').wait_for(timeout=60_000)                 # the websocket worked: the app drew
            assert NAME in page.content()
            page = browser.new_page()
            r = page.goto(f"http://evil.example:{port}/")
            assert r.status == 403 and 'answers at 127.0.0.1' in page.content()
            page.wait_for_timeout(2_000)
            assert NAME not in page.content() and page.get_by_text('Models in production').count() == 0
        finally:
            browser.close()
