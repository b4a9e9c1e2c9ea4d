"""The hybrid model, registered with transformers' Auto classes on import.

``AutoModelForCausalLM.from_pretrained(path)`` then loads any checkpoint the pipeline writes,
with neither the teacher nor the hub.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from pipeline.models.cache import HybridMambaCache
from pipeline.models.configuration_hybrid import HybridMambaConfig
from pipeline.models.modeling_hybrid import HybridMambaForCausalLM, HybridMambaModel

AutoConfig.register(HybridMambaConfig.model_type, HybridMambaConfig, exist_ok=True)
AutoModelForCausalLM.register(HybridMambaConfig, HybridMambaForCausalLM, exist_ok=True)

__all__ = ["HybridMambaCache", "HybridMambaConfig", "HybridMambaForCausalLM", "HybridMambaModel"]
