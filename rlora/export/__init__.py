"""Export trained adapters (PEFT adapter, merged model, full multi-head adapter) and register them in
the MLflow model registry as pyfunc models.

    rlora.export.export(source, task=None, format="peft", out=..., data=None, base_model=None) -> Path
    rlora.export.resolve_source(source, tracking_uri=None) -> Path
    rlora.export.register(source, name, alias="champion", tracking_uri=None, task=None) -> Registered
"""
from .api import FORMATS, REPORT_NAME, base_model_name, export
from .errors import ExportError
from .fold import LowRank, average_gates, fold_adapter, fold_layer, relative_logit_error
from .registry import Registered, register, validate_alias, validate_name
from .source import find_adapter_dir, resolve_source

__all__ = ["ExportError", "export", "resolve_source", "find_adapter_dir", "register", "Registered", "FORMATS",
           "REPORT_NAME", "base_model_name", "validate_name", "validate_alias", "LowRank", "fold_layer",
           "fold_adapter", "average_gates", "relative_logit_error"]
