"""`nbprod.train.fit_torch` on real Ray Train (TorchTrainer, gloo, 2 workers on CPU) and MLflow on SQLite: data-parallel
training, rank 0's epochs logged to the run, the model back in the driver, logged in MLflow's pytorch flavour and loaded by
serving as any other model; a failing loop's error. One local Ray serves the module (in this process)."""

import numpy as np
import pandas as pd
import pytest

from conftest import Project

LOOP = '''
import torch
from torch import nn
from torch.utils.data import TensorDataset
from nbprod import train

def data(n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.rand(n, 3, generator=g)
    return X, X @ torch.tensor([2.0, -1.0, 0.5]) + 3.0

def loop(config):
    import ray.train
    torch.manual_seed(0)
    X, y = data()
    model = train.prepare(nn.Linear(3, 1))
    rows = train.loader(TensorDataset(X, y), 32)
    opt = torch.optim.SGD(model.parameters(), lr=config["lr"])
    ctx = ray.train.get_context()
    for epoch in range(config["epochs"]):
        n = 0
        for xb, yb in rows:
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(xb).squeeze(1), yb)
            loss.backward(); opt.step()
            n += len(xb)
        if config.get("fail_at") == epoch and ctx.get_world_rank() == 1: raise ValueError(f"epoch {epoch} went wrong")
        train.report({"loss": float(loss), "rows": n, "world_size": ctx.get_world_size(), "rank": ctx.get_world_rank()},
                     model=model if epoch == config["epochs"] - 1 else None)
'''


@pytest.fixture(scope='module')
def proj(tmp_path_factory):
    import subprocess, sys
    root = tmp_path_factory.mktemp('train')/'proj'
    root.mkdir()
    (root/'pyproject.toml').write_text('[project]\nname = "proj"\n\n[tool.nbprod]\nexperiment = "proj"\n')
    (root/'settings.ini').write_text('[DEFAULT]\ntrain_workers = 2\n')
    (root/'trainpkg').mkdir()
    (root/'trainpkg'/'__init__.py').write_text('')
    (root/'trainpkg'/'loops.py').write_text(LOOP)
    subprocess.run(['git', 'init', '-q', '-b', 'main'], cwd=root, check=True)
    sys.path.insert(0, str(root))
    p = Project(root)
    yield p
    sys.path.remove(str(root))


@pytest.fixture
def run(proj, monkeypatch):
    "An interactive MLflow run of the project, as a notebook in JupyterLab has: track logs there."
    from nbprod import track
    monkeypatch.chdir(proj.root)
    track._state.clear()
    client, rid = track.current_run()
    yield client, rid
    track.end()


def test_two_workers_train_in_parallel_and_rank0_reports_reach_the_run(proj, ray_session, run):
    from trainpkg.loops import data, loop
    from nbprod import track
    from nbprod.train import fit_torch
    client, rid = run
    res = fit_torch(loop, {'lr': 0.2, 'epochs': 6}, settings=proj.settings())
    assert res.workers == 2 and res.use_gpu is False
    # rank 0's reports, one per epoch, each worker on its half of the 512 rows (DistributedSampler)
    assert [s for s, _ in res.history] == list(range(6))
    assert {m['world_size'] for _, m in res.history} == {2.0} and {m['rank'] for _, m in res.history} == {0.0}
    assert {m['rows'] for _, m in res.history} == {256.0}
    assert res.history[-1][1]['loss'] < res.history[0][1]['loss']
    # logged to the run with their epoch as step
    assert [m.step for m in client.get_metric_history(rid, 'loss')] == list(range(6))
    # the model comes back unwrapped, on the CPU, trained
    import torch
    assert isinstance(res.model, torch.nn.Linear)
    X, y = data(64, seed=1)
    pred = track.torch_predict(res.model, X.numpy())
    assert pred.shape == (64,) and float(np.sqrt(np.mean((pred - y.numpy()) ** 2))) < 0.5


def test_torch_model_logged_registered_and_served_like_any_other(proj, ray_session, run):
    from trainpkg.loops import data, loop
    from nbprod import track
    from nbprod.serving import ModelSpec, load_version
    from nbprod.train import fit_torch
    client, rid = run
    res = fit_torch(loop, {'lr': 0.2, 'epochs': 4}, settings=proj.settings())
    X, _ = data(50, seed=2)
    frame = pd.DataFrame(X.numpy().astype('float64'), columns=['a', 'b', 'c'])
    info = track.log_model(res.model, 'model', X_example=frame, registered_name='linear', reference=frame)
    assert 'pytorch' in info.flavors and info.registered_model_version == 1
    assert client.get_run(rid).data.tags['nbprod.reference_profile'] == 'nbprod/model/reference.bin'
    model, fields, background = load_version(proj.settings(), ModelSpec('linear', 'linear'), '1')
    out = model.predict(frame.head(5))
    assert np.asarray(out).shape == (5,)     # one value per row, as a scikit-learn regressor's
    np.testing.assert_allclose(out, track.torch_predict(res.model, frame.head(5)), rtol=1e-5)
    assert [f.name for f in fields] == ['a', 'b', 'c'] and background is not None


def test_a_failing_worker_fails_the_training_with_its_error(proj, ray_session, run):
    from trainpkg.loops import loop
    from nbprod.errors import TrainError
    from nbprod.train import fit_torch
    with pytest.raises(TrainError, match="ValueError: epoch 1 went wrong"):
        fit_torch(loop, {'lr': 0.2, 'epochs': 3, 'fail_at': 1}, settings=proj.settings())
