"""Triton kernels of scaled_rope: rotation (rope), fused attention (attention), KV-cache decode (decode)."""
import os


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


if os.environ.get("TRITON_INTERPRET", "0") == "1":
    _fix_interpreter_loop_bounds()
