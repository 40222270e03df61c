"""Threads that profile at the same instant, in a fresh process (whylogs' set-up is once per process).

whylogs-sketching's numpy support is set up by a C++ static initialiser that imports a module; a second thread
arriving meanwhile waited in C++ holding the GIL, and the process froze for good (a served model's replica, which
profiles each model in its own thread, stopped answering). `nbprod.profiles.whylogs()` sets whylogs up in one thread.
"""
import subprocess, sys, textwrap

import pytest

RACE = textwrap.dedent('''
    import sys, threading
    import numpy as np, pandas as pd
    from nbprod.profiles import profile
    n = int(sys.argv[1])
    frame = pd.DataFrame({"x": np.random.default_rng(0).random(50), "n": np.arange(50), "s": ["a", "b"] * 25})
    barrier, done = threading.Barrier(n), []
    def work():
        barrier.wait()
        done.append(profile(frame).rows)
    threads = [threading.Thread(target=work, daemon=True) for _ in range(n)]
    for t in threads: t.start()
    for t in threads: t.join()
    print("profiled", done, flush=True)
''')


@pytest.mark.parametrize('threads', [2, 4])
def test_threads_profiling_at_once_do_not_freeze_the_process(threads):
    try: r = subprocess.run([sys.executable, '-c', RACE, str(threads)], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired as e:   # run() has killed it
        pytest.fail(f"{threads} threads profiling at once froze the process:\n{e.stderr}")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"profiled {[50] * threads}", r.stdout
