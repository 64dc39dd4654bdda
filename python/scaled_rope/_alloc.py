"""Output allocation shared by the kernel launchers, and the caches of small derived tensors they keep.

With SCALED_ROPE_POISON=1 (the test suites set it) outputs start as NaN, so an element a kernel forgets to
write fails the comparison instead of passing by luck.
"""
from __future__ import annotations

import threading

import torch

from ._env import poison_outputs


def empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    if poison_outputs() and dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def kept(cache: dict, key, device: torch.device, make, limit: int):
    """cache[key], made by make() on a miss and kept for later calls (the cache is emptied when it holds `limit`
    entries). Nothing is kept from a CUDA-graph capture: it records the kernels that would fill a tensor without
    running them. On CUDA a miss is made on a helper thread: cudagraph trees (torch.compile(mode="reduce-overhead"))
    route every allocation of the thread they warm up on to their graph pool and refuse to replay while a tensor
    made there outlives the call, as a cache entry does."""
    found = cache.get(key)
    if found is not None:
        return found
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return make()
    found = _made_off_thread(device, make) if device.type == "cuda" else make()
    if len(cache) >= limit:
        cache.clear()
    cache[key] = found
    return found


def _made_off_thread(device: torch.device, make):
    """make() run on a fresh thread (its own stream, after the caller's stream's pending work) and finished."""
    ready = torch.cuda.current_stream(device).record_event()
    result: list = []

    def run() -> None:
        try:
            with torch.cuda.device(device):
                torch.cuda.current_stream().wait_event(ready)
                result.append(make())
                torch.cuda.current_stream().synchronize()
        except BaseException as error:  # handed to the caller's thread
            result.append(error)

    worker = threading.Thread(target=run, name="scaled_rope-cache")
    worker.start()
    worker.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]
