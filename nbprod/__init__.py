__version__ = "0.1.0"

# The public API, imported lazily: `from nbprod import track` in a kernel must not pay for papermill.
_API = {'run_notebook': 'nbprod.runs', 'list_runs': 'nbprod.runs', 'RunResult': 'nbprod.runs',
        'load_settings': 'nbprod.settings', 'find_project': 'nbprod.settings', 'Settings': 'nbprod.settings',
        'new_project': 'nbprod.scaffold', 'check_project': 'nbprod.checks',
        'run_pipeline': 'nbprod.pipeline_runs', 'PipelineResult': 'nbprod.pipeline_runs',
        'run_sweep': 'nbprod.sweeps', 'SweepResult': 'nbprod.sweeps'}
__all__ = ['__version__', 'track', 'errors', *_API]

def __getattr__(name):
    import importlib
    if name in _API: return getattr(importlib.import_module(_API[name]), name)
    if name in ('track', 'errors'): return importlib.import_module(f'nbprod.{name}')
    raise AttributeError(f"module 'nbprod' has no attribute {name!r}")
