"""Triton kernels of scaled_rope: rotation (rope), fused attention (attention), KV-cache decode (decode).

The launchers here receive tensors, rotation tables and plain numbers, already checked by the package's plan
(scaled_rope._plan); of the package they import only the leaf modules _env (switches) and _alloc (outputs).
"""
from .._env import triton_interpret


def _fix_interpreter_loop_bounds():
    """Triton 3.6's interpreter turns a scalar loop bound into an int with int(array of shape (1,)), which numpy
    >= 2.4 rejects (triton-lang/triton#9171, fixed upstream by #9172). Squeeze first; a no-op elsewhere."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_scaled_rope_fix", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched._scaled_rope_fix = True
    interpreter._patch_lang_tensor = patched


if triton_interpret():
    _fix_interpreter_loop_bounds()
