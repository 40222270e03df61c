"""The search `nbprod tune hgb` of pyproject.toml is valid as written: nbprod checks it whole, as `nbprod tune` does before
any trial (the target's parameters, the distributions, ASHA's settings). Running it is nbprod's own test suite's job."""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_hgb_search_is_valid_and_searches_what_validate_takes():
    import inspect
    from nbprod.settings import load_settings
    from nbprod.tune import planned_trials
    from nbprod.tune_spec import tune_spec
    from bikeshare.tuning import validate
    spec = tune_spec(load_settings(ROOT, env={}), 'hgb')
    assert spec.target == 'bikeshare.tuning:validate' and spec.metric == 'val_rmse' and spec.mode == 'min'
    assert spec.search == 'optuna' and spec.scheduler == 'asha' and spec.register == 'bikeshare' and spec.seed == 0
    args = inspect.signature(validate).parameters
    assert {d.name for d in spec.space} <= set(args)
    # ASHA's max_t is the number of reports a full trial makes: one per `step` trees up to max_iter
    assert spec.asha['max_t'] == args['max_iter'].default // args['step'].default
    assert planned_trials(spec) == spec.trials == 16
