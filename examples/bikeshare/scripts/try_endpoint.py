"""Serve the bike-share champion with `nbprod serve`, send it a few real July 2011 hours with an API key, print the answers
next to what really happened and why the model said what it said about the first, print the curl line to try it yourself, and stop the endpoint. Run from examples/bikeshare
after `nbprod run train` (the last step of `make demo`):

    python scripts/try_endpoint.py [--records 3]
"""
import argparse, json, os, signal, subprocess, sys, time, urllib.error, urllib.request
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the project's own package, as nbprod run does
from bikeshare.features import INPUTS, TARGET
from nbprod.auth import create_key, read_key_file, revoke_key
from nbprod.settings import load_settings


def post(url, body, key):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method='POST',
                                 headers={'Content-Type': 'application/json', 'Authorization': f'Bearer {key}'})
    with urllib.request.urlopen(req, timeout=30) as r: return json.loads(r.read())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--records', type=int, default=3, help="July hours to send")
    args = ap.parse_args()
    s = load_settings()
    if any(k.name == 'demo' for k in read_key_file(s.api_keys_file)): revoke_key(s, 'demo')
    _, key = create_key(s, 'demo', ['bikeshare'])            # shown once; the store keeps its hash
    july = pd.read_parquet('data/processed/production.parquet').query('month == 7 and hr in (8, 13, 18)').head(args.records)
    records = json.loads(july[INPUTS].to_json(orient='records'))
    proc = subprocess.Popen([str(Path(sys.executable).parent/'nbprod'), 'serve'], stdout=subprocess.PIPE, text=True)
    url = f'http://{s.serve_host}:{s.serve_port}'
    try:
        deadline = time.time() + 240
        while True:
            if proc.poll() is not None: sys.exit(f"nbprod serve exited ({proc.returncode})")
            try:
                with urllib.request.urlopen(f'{url}/readyz', timeout=5) as r:
                    if r.status == 200: break
            except (urllib.error.URLError, OSError): pass
            if time.time() > deadline: sys.exit("the endpoint did not become ready in 4 minutes")
            time.sleep(1)
        answer = post(f'{url}/v1/models/bikeshare/predict', records, key)
        print(f"\nbikeshare version {answer['version']} ({answer['variant']}), request {answer['request_id']}:")
        for r, pred, actual in zip(records, answer['predictions'], july[TARGET]):
            print(f"  July, {r['hr']:>2}h, {r['weathersit']:<14} temp {r['temp']:.2f}: predicted {pred:6.1f} bikes, actual {actual}")
        why = post(f'{url}/v1/models/bikeshare/explain', records[0], key)
        e = why['explanation']
        top = sorted(e['contributions'].items(), key=lambda kv: -abs(kv[1]))[:4]
        print(f"\nwhy {e['prediction']:.1f} bikes at {records[0]['hr']}h ({why['method']} SHAP, {'exact' if why['exact'] else 'sampled'}, "
              f"version {why['version']}): on average {e['base_value']:.1f}, then")
        for feature, c in top: print(f"  {feature:<10} {c:+7.1f}")
        body = json.dumps(records[0])
        print(f"\ntry it yourself: `nbprod serve` here, then, in another terminal:\n  export KEY={key}\n"
              f"  curl -s -H \"Authorization: Bearer $KEY\" -H 'Content-Type: application/json' \\\n"
              f"       -d '{body}' {url}/v1/models/bikeshare/predict")
    finally:
        proc.send_signal(signal.SIGINT)
        try: proc.wait(timeout=120)
        except subprocess.TimeoutExpired: proc.kill(); proc.wait()


if __name__ == '__main__':
    main()
