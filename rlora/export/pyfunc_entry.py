"""Model code for ``mlflow.pyfunc`` (models from code: no pickled object is stored or loaded)."""
import mlflow.models

from rlora.export.pyfunc import RloraAdapterModel

mlflow.models.set_model(RloraAdapterModel())
