"""The replay as `make demo` runs it, on two months: July and August 2011 served to a real endpoint (`nbprod serve`) in a
copy of the project (the session's `replayed` fixture, conftest.py), labels a week late, `nbprod monitor check` after each month. July's temperatures are far from
January to June's: drift alerts, a retrain loop that has nothing to learn from yet; August: a loop that retrains on July."""
import json


def test_replay_two_months(replayed):
    root, r = replayed
    out = ' '.join(r.stdout.split())
    assert 'July: 744 hours predicted (v1: 744), 576 labels arrived' in out, out      # the last week's labels come with August
    assert 'Aug: 731 hours predicted' in out and '744 labels arrived' in out, out
    assert 'new drift alerts (breach): temp, atemp' in out, out                       # the summer is hotter than the spring
    assert 'nothing new to learn from yet' in out, out                                # July's loop: all its labels are the holdout
    # every step recorded, in the replay's own store
    from nbprod.settings import load_settings
    from nbprod.retrain import Decisions
    s = load_settings(root, profile='replay', env={})
    events = Decisions(s.store).events('bikeshare')
    loops = {e.loop for e in events}
    assert len(loops) >= 2 and {e.step for e in events} >= {'triggered', 'rejected'}, [(e.step, e.reasons) for e in events]
    august = [e for e in events if e.loop == events[-1].loop]
    assert august[0].step == 'triggered' and august[1].step in ('trained', 'failed'), [(e.step, e.reasons) for e in august]
    if august[1].step == 'trained': assert 'trained on 744 labelled predictions' in august[1].reasons
    assert '$ nbprod monitor drift bikeshare --profile replay' in r.stdout and '$ nbprod monitor history bikeshare' in r.stdout
    drift = r.stdout.split('$ nbprod monitor drift')[1].split('$ nbprod')[0]
    temp = [l for l in drift.splitlines() if l.split()[:1] == ['temp']][0]
    assert temp.split()[1:] == ['DRIFT', 'DRIFT'], drift
    alerts = [json.loads(l) for l in (s.store/'monitor'/'alerts.jsonl').read_text().splitlines()]
    assert {a['subject'] for a in alerts if a['level'] == 'breach'} >= {'temp', 'atemp'}
