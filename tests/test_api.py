"""The public Python API is what `nbprod.__all__` says, and importing nbprod stays cheap for kernels."""
import subprocess, sys

import nbprod


def test_public_api_is_guarded():
    assert sorted(nbprod.__all__) == sorted(['__version__', 'track', 'errors', 'run_notebook', 'list_runs', 'RunResult',
                                             'load_settings', 'find_project', 'Settings', 'new_project', 'check_project',
                                             'run_pipeline', 'PipelineResult', 'run_sweep', 'SweepResult'])
    for name in nbprod.__all__: assert getattr(nbprod, name) is not None


def test_import_does_not_pull_in_heavy_libraries():
    code = "import sys, nbprod; from nbprod import track; print(sorted(m for m in ('mlflow', 'papermill', 'sklearn', 'ray') if m in sys.modules))"
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == '[]'
