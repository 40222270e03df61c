"The model's input (bikeshare.features, from nbs/01_features.ipynb), for a month of data and for one hour as serving sends it."
from pathlib import Path
import numpy as np
import pandas as pd
import pytest
from bikeshare.data import load_raw
from bikeshare.features import FEATURES, INPUTS, TARGET, cyclical, make_features, make_model, target

RAW = Path(__file__).resolve().parent.parent/'data'/'Bikeshare.csv'
CYCLICAL = ['hr_sin', 'hr_cos', 'month_sin', 'month_cos']


@pytest.fixture(scope='module')
def raw(): return load_raw(RAW)


@pytest.fixture(scope='module')
def X(raw): return make_features(raw)


def test_cyclical():
    s, c = cyclical([0, 6, 12, 18, 24], 24)
    np.testing.assert_allclose(s, [0, 1, 0, -1, 0], atol=1e-12)
    np.testing.assert_allclose(c, [1, 0, -1, 0, 1], atol=1e-12)


def test_shape_and_columns(raw, X):
    assert X.shape == (len(raw), len(FEATURES)) == (8645, 12)
    assert list(X.columns) == FEATURES
    assert X.index.equals(raw.index)
    assert (X.dtypes == 'float64').all()


def test_no_nan(X):
    assert not X.isna().any().any()


def test_cyclical_encodings(raw, X):
    assert X[CYCLICAL].abs().le(1).all().all()
    np.testing.assert_allclose(X.hr_sin ** 2 + X.hr_cos ** 2, 1)
    np.testing.assert_allclose(X.month_sin ** 2 + X.month_cos ** 2, 1)
    # the same hour of the day, the same encoding; midnight and 11 pm are neighbours
    assert X[raw.hr == 0].hr_cos.eq(1).all()
    assert X[raw.hr == 23].hr_cos.min() > 0.96


def test_weather_is_ordinal(raw, X):
    assert dict(zip(raw.weathersit, X.weather)) == {'clear': 1, 'cloudy/misty': 2, 'light rain/snow': 3, 'heavy rain/snow': 4}


def test_target(raw):
    y = target(raw)
    assert y.name == TARGET and y.dtype == 'float64' and y.sum() == raw.bikers.sum()


def test_single_row_as_serving_sends_it(raw, X):
    one = raw.iloc[[4000]]
    out = make_features(one)
    assert list(out.columns) == FEATURES
    pd.testing.assert_frame_equal(out, X.iloc[[4000]])
    # only the inputs, the month by its name, a fresh index: the same values
    request = pd.DataFrame([one[[c if c != 'month' else 'mnth' for c in INPUTS]].iloc[0].to_dict()])
    pd.testing.assert_frame_equal(make_features(request), X.iloc[[4000]].reset_index(drop=True))


def test_bad_requests_are_refused(raw):
    one = raw.iloc[[4000]]
    with pytest.raises(ValueError, match='unknown weathersit'): make_features(one.assign(weathersit='fog'))
    with pytest.raises(KeyError, match='temp'): make_features(one.drop(columns='temp'))


def test_model_fits_features(raw, X):
    m = make_model(max_iter=20).fit(X, target(raw))
    assert m.predict(make_features(raw.iloc[[0]])).shape == (1,)
