"""scaled_rope: fused attention with scaled rotary position embeddings applied on-chip.

Importing this package never touches a GPU and never fails for lack of the compiled extension.
"""
from . import reference
from ._backends import BackendUnsupported
from .attention import explain_backend, scaled_rope_attention
from .kvcache import scaled_rope_attention_with_kvcache
from .rope import apply_scaled_rope
from .scaling import RopeScaling

__version__ = "0.1.0"
__all__ = ["RopeScaling", "scaled_rope_attention", "scaled_rope_attention_with_kvcache", "apply_scaled_rope",
           "explain_backend", "BackendUnsupported", "reference", "__version__"]
