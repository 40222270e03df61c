"""The pipeline's declaration, and the ingest step run as production runs it: a tracked MLflow run (in a copy of the project,
so that the runs go to a throwaway store) that fails loudly on bad data and leaves no products behind."""
import shutil, tomllib
from pathlib import Path
import pandas as pd
import pytest
from nbprod.pipelines import load_pipeline
from nbprod.runs import run_notebook

ROOT = Path(__file__).resolve().parent.parent
PRODUCTS = ['train.parquet', 'production.parquet']


def pipelines(root): return tomllib.loads((root/'pyproject.toml').read_text())['tool']['nbprod']['pipelines']


def test_pipeline_declaration():
    pipe = load_pipeline(ROOT, 'train', pipelines(ROOT))
    assert pipe.levels() == [['ingest'], ['features'], ['evaluate', 'train']]
    assert pipe.step_parameters('ingest') == {} and pipe.step_parameters('features') == {}
    # the pipeline's model parameters reach both train and evaluate
    assert pipe.step_parameters('train') == pipe.step_parameters('evaluate') == {'learning_rate': 0.1, 'max_iter': 200}
    assert pipe.step_parameters('evaluate', {'max_leaf_nodes': 15})['max_leaf_nodes'] == 15


@pytest.fixture(scope='module')
def project(tmp_path_factory):
    "A copy of the project without its store, data products and reports; nbprod settings from the environment are ignored."
    root = tmp_path_factory.mktemp('project')/'bikeshare'
    shutil.copytree(ROOT, root, ignore=shutil.ignore_patterns('.nbprod', 'processed', 'reports', '__pycache__', '.pytest_cache',
                                                              '.ipynb_checkpoints', '.venv', 'build'))
    with pytest.MonkeyPatch.context() as mp:
        for k in ['NBPROD_PROFILE', 'NBPROD_STORE', 'NBPROD_TRACKING_URI', 'NBPROD_REGISTRY_URI', 'NBPROD_ARTIFACT_ROOT',
                  'NBPROD_EXPERIMENT']:
            mp.delenv(k, raising=False)
        yield root


@pytest.fixture(scope='module')
def bad_csv(project):
    "The raw table with an hour 24 and a temperature of 1.5."
    lines = (project/'data'/'Bikeshare.csv').read_text().splitlines()
    lines[2] = lines[2].replace(',"1",', ',"24",', 1)
    lines[4] = lines[4].replace(',0.24,', ',1.5,', 1)
    bad = project/'data'/'Bikeshare_bad.csv'
    bad.write_text('\n'.join(lines) + '\n')
    return bad


def ingest(project, source, out_dir):
    return run_notebook(project/'nbs'/'00_ingest.ipynb', {'source': str(source), 'out_dir': str(out_dir)}, raise_on_failure=False)


def test_ingest_fails_on_bad_data(project, bad_csv, tmp_path):
    r = ingest(project, bad_csv, tmp_path/'out')
    assert r.status == 'FAILED' and r.run_id
    assert r.error.ename == 'DataCheckError'
    assert '2 data checks failed' in r.error.evalue
    assert 'hr in 0..23: 1 row, e.g. row 1 (hr=24)' in r.error.evalue
    assert 'temp in [0, 1]: 1 row, e.g. row 3 (temp=1.5)' in r.error.evalue
    assert not (tmp_path/'out').exists(), "a failed ingest writes nothing"
    assert Path(r.output_notebook).is_relative_to(project/'.nbprod'), "the run went to the copy's store"
    assert not r.metrics


def test_ingest_writes_products_and_a_failed_run_removes_them(project, bad_csv, tmp_path):
    out = tmp_path/'out'
    r = ingest(project, project/'data'/'Bikeshare.csv', out)
    assert r.status == 'FINISHED', r.error
    assert r.metrics == {'rows': 8645, 'rows_train': 4250, 'rows_production': 4395}
    train, production = (pd.read_parquet(out/p) for p in PRODUCTS)
    assert sorted(train.month.unique()) == [1, 2, 3, 4, 5, 6] and sorted(production.month.unique()) == list(range(7, 13))
    # the next delivery is bad: the run fails, and the stale products are gone so that no later step reads them
    r = ingest(project, bad_csv, out)
    assert r.status == 'FAILED' and r.error.ename == 'DataCheckError'
    assert not any((out/p).exists() for p in PRODUCTS)
