"""A model for serving tests whose latency the request sets (pickled by value: Ray's replicas cannot import tests/)."""
import time

import numpy as np


class Sleepy:
    "Sleeps `wait` seconds (the batch's longest), then predicts 100*temp; a negative temp breaks it."
    def predict(self, X):
        if (X['temp'] < 0).any(): raise ValueError("negative temperature")
        time.sleep(float(X['wait'].max()))
        return np.asarray(X['temp'], dtype='float64') * 100


def register(project, name='sleepy'):
    "Log `Sleepy` to `project`'s store as registered model `name`, version 1 = champion; returns the MLflow client."
    import sys, warnings
    import cloudpickle, mlflow
    import pandas as pd
    from nbprod.serving import _mlflow
    from nbprod.store import experiment_id
    s = project.settings()
    client = _mlflow(s)
    X = pd.DataFrame({'temp': [0.1, 0.5], 'wait': [0.0, 0.0]})
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        with mlflow.start_run(experiment_id=experiment_id(s)), warnings.catch_warnings():
            warnings.simplefilter('ignore')
            mlflow.sklearn.log_model(Sleepy(), name='model', input_example=X, registered_model_name=name, serialization_format='cloudpickle')
    finally: cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    client.set_registered_model_alias(name, 'champion', '1')
    return client
