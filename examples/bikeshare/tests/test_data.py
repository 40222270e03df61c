"The checks of the raw table (bikeshare.data, from nbs/00_ingest.ipynb): the real file passes; each kind of bad data is named."
import hashlib
from pathlib import Path
import pandas as pd
import pytest
from bikeshare.data import MONTHS, SCHEMA, DataCheckError, check_data, load_raw

RAW = Path(__file__).resolve().parent.parent/'data'/'Bikeshare.csv'
SHA256 = 'ac6950ae6f11efcc69c29d6bb13e8881c001e27d36434660d59444a1414f712c'  # as in data/README.md


def sha256(path): return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope='module')
def raw():
    before = sha256(RAW)
    assert before == SHA256, "data/Bikeshare.csv is not the vendored file"
    yield load_raw(RAW)
    assert sha256(RAW) == before, "the tests must not modify data/Bikeshare.csv"


@pytest.fixture
def df(raw): return raw.copy()


def failures(df) -> DataCheckError:
    with pytest.raises(DataCheckError) as e: check_data(df)
    return e.value


def test_the_vendored_file_is_documented():
    assert SHA256 in (RAW.parent/'README.md').read_text()


def test_load_raw(raw):
    assert raw.shape == (8645, 16)
    assert list(raw.columns) == ['season', 'mnth', 'month', *list(SCHEMA)[2:]]
    assert raw.dtypes['hr'] == 'int64' and raw.dtypes['temp'] == 'float64' and raw.dtypes['month'] == 'int64'
    assert pd.api.types.is_string_dtype(raw['mnth']) and pd.api.types.is_string_dtype(raw['weathersit'])
    assert sorted(raw.month.unique()) == list(range(1, 13))
    assert (raw.month == raw.mnth.map(MONTHS)).all()
    assert raw.groupby('month').size().sum() == 8645


def test_real_data_passes(raw):
    assert check_data(raw) is raw


def test_missing_column(df):
    e = failures(df.drop(columns=['windspeed', 'casual']))
    assert e.checks == ['every SCHEMA column present']
    assert e.failures[0].count == 2 and 'windspeed, casual' in str(e)


@pytest.mark.parametrize('col,value,kind', [('temp', 'warm', 'float'), ('hr', 'noon', 'int'), ('casual', 2.5, 'int')])
def test_wrong_dtype(df, col, value, kind):
    df[col] = df[col].astype('object')
    df.loc[3, col] = value
    e = failures(df)
    assert f'{col} has {kind} values' in e.checks[0]
    assert e.failures[0].count == 1 and f'row 3 ({col}={value!r})' in str(e)


def test_wrong_dtype_of_a_text_column(df):
    e = failures(df.assign(weathersit=1))
    assert e.checks == ['weathersit has str values (found int64)'] and e.failures[0].count == len(df)


def test_hour_24(df):
    df.loc[5, 'hr'] = 24
    e = failures(df)
    assert e.checks == ['hr in 0..23'] and 'row 5 (hr=24)' in str(e)


def test_temp_above_1(df):
    df.loc[7, 'temp'] = 1.5
    e = failures(df)
    assert e.checks == ['temp in [0, 1]'] and 'row 7 (temp=1.5)' in str(e)


@pytest.mark.parametrize('col', ['atemp', 'hum', 'windspeed'])
def test_weather_measures_in_0_1(df, col):
    df.loc[0, col] = -0.1
    assert failures(df).checks == [f'{col} in [0, 1]']


def test_negative_count(df):
    df.loc[11, 'casual'] = -3
    df.loc[11, 'bikers'] = df.loc[11, 'registered'] - 3  # still the sum: only the sign is wrong
    e = failures(df)
    assert e.checks == ['casual >= 0'] and e.failures[0].count == 1


def test_bikers_not_the_sum(df):
    df.loc[[9, 10], 'bikers'] += 1
    e = failures(df)
    assert e.checks == ['bikers == casual + registered'] and e.failures[0].count == 2
    assert 'row 9 (' in str(e) and 'row 10 (' in str(e)


def test_null(df):
    df.loc[4, 'hum'] = None
    e = failures(df)
    assert e.checks == ['no nulls (found in hum)'] and 'row 4 (hum=nan)' in str(e)


def test_null_in_an_integer_column(df):
    df['registered'] = df['registered'].astype('float64')
    df.loc[8, 'registered'] = None
    e = failures(df)
    assert e.checks == ['registered has int values (found float64)', 'no nulls (found in registered)']


def test_duplicate_hour(df):
    e = failures(pd.concat([df, df.iloc[[100]]], ignore_index=True))
    assert e.checks == ['no duplicated (day, hr)'] and e.failures[0].count == 2
    assert 'row 100 (day=5, hr=9), row 8645 (day=5, hr=9)' in str(e)


def test_calendar(df):
    df.loc[0, 'mnth'] = 'Janvier'
    df.loc[1, 'season'] = 5
    df.loc[2, 'weekday'] = 7
    df.loc[3, 'holiday'] = 2
    df.loc[4, 'weathersit'] = 'fog'
    df.loc[df.index[-1], 'mnth'] = 'Nov'  # day 365 is in December
    e = failures(df)
    assert e.checks == ['season in 1..4', 'mnth is a month name', 'day falls in mnth', 'holiday in {0, 1}', 'weekday in 0..6',
                        'weathersit is clear, cloudy/misty, light rain/snow, heavy rain/snow']


def test_every_failure_is_listed(df):
    df.loc[5, 'hr'] = 24
    df.loc[7, 'temp'] = 1.5
    df.loc[9, 'bikers'] += 1
    df.loc[4, 'hum'] = None
    e = failures(df.drop(columns='season'))
    assert e.checks == ['every SCHEMA column present', 'hr in 0..23', 'temp in [0, 1]', 'bikers == casual + registered',
                        'no nulls (found in hum)']
    assert str(e).startswith('5 data checks failed on 8645 rows:\n  - every SCHEMA column present: 1 missing column: season')


def test_empty(raw):
    assert failures(raw.iloc[:0]).checks == ['at least one row']


def test_bad_csv_is_loaded_then_reported(tmp_path):
    "load_raw does not stop at the first bad value: check_data reports them all."
    lines = RAW.read_text().splitlines()
    lines[1] = lines[1].replace('"Jan"', '"Janvier"')
    lines[2] = lines[2].replace(',"1",', ',"24",', 1)
    lines[3] = lines[3].replace(',0.22,', ',cold,', 1)
    bad = tmp_path/'bad.csv'
    bad.write_text('\n'.join(lines) + '\n')
    df = load_raw(bad)
    assert df.loc[0, 'month'] == 0
    e = failures(df)
    assert e.checks == ['temp has float values (found str)', 'mnth is a month name', 'hr in 0..23']
    assert "row 2 (temp='cold')" in str(e) and "row 0 (mnth='Janvier')" in str(e) and 'row 1 (hr=24)' in str(e)


def test_the_error_pickles(df):
    "It crosses process boundaries (a Ray task) intact."
    import pickle
    df.loc[5, 'hr'] = 24
    e = pickle.loads(pickle.dumps(failures(df)))
    assert isinstance(e, DataCheckError) and e.checks == ['hr in 0..23'] and 'row 5 (hr=24)' in str(e)
