"""The audit log across processes: a writer killed with SIGKILL loses none of the records it acknowledged, and leaves a chain that verifies."""
import json, signal, subprocess, sys, textwrap, time, warnings
import pytest

WRITER = textwrap.dedent('''
    import asyncio, sys
    from nbprod.audit import AuditLog
    log = AuditLog(sys.argv[1], 'bikeshare', replica='r1', pii=['client_id'])
    async def one(i):
        await log.write([{'request_id': f'req-{i}', 'index': 0, 'client_id': f'c{i % 7}', 'version': '3',
                          'variant': 'champion', 'inputs': {'temp': i / 10}, 'outputs': {'prediction': i}, 'latency_ms': 1.0}])
        print(f'ack req-{i}', flush=True)          # what a client would receive: only after the write returned
    async def main():
        i = 0
        while True:                               # 32 requests in flight at a time, until killed
            await asyncio.gather(*[one(i + j) for j in range(32)])
            i += 32
    asyncio.run(main())
''')


@pytest.fixture(scope='module')
def killed(tmp_path_factory):
    "A writer's audit folder and the request ids it acknowledged before it was killed with SIGKILL mid-write."
    folder = tmp_path_factory.mktemp('killed')/'audit'
    proc = subprocess.Popen([sys.executable, '-c', WRITER, str(folder)], stdout=subprocess.PIPE, text=True)
    acked = []
    try:
        deadline = time.time() + 60
        while len(acked) < 3000 and time.time() < deadline:
            line = proc.stdout.readline()
            assert line, "the writer exited early"
            acked.append(line.split()[1])
    finally:
        proc.send_signal(signal.SIGKILL)            # mid-write: no chance to flush or close anything
        rest = proc.stdout.read()                   # acks already in the pipe when it died count too
        proc.wait(timeout=30)
    acked += [l.split()[1] for l in rest.splitlines() if l.startswith('ack ')]
    assert len(acked) >= 3000
    return folder, acked


def test_sigkill_loses_no_acknowledged_record(killed):
    from nbprod.audit import read_audit
    folder,acked = killed
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')             # a torn last line is named in a warning; the test below checks it
        df = read_audit(folder, 'bikeshare')
    missing = set(acked) - set(df.request_id)
    assert not missing, f"{len(missing)} acknowledged records missing, e.g. {sorted(missing)[:5]}"
    assert df.client_id.str.startswith('hmac:').all() and df.version.eq('3').all()
    row = df[df.request_id == acked[0]].iloc[0]
    assert json.loads(row.inputs) == {'temp': int(acked[0].split('-')[1]) / 10}


def _exactly_once(folder, acked):
    from nbprod.audit import read_audit
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        df = read_audit(folder, 'bikeshare')
    counts = df.request_id.value_counts()
    assert set(acked) <= set(counts.index) and counts[acked].eq(1).all(), counts[acked][counts[acked] != 1].head()
    assert counts.eq(1).all()                       # and nothing else twice: every request id was used once
    return [str(w.message) for w in caught]


def test_sigkill_leaves_a_verifiable_chain(killed):
    from nbprod.audit import verify_audit, request_ids
    folder,acked = killed
    checks = verify_audit(folder, 'bikeshare')
    assert len(checks) == 1 and checks[0].records >= len(acked)
    [c] = checks
    assert c.status in ('ok', 'warning'), c
    assert all(w.startswith('torn last line at byte') for w in c.warnings), c.warnings   # a write never acknowledged, nothing else
    assert c.status == 'ok' or c.reason == c.warnings[0]
    warned = _exactly_once(folder, acked)
    assert warned == c.warnings, (warned, c.warnings)   # read_audit names the same torn line
    assert set(acked) <= request_ids(folder, 'bikeshare')


def test_compacting_after_sigkill_keeps_every_record(killed, tmp_path):
    import shutil
    from nbprod.audit import compact, verify_audit
    folder = tmp_path/'audit'
    shutil.copytree(killed[0], folder)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        [part] = compact(folder, today='9999-12-31')
    assert not list(folder.rglob('*.jsonl')) and not list(folder.rglob('*.head'))
    assert [(c.path, c.status) for c in verify_audit(folder, 'bikeshare')] == [(part, 'ok')]
    _exactly_once(folder, killed[1])


# --- nbprod audit: verify, show, compact -------------------------------------------------------------------------------

@pytest.fixture
def logged(project):
    "A project whose audit log holds 20 requests of `bikeshare` and 3 of `taxi`, written as a replica writes them."
    from nbprod.audit import AuditLog
    folder = project.settings().store/'audit'
    for model, n in (('bikeshare', 20), ('taxi', 3)):
        log = AuditLog(folder, model, replica='r1', pii=['client_id'])
        log.write_sync([{'request_id': f'{model}-{i}', 'index': 0, 'client_id': 'c1', 'version': '1', 'variant': 'champion',
                         'inputs': {'temp': i / 10}, 'outputs': i * 2.5, 'latency_ms': 1.0} for i in range(n)])
        log.close()
    return project, folder


def test_cli_audit_verify_names_the_first_edited_record(logged):
    p, folder = logged
    r = p.cli('audit', 'verify')
    assert r.returncode == 0 and 'intact' in r.stdout and '23 records' in ' '.join(r.stdout.split()), r.stdout + r.stderr
    [path] = list((folder/'bikeshare').rglob('*.jsonl'))
    lines = path.read_bytes().split(b'\n')
    assert b'"outputs":17.5' in lines[7]
    lines[7] = lines[7].replace(b'"outputs":17.5', b'"outputs":99.5')       # someone edits the answer of bikeshare-7
    path.write_bytes(b'\n'.join(lines))
    r = p.cli('audit', 'verify')
    said = ' '.join(r.stdout.split()) + ' ' + ' '.join(r.stderr.split())
    assert r.returncode == 2 and 'edited' in said and 'bikeshare-7' in said and 'record 7' in said, said
    assert 'taxi' in said                                                     # the other model's files were checked too
    assert p.cli('audit', 'verify', 'taxi').returncode == 0
    path.write_bytes(b'\n'.join(lines[:7] + lines[8:]))                       # or removes it
    r = p.cli('audit', 'verify', 'bikeshare')
    said = ' '.join((r.stdout + r.stderr).split())
    assert r.returncode == 2 and 'removed' in said and 'bikeshare-8' in said, said


def test_cli_audit_verify_reports_a_torn_last_line_and_a_cut_off_tail(logged):
    p, folder = logged
    [path] = list((folder/'taxi').rglob('*.jsonl'))
    data = path.read_bytes()
    path.write_bytes(data + b'{"request_id":"taxi-3","ind')                  # a write cut short by a crash: never acknowledged
    r = p.cli('audit', 'verify', 'taxi')
    said = ' '.join((r.stdout + r.stderr).split())
    assert r.returncode == 1 and 'torn last line' in said, said             # a warning: nothing acknowledged is missing
    path.write_bytes(data[:data.rstrip(b'\n').rfind(b'\n') + 1])             # the last acknowledged record cut off
    r = p.cli('audit', 'verify', 'taxi')
    said = ' '.join((r.stdout + r.stderr).split())
    assert r.returncode == 2 and 'truncated' in said, said


def test_cli_audit_show_prints_one_request(logged):
    p, _ = logged
    r = p.cli('audit', 'show', 'bikeshare-4')
    assert r.returncode == 0, r.stderr
    [rec] = json.loads(r.stdout)
    assert (rec['request_id'], rec['model'], rec['outputs'], rec['inputs']) == ('bikeshare-4', 'bikeshare', 10.0, {'temp': 0.4}), rec
    assert rec['client_id'].startswith('hmac:') and 'c1' not in r.stdout      # personal fields stay hashed
    r = p.cli('audit', 'show', 'nope-1')
    assert r.returncode == 2 and "no audit record with request id 'nope-1'" in r.stderr and 'nbprod audit' not in r.stdout, r.stderr


@pytest.mark.parametrize('model', ['../../etc', 'bikeshare/../taxi', '/tmp', 'nosuch'])
def test_cli_audit_refuses_a_model_that_is_not_in_the_log(logged, model):
    p, _ = logged
    r = p.cli('audit', 'verify', model)
    said = ' '.join(r.stderr.split())
    assert r.returncode == 2 and 'no audit log for model' in said and 'bikeshare, taxi' in said, said


def test_cli_audit_compact_keeps_every_record(logged):
    from nbprod.audit import read_audit
    p, folder = logged
    before = read_audit(folder)
    r = p.cli('audit', 'compact', '--before', '9999-12-31')
    assert r.returncode == 0 and '2 Parquet parts' in ' '.join(r.stdout.split()), r.stdout + r.stderr
    assert not list(folder.rglob('*.jsonl')) and len(list(folder.rglob('*.parquet'))) == 2
    after = read_audit(folder)
    assert sorted(after.request_id) == sorted(before.request_id) and len(after) == 23
    assert p.cli('audit', 'verify').returncode == 0
