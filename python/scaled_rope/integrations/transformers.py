"""Run transformers' Llama, Mistral, Qwen2, Qwen3 and Phi-3 models on scaled_rope attention.

    from scaled_rope.integrations.transformers import patch_model
    model = patch_model(AutoModelForCausalLM.from_pretrained(...))     # rope read from model.config
    model.generate(...)                                                  # works as before

`patch_model` replaces the forward of every attention layer: q, k, v are projected as transformers does (Qwen3's
q/k RMS norms included) but NOT rotated; k and v go into the cache as they are (the cache holds unrotated keys)
and attention runs through `scaled_rope_attention` (prefill) or `scaled_rope_attention_with_kvcache` (decode),
which rotate on-chip with each row's own frequencies. A LongRoPE row that grows past the original length switches
to the long factors for every cached key at once, with no re-prefill; dynamic NTK rotates the whole cache with the
base of the current length.

Positions. Query positions are the model's position_ids. Every key keeps the position it had when it was written:
the positions of a cache's keys are recorded on the cache object (`DynamicCache` and its sliding-window layers).
Padded tokens (0 in the 2D attention_mask, left padding as generate() makes it, or any other) get key position
PAD = -2**29 and the layer runs with window = 2**29 (or its sliding window): a query at P >= 0 sees a padded key
at distance P + 2**29 >= window, so padded keys are excluded by the window rule while the row's length (largest
key position + 1) is untouched. Rows without padding and with positions 0..T-1 take the fast default positions.

Per-step work happens once per model step, not once per layer: the first layer of a forward works out the query and
key positions (and, for decode steps, one `DecodePlan`: split count, tables, kernel arguments) and the other layers
reuse them; each decode layer then costs one kernel launch. Decode steps over a cache whose keys all sit at their
default positions (no padding) run without a host synchronisation: their position_ids and attention_mask are
checked on the device (`torch._assert_async`), so a step that breaks the pattern fails loudly instead of attending
wrongly.

Caches: `DynamicCache` (with its sliding-window layers) and `StaticCache` (full-attention layers). With a static
cache every step reads the cache's own length tensor, so a decode step has fixed shapes, no host synchronisation
and no allocation that varies: it can be captured in a CUDA graph, and `torch.compile(model.forward,
mode="reduce-overhead", fullgraph=True)` compiles it (the attention is a registered torch.library op). Static caches
take rows without padding (checked on the device); prefill into an empty static cache runs the fused prefill kernel.

Per-layer layouts. `patch_model(..., layers={index: LayerAttention(...)})` gives chosen layers their own window,
NoPE, ReRoPE or log-n settings; `hwfa_layers` builds the hybrid window-full layouts of seed 004 (HWFA: window
layers with RoPE and full NoPE layers with log-n scaling; HWFA2: full layers with RoPE in training, ReRoPE at
inference). Window layers do no work beyond their window (the kernels skip those tiles); their caches still hold
every key.

The model's config gets `_attn_implementation = "scaled_rope"`, registered with transformers' AttentionInterface
and AttentionMaskInterface: the mask handed to the layers is the 2D padding mask (no 4D mask is built; with a
static cache it is padded to the cache's length so that its shape does not change between steps).
`unpatch_model` restores the layers and the config; a cache filled by a patched model holds unrotated keys and
must not be reused by the unpatched model.
"""
from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any

import torch

from .._env import triton_interpret
from .._plan import _check_options

from ..attention import scaled_rope_attention
from ..kvcache import scaled_rope_attention_with_kvcache
from ..scaling import RopeScaling

ATTN_IMPLEMENTATION = "scaled_rope"
# a padded key sits at PAD_POSITION, at distance >= PAD_WINDOW from any query P >= 0, while real distances stay
# below PAD_WINDOW (positions are checked to be < PAD_WINDOW); 2**29 leaves the kernels' int32 arithmetic headroom
PAD_WINDOW = 1 << 29
PAD_POSITION = -PAD_WINDOW
DECODE_MAX_QUERIES = 16  # steps with at most this many new tokens over a cache use the decode kernel
_RECORD = "_scaled_rope_key_positions"
_FAMILIES = "Llama, Mistral, Qwen2, Qwen3 and Phi-3"


def _supported_attention_classes() -> tuple[type, ...]:
    from transformers.models.llama.modeling_llama import LlamaAttention
    from transformers.models.mistral.modeling_mistral import MistralAttention
    from transformers.models.phi3.modeling_phi3 import Phi3Attention
    from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention
    from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention

    return LlamaAttention, MistralAttention, Qwen2Attention, Qwen3Attention, Phi3Attention


# ---- state ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerAttention:
    """How one patched layer attends, overriding the model-wide settings of `patch_model` for that layer.

    window: keys at distance >= window are not attended (the kernels do no work beyond it); None: the model's own
    (a config sliding window, else full attention). rope: False for NoPE (q and k not rotated). rerope_window,
    rerope_leak, logn_base: as in `scaled_rope_attention`, for this layer (they replace the model-wide values).
    """

    window: int | None = None
    rope: bool = True
    rerope_window: int | None = None
    rerope_leak: float | None = None
    logn_base: float | None = None


def hwfa_layers(num_layers: int, window: int, full_layers=(-1,), *, full: str = "nope",
                logn_base: float | None = None, rerope_window: int | None = None) -> dict[int, LayerAttention]:
    """Per-layer settings of the hybrid window-full attention layouts (seed 004, posts 9 and 14), for
    `patch_model(..., layers=...)`.

    Every layer attends within `window` with RoPE, except those in `full_layers` (indices; negative counts from
    the end), which attend to every key:
      full="nope"    HWFA: no rotation, log-n logit scaling with `logn_base` (the training length, as the post
                     scales by log_{L_train} n)
      full="rope"    HWFA2 in training: plain RoPE
      full="rerope"  HWFA2 at inference: ReRoPE with `rerope_window` (the post takes the training window)
    """
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers <= 0:
        raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
    if full not in ("nope", "rope", "rerope"):
        raise ValueError(f"full must be 'nope', 'rope' or 'rerope', got {full!r}")
    if full == "rerope" and rerope_window is None:
        raise ValueError("full='rerope' needs rerope_window")
    if full != "rerope" and rerope_window is not None:
        raise ValueError(f"rerope_window is for full='rerope', not full={full!r}")
    chosen = set()
    for index in full_layers:
        if isinstance(index, bool) or not isinstance(index, int) or not -num_layers <= index < num_layers:
            raise ValueError(f"full_layers must hold layer indices in [-{num_layers}, {num_layers}), got {index!r}")
        chosen.add(index % num_layers)
    full_setting = {"nope": LayerAttention(rope=False, logn_base=logn_base),
                    "rope": LayerAttention(logn_base=logn_base),
                    "rerope": LayerAttention(rerope_window=rerope_window, logn_base=logn_base)}[full]
    return {i: full_setting if i in chosen else LayerAttention(window=window) for i in range(num_layers)}


@dataclass
class _Patch:
    """What a patched model runs with, shared by its attention layers."""

    rope: RopeScaling
    rerope_window: int | None
    rerope_leak: float | None
    logn_base: float | None
    backend: str
    previous_attn_implementation: Any
    layers: dict | None = None          # layer_idx -> LayerAttention (patch_model's `layers`)
    forward_id: int = 0  # bumped by a pre-hook on each model forward
    step: "_Step | None" = None
    hooks: tuple = ()


@dataclass
class _Record:
    """Positions of every key a cache has seen (PAD for padded tokens), stored on the cache object."""

    positions: torch.Tensor | None  # int64 (B, T); None while every row is 0..T-1 (standard)
    standard: bool                  # every row is 0..T-1 with no padding
    has_pad: bool
    length: int                     # T

    def key_positions(self, batch: int, seen: int, device) -> torch.Tensor:
        """int64 (B, seen): the positions of the first `seen` keys."""
        if self.positions is None:
            return torch.arange(seen, device=device).expand(batch, seen)
        return self.positions[:, :seen]


@dataclass
class _Step:
    """One forward pass: its query positions and the positions of all keys, computed once by the first layer."""

    forward_id: int
    position_ids: Any
    cache_id: int
    seen: int
    q_positions: torch.Tensor | None  # int64 (B, n); None for a standard step (seen .. seen + n - 1)
    k_positions: torch.Tensor | None  # int64 (B, T): every key this forward attends to; None when standard
    standard: bool
    has_pad: bool
    total: int = 0                    # T: keys after this forward's tokens are added
    decode: dict = None               # the step's DecodePlans (Triton decode kernel) by layer setting

    def positions(self, batch: int, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(q_positions (B, n), k_positions (B, T)), materialised for a standard step."""
        if self.k_positions is None:
            keys = torch.arange(self.total, device=device).expand(batch, self.total)
            return keys[:, self.total - n:], keys
        return self.q_positions, self.k_positions


def _check_cache(cache) -> None:
    from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

    if not isinstance(cache, DynamicCache):
        raise NotImplementedError(f"patched models support DynamicCache (generate()'s default) and StaticCache, "
                                  f"got {type(cache).__name__}")
    for layer in cache.layers:
        if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer):
            raise NotImplementedError(f"patched models support DynamicLayer and DynamicSlidingWindowLayer cache "
                                      f"layers, got {type(layer).__name__}")


def _static_layer(cache, layer_idx: int):
    """The cache's layer when it is a static one (StaticCache), else None; static sliding-window layers (a ring
    buffer whose slots are not positions) raise NotImplementedError."""
    from transformers.cache_utils import StaticLayer, StaticSlidingWindowLayer

    layers = getattr(cache, "layers", None)
    if layers is None or not isinstance(layers[layer_idx], StaticLayer):
        return None
    layer = layers[layer_idx]
    if isinstance(layer, StaticSlidingWindowLayer):
        raise NotImplementedError("patched models do not support static sliding-window cache layers; use "
                                  "DynamicCache for sliding-window models")
    return layer


def _continuing_step(position_ids, mask, cache, record: _Record, seen: int, batch: int, n: int, device) -> _Step:
    """A decode step over a standard cache: positions seen .. seen + n - 1 and no padding, checked on the device
    (no host synchronisation); a step that breaks the pattern fails its device-side assertion."""
    expected = torch.arange(seen, seen + n, device=device)
    if position_ids is not None:
        if position_ids.dim() != 2 or position_ids.shape[-1] != n or position_ids.shape[0] not in (1, batch):
            raise ValueError(f"position_ids must have shape ({batch}, {n}), got {tuple(position_ids.shape)}")
        torch._assert_async((position_ids.to(device) == expected).all(),
                            "patched model: a decode step's position_ids must continue the cache's positions "
                            "(seen .. seen + n - 1) when the cache holds no padding")
    if mask is not None:
        if mask.dim() != 2 or mask.shape[0] != batch or mask.shape[1] < n:
            raise NotImplementedError(f"patched models take a 2D attention_mask (batch, length) of 0/1; got shape "
                                      f"{tuple(mask.shape)} (custom 4D masks are not supported)")
        torch._assert_async(mask.to(device).bool().all(),
                            "patched model: padding appeared in a decode step of a cache that had none; start the "
                            "generation with the padded prompt instead")
    setattr(cache, _RECORD, _Record(None, True, False, seen + n))
    return _Step(-1, position_ids, id(cache), seen, None, None, True, False, total=seen + n)


def _make_step(position_ids, mask, cache, layer_idx: int, batch: int, n: int, device) -> _Step:
    """Positions of this forward's queries and keys; one host synchronisation for the checks and flags, except for
    decode steps over a standard cache (`_continuing_step`)."""
    seen = 0
    if cache is not None:
        _check_cache(cache)
        seen = cache.get_seq_length(layer_idx)
        record = getattr(cache, _RECORD, None)
        if seen and n <= DECODE_MAX_QUERIES and record is not None and record.standard and \
                record.length == seen and record.positions is None:
            return _continuing_step(position_ids, mask, cache, record, seen, batch, n, device)
    expected = torch.arange(seen, seen + n, device=device)
    if position_ids is None:
        pos = expected.expand(batch, n)
    else:
        if position_ids.dim() != 2 or position_ids.shape[-1] != n or position_ids.shape[0] not in (1, batch):
            raise ValueError(f"position_ids must have shape ({batch}, {n}), got {tuple(position_ids.shape)}")
        pos = position_ids.to(device=device, dtype=torch.int64).expand(batch, n)
    checks = [(pos < 0).any() | (pos >= PAD_WINDOW).any(), (pos != expected).any()]
    if mask is not None:
        if mask.dim() != 2 or mask.shape[0] != batch or mask.shape[1] < n:
            raise NotImplementedError(f"patched models take a 2D attention_mask (batch, length) of 0/1; got shape "
                                      f"{tuple(mask.shape)} (custom 4D masks are not supported)")
        valid = mask[:, -n:].to(device=device, dtype=torch.bool)
        new_keys = torch.where(valid, pos, torch.full_like(pos, PAD_POSITION))
        checks.append((~valid).any())
    else:
        valid = torch.ones_like(pos, dtype=torch.bool)
        new_keys = pos
        checks.append(torch.zeros((), dtype=torch.bool, device=device))
    # positions of the valid tokens must increase along a row (packed sequences restart them: not supported)
    running = torch.cummax(torch.where(valid, pos, torch.full_like(pos, -1)), dim=1).values
    previous = torch.cat([torch.full_like(pos[:, :1], -1), running[:, :-1]], dim=1)
    checks.append((valid & (pos <= previous)).any())
    bad_range, shifted, padded, restarts = torch.stack(checks).tolist()
    if bad_range:
        raise ValueError(f"position_ids must lie in [0, 2**29), got values outside (min "
                         f"{int(pos.min())}, max {int(pos.max())})")
    if restarts:
        raise NotImplementedError("position_ids that do not increase along a row (packed sequences) are not "
                                  "supported by patched models; pass one sequence per row")
    standard, has_pad = not (shifted or padded), bool(padded)
    k_positions = new_keys
    if cache is not None:
        record = getattr(cache, _RECORD, None)
        if record is None:
            if seen:
                raise ValueError("this cache already holds keys that a patched model did not write (rotated keys "
                                 "from an unpatched model?); start from an empty cache")
        else:
            rows = batch if record.positions is None else record.positions.shape[0]
            if rows != batch or record.length < seen:
                raise ValueError(f"the cache's key positions ({rows} rows, {record.length} keys) do not match this "
                                 f"forward (batch {batch}, {seen} cached tokens): was the cache reordered or "
                                 f"filled by an unpatched model?")
            k_positions = torch.cat([record.key_positions(batch, seen, device), new_keys], dim=1)
            standard = standard and record.standard
            has_pad = has_pad or record.has_pad
        setattr(cache, _RECORD, _Record(None if standard else k_positions, standard, has_pad, seen + n))
    return _Step(-1, position_ids, id(cache), seen, pos, k_positions, standard, has_pad, total=seen + n)


def _current_step(patch: _Patch, position_ids, mask, cache, layer_idx, batch, n, device) -> _Step:
    """The step of this forward: made by its first layer, reused by the others (the model's forward pre-hook
    bumps forward_id; an attention layer called on its own gets a fresh step unless given the same position_ids
    object). Computing it again is harmless (the record on the cache is rebuilt from its first `seen` entries),
    only slower."""
    step = patch.step
    if step is not None and position_ids is not None and step.forward_id == patch.forward_id \
            and step.position_ids is position_ids and step.cache_id == id(cache) \
            and step.seen == (cache.get_seq_length(layer_idx) if cache is not None else 0):
        return step
    step = _make_step(position_ids, mask, cache, layer_idx, batch, n, device)
    step.forward_id = patch.forward_id
    patch.step = step
    return step


# ---- the patched attention forward -----------------------------------------------------------------------------
def _project(module, hidden_states: torch.Tensor):
    """q (B, n, Hq, D), k and v (B, n, Hkv, D), unrotated, as the module's own forward computes them."""
    shape = (*hidden_states.shape[:-1], -1, module.head_dim)
    if hasattr(module, "qkv_proj"):  # Phi-3
        qkv = module.qkv_proj(hidden_states)
        q_size = module.config.num_attention_heads * module.head_dim
        kv_size = module.num_key_value_heads * module.head_dim
        q, k, v = qkv[..., :q_size], qkv[..., q_size:q_size + kv_size], qkv[..., q_size + kv_size:]
        return q.view(shape), k.view(shape), v.view(shape)
    q = module.q_proj(hidden_states).view(shape)
    k = module.k_proj(hidden_states).view(shape)
    v = module.v_proj(hidden_states).view(shape)
    if hasattr(module, "q_norm"):  # Qwen3: RMS norm over the head dim, before the rotation
        q, k = module.q_norm(q), module.k_norm(k)
    return q, k, v


def _sliding_window(module) -> int | None:
    if hasattr(module, "sliding_window"):  # Qwen2/Qwen3: per layer type
        return module.sliding_window
    return getattr(module.config, "sliding_window", None)  # Mistral, Phi-3: every layer


def _layer(module, patch: _Patch) -> LayerAttention | None:
    return patch.layers.get(module.layer_idx) if patch.layers else None


def _rope(module, patch: _Patch) -> RopeScaling | None:
    layer = _layer(module, patch)
    return None if layer is not None and not layer.rope else patch.rope


def _window(module, patch: _Patch) -> int | None:
    """The layer's window: its LayerAttention's, else the config's sliding window."""
    layer = _layer(module, patch)
    if layer is not None and layer.window is not None:
        return layer.window
    return _sliding_window(module)


def _options(module, patch: _Patch, window) -> dict:
    layer = _layer(module, patch)
    if layer is None:
        rerope = dict(rerope_window=patch.rerope_window, rerope_leak=patch.rerope_leak, logn_base=patch.logn_base)
    else:
        rerope = dict(rerope_window=layer.rerope_window, rerope_leak=layer.rerope_leak, logn_base=layer.logn_base)
    return dict(causal=True, window=window, softmax_scale=module.scaling, **rerope)


def _decode_kernel_runs(patch: _Patch, q: torch.Tensor) -> bool:
    """Whether a decode step goes straight to the Triton decode kernel (what backend "auto" or "triton" would run
    through scaled_rope_attention_with_kvcache), skipping the public call's per-layer checks and table lookups."""
    if patch.backend not in ("auto", "triton") or q.dtype == torch.float64:
        return False
    if not (q.is_cuda or (q.device.type == "cpu" and triton_interpret() and q.dtype != torch.bfloat16)):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _decode_plan(key, rope: RopeScaling | None, step: _Step, q, k, v, options: dict):
    """The step's DecodePlan for the layers with this key (their LayerAttention and window, which settle rope and
    options), made by the first decode layer with it: tables of each row's length, split count and kernel
    arguments; the other layers reuse it (a layer with other shapes gets its own)."""
    from ..tables import factor_rows, table_set
    from ..triton_kernels.decode import DecodePlan

    shapes = (tuple(q.shape), q.stride(), tuple(k.shape), k.stride(), v.stride())
    plans = step.decode if step.decode is not None else {}
    step.decode = plans
    plan = plans.get(key)
    if plan is not None and plan.shapes[:5] == shapes:
        return plan
    batch, device = q.shape[0], q.device
    seqlens = torch.full((batch,), step.total, dtype=torch.int32, device=device)
    tables, far = None, {}
    if rope is not None:
        # cached tables (selected per row on the device for length-dependent ropes): no table build per step
        tables = table_set(rope, device, lengths=seqlens if rope.length_dependent else None,
                           rerope_window=options["rerope_window"], rerope_leak=options["rerope_leak"])
        if options["rerope_window"] is not None:
            far = dict(q_far_tables=tables.far_q, k_far_tables=tables.far_k)
        tables = factor_rows(tables.near, batch)
    plans[key] = DecodePlan(q, k, v, seqlens, tables, max_seqlen=step.total, **far, **options)
    return plans[key]


def _dynamic_attention(module, patch: _Patch, q, k, v, attention_mask, cache, position_ids):
    """DynamicCache (or no cache): positions from the step; decode steps through the step's DecodePlan."""
    batch, n = q.shape[:2]
    step = _current_step(patch, position_ids, attention_mask, cache, module.layer_idx, batch, n, q.device)
    if cache is not None:
        keys, values = cache.update(k.transpose(1, 2), v.transpose(1, 2), module.layer_idx)
        k, v = keys.transpose(1, 2), values.transpose(1, 2)  # (B, T_layer, Hkv, D) views of the cache
    total, length = step.total, k.shape[1]  # sliding-window layers hold the last `length` keys
    window, rope = _window(module, patch), _rope(module, patch)
    if step.has_pad:
        window = window or PAD_WINDOW
    options = _options(module, patch, window)
    full = step.standard and length == total
    if full and step.seen and n <= DECODE_MAX_QUERIES and patch.backend != "cuda":
        if _decode_kernel_runs(patch, q):
            return _decode_plan((_layer(module, patch), window), rope, step, q, k, v, options)(q, k, v)[0]
        seqlens = torch.full((batch,), total, dtype=torch.int32, device=q.device)
        return scaled_rope_attention_with_kvcache(q, k, v, rope, cache_seqlens=seqlens,
                                                  backend=patch.backend, **options)
    if full:
        return scaled_rope_attention(q, k, v, rope, backend=patch.backend, **options)
    q_positions, k_positions = step.positions(batch, n, q.device)
    return scaled_rope_attention(q, k, v, rope, q_positions=q_positions,
                                 k_positions=k_positions[:, total - length:], backend=patch.backend, **options)


def _static_attention(module, patch: _Patch, layer, q, k, v, attention_mask, cache, position_ids):
    """StaticCache: the cache's slots are the positions (rows without padding, checked on the device). Decode steps
    read the cache's own length tensor: fixed shapes, no host synchronisation, CUDA-graph capturable; prefill into
    an empty cache runs the prefill kernel over the new tokens."""
    batch, n = q.shape[:2]
    compiling = torch.compiler.is_compiling()
    # checked on the host by the first layer only: its synchronisation waits for little queued work there
    if (n > DECODE_MAX_QUERIES and not compiling and module.layer_idx == 0
            and int(layer.cumulative_length if layer.is_initialized else 0)):
        raise NotImplementedError("patched models prefill a StaticCache in one forward from empty (chunked "
                                  "prefill into a static cache is not supported); use DynamicCache")
    keys, values = cache.update(k.transpose(1, 2), v.transpose(1, 2), module.layer_idx)
    total = layer.cumulative_length  # tokens in the cache after this forward's (a 0-d device tensor)
    slots = torch.arange(n, device=q.device) + (total - n)
    if position_ids is not None:
        torch._assert_async((position_ids.to(q.device) == slots).all(),
                            "patched model with a StaticCache: position_ids must be the cache slots (no padding)")
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise NotImplementedError(f"patched models take a 2D attention_mask (batch, length) of 0/1; got shape "
                                      f"{tuple(attention_mask.shape)} (custom 4D masks are not supported)")
        keys_in = torch.arange(attention_mask.shape[1], device=q.device) < total
        torch._assert_async((attention_mask.to(q.device).bool() | ~keys_in).all(),
                            "patched model with a StaticCache: padded rows are not supported; use DynamicCache")
    options, rope = _options(module, patch, _window(module, patch)), _rope(module, patch)
    if n > DECODE_MAX_QUERIES and not compiling:
        return scaled_rope_attention(q, k, v, rope, backend=patch.backend, **options)
    k_all, v_all = keys.transpose(1, 2), values.transpose(1, 2)  # (B, max_len, Hkv, D) views of the cache
    seqlens = total.to(torch.int32).expand(batch).contiguous()
    return scaled_rope_attention_with_kvcache(q, k_all, v_all, rope, cache_seqlens=seqlens,
                                              backend=patch.backend, **options)


def _patched_forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                     past_key_values=None, **kwargs):
    patch: _Patch = self._scaled_rope_patch
    if self.training and self.attention_dropout:
        raise NotImplementedError("attention dropout is not supported by patched models; set "
                                  "config.attention_dropout = 0 or call model.eval()")
    batch, n = hidden_states.shape[:2]
    q, k, v = _project(self, hidden_states)
    position_ids = kwargs.get("position_ids")
    layer = None if past_key_values is None else _static_layer(past_key_values, self.layer_idx)
    if layer is not None:
        out = _static_attention(self, patch, layer, q, k, v, attention_mask, past_key_values, position_ids)
    else:
        out = _dynamic_attention(self, patch, q, k, v, attention_mask, past_key_values, position_ids)
    return self.o_proj(out.reshape(batch, n, -1)), None


# ---- transformers registrations ---------------------------------------------------------------------------------
def _padding_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                  attention_mask=None, **kwargs):
    """Mask function of the "scaled_rope" implementation: the 2D padding mask (batch, kv_length) or None. A mask
    shorter than kv_length (a static cache's length) is padded with zeros, so its shape is the same every step."""
    if attention_mask is None:
        return None
    if attention_mask.shape[-1] < kv_length:
        return torch.nn.functional.pad(attention_mask, (0, kv_length - attention_mask.shape[-1]))
    return attention_mask[:, -kv_length:]


def _no_rotary_embedding(self, x, position_ids=None, *args, **kwargs):
    """A patched model's rotary embedding: its layers rotate on-chip and read no cos/sin, so none are computed (a
    few launches saved per forward, and no length-dependent branch for torch.compile to trace)."""
    return None


def _rotary_embeddings(model) -> list:
    return [m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")]


def _unpatched_layer(module, *args, **kwargs):
    raise NotImplementedError(f"{type(module).__name__} runs with attn_implementation='{ATTN_IMPLEMENTATION}' but "
                              f"was not patched by scaled_rope.integrations.transformers.patch_model (is the config "
                              f"shared with another model?)")


def _new_forward(patch: _Patch):
    def hook(module, args, kwargs):
        if torch.compiler.is_compiling():  # compiled steps keep no per-step state (static caches only)
            return
        patch.forward_id += 1
        patch.step = None  # let go of the previous forward's tensors

    return hook


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, _unpatched_layer)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _padding_mask)


def _phi3_generation_override(model):
    """Stock Phi-3 drops the cache when a sequence first passes the original length (its cached keys were rotated
    with the short factors); a patched model keeps it, so generate() uses the parent's input preparation."""
    from transformers.models.phi3.modeling_phi3 import Phi3ForCausalLM

    if isinstance(model, Phi3ForCausalLM) and \
            type(model).prepare_inputs_for_generation is Phi3ForCausalLM.prepare_inputs_for_generation:
        return super(Phi3ForCausalLM, model).prepare_inputs_for_generation
    return None


# ---- public API ------------------------------------------------------------------------------------------------
def _check_layers(layers, rope: RopeScaling, num_layers: int) -> dict[int, LayerAttention] | None:
    """patch_model's `layers`, checked, with non-negative indices."""
    if layers is None:
        return None
    if not isinstance(layers, dict):
        raise TypeError(f"layers must be a dict of layer index -> LayerAttention, got {type(layers).__name__}")
    checked = {}
    for index, setting in layers.items():
        if isinstance(index, bool) or not isinstance(index, int) or not -num_layers <= index < num_layers:
            raise ValueError(f"layers: keys must be layer indices in [-{num_layers}, {num_layers}), got {index!r}")
        if not isinstance(setting, LayerAttention):
            raise TypeError(f"layers[{index}] must be a LayerAttention, got {type(setting).__name__}")
        _check_options(rope if setting.rope else None, causal=True, window=setting.window, softmax_scale=None,
                       rerope_window=setting.rerope_window, rerope_leak=setting.rerope_leak,
                       logn_base=setting.logn_base, backend="auto")
        if index % num_layers in checked:
            raise ValueError(f"layers: layer {index % num_layers} is given twice (as {index})")
        checked[index % num_layers] = setting
    return checked


def patch_model(model, rope: RopeScaling | None = None, rerope_window: int | None = None,
                rerope_leak: float | None = None, logn_base: float | None = None, backend: str = "auto",
                layers: dict[int, LayerAttention] | None = None):
    """Route the attention layers of a transformers Llama / Mistral / Qwen2 / Qwen3 / Phi-3 model through
    scaled_rope, in place; returns the model.

    rope: a RopeScaling (default: `RopeScaling.from_hf_config(model.config)`, the model's own rope). rerope_window,
    rerope_leak, logn_base: as in `scaled_rope_attention` (ReRoPE / Leaky ReRoPE, log-n logit scaling). backend:
    "auto", "triton", "cuda" or "reference" (decode steps use the KV-cache kernel, which has no "cuda" backend:
    with backend="cuda" they run through `scaled_rope_attention`). layers: {layer index: LayerAttention} for
    layers that attend differently (window, NoPE, their own ReRoPE / log-n settings; negative indices count from
    the end), e.g. `hwfa_layers(...)` for the HWFA layouts. Patching a patched model replaces its settings.
    Phi-3's generate() no longer drops the cache when a sequence passes the original length (no re-prefill).
    Raises NotImplementedError for other architectures.
    """
    classes = _supported_attention_classes()
    attention_layers = [m for m in model.modules() if type(m) in classes]
    if not attention_layers:
        raise NotImplementedError(f"patch_model supports the {_FAMILIES} families of transformers; "
                                  f"{type(model).__name__} has none of their attention layers")
    if rope is None:
        rope = RopeScaling.from_hf_config(model.config)
    elif not isinstance(rope, RopeScaling):
        raise TypeError(f"rope must be a RopeScaling or None, got {type(rope).__name__}")
    head_dims = {m.head_dim for m in attention_layers}
    if head_dims != {rope.head_dim}:
        raise ValueError(f"rope.head_dim ({rope.head_dim}) does not match the model's attention head dim "
                         f"({sorted(head_dims)})")
    _check_options(rope, causal=True, window=None, softmax_scale=None, rerope_window=rerope_window,
                   rerope_leak=rerope_leak, logn_base=logn_base, backend=backend)
    layers_by_index = _check_layers(layers, rope, len(attention_layers))
    from transformers import PreTrainedModel

    previous = getattr(model, "_scaled_rope_patch", None)
    attn_implementation = model.config._attn_implementation
    if previous is not None:
        attn_implementation = previous.previous_attn_implementation
        for handle in previous.hooks:
            handle.remove()
    _register()
    patch = _Patch(rope, rerope_window, rerope_leak, logn_base, backend, attn_implementation, layers_by_index)
    patch.hooks = tuple(m.register_forward_pre_hook(_new_forward(patch), with_kwargs=True)
                        for m in model.modules() if isinstance(m, PreTrainedModel))
    for module in attention_layers:
        module._scaled_rope_patch = patch
        module.forward = types.MethodType(_patched_forward, module)
    for module in _rotary_embeddings(model):
        module._scaled_rope_patch = patch
        module.forward = types.MethodType(_no_rotary_embedding, module)
    model._scaled_rope_patch = patch
    model.config._attn_implementation = ATTN_IMPLEMENTATION
    override = _phi3_generation_override(model)
    if override is not None:
        model.prepare_inputs_for_generation = override
    return model


def unpatch_model(model):
    """Undo `patch_model` in place; returns the model. Caches written while patched hold unrotated keys: drop them."""
    patch = getattr(model, "_scaled_rope_patch", None)
    if patch is None:
        raise ValueError(f"{type(model).__name__} is not patched")
    for module in model.modules():
        if module is not model and getattr(module, "_scaled_rope_patch", None) is patch:
            del module.forward
            del module._scaled_rope_patch
    for handle in patch.hooks:
        handle.remove()
    del model._scaled_rope_patch
    model.__dict__.pop("prepare_inputs_for_generation", None)
    model.config._attn_implementation = patch.previous_attn_implementation
    return model


def is_patched(model) -> bool:
    return getattr(model, "_scaled_rope_patch", None) is not None
