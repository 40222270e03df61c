"""The audit log across processes: a writer killed with SIGKILL loses none of the records it acknowledged."""
import json, os, signal, subprocess, sys, textwrap, time

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


def test_sigkill_loses_no_acknowledged_record(tmp_path):
    from nbprod.audit import read_audit
    proc = subprocess.Popen([sys.executable, '-c', WRITER, str(tmp_path/'audit')], stdout=subprocess.PIPE, text=True)
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
    df = read_audit(tmp_path/'audit', 'bikeshare')
    missing = set(acked) - set(df.request_id)
    assert not missing, f"{len(missing)} acknowledged records missing, e.g. {sorted(missing)[:5]}"
    assert df.client_id.str.startswith('hmac:').all() and df.version.eq('3').all()
    row = df[df.request_id == acked[0]].iloc[0]
    assert json.loads(row.inputs) == {'temp': int(acked[0].split('-')[1]) / 10}
