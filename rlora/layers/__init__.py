"""The five adapter layers. ``LAYERS[method]`` builds one around an ``nn.Linear``."""
from .align import AlignLoRALinear
from .base import AdapterError, MultiHeadLoRALinear
from .hydra import HydraLoRALinear
from .lora import LoRALinear
from .mtl import MTLLoRALinear
from .rlora import RLoRALinear

LAYERS = {"lora": LoRALinear, "hydra": HydraLoRALinear, "rlora": RLoRALinear, "mtl": MTLLoRALinear,
          "align": AlignLoRALinear}

__all__ = ["AdapterError", "MultiHeadLoRALinear", "LoRALinear", "HydraLoRALinear", "RLoRALinear",
           "MTLLoRALinear", "AlignLoRALinear", "LAYERS"]
