"""Context parallelism (scaled_rope.distributed) on CPU with gloo, against the single-process reference on the whole
sequence: outputs, lse and the gradients of q, k and v (through out and lse), for 2 and 4 processes.

Spawning processes is the slow part, so each world size is spawned once (a module fixture) and runs every case of
its list; each case's verdict (per rank) comes back through a file and is one parametrized test here. Pure helpers
(sharding, the lse merge, the per-block gradient formula, the plan, the global-length rope) are tested in this
process.
"""
from __future__ import annotations

import datetime
import json
import os
import tempfile
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import GOLD_DTYPE, LONG, SHORT, assert_close_to_gold, random_inputs
from scaled_rope import RopeScaling, reference
from scaled_rope import distributed as sd
from scaled_rope.distributed import (context_parallel_attention, fixed_length_rope, sequence_indices, shard_sequence,
                                     ulysses_attention, unshard_sequence)

D = 16


def make_rope(name: str):
    pairs = D // 2
    return {
        "none": None,
        "default": RopeScaling.default(D),
        # original length 16: a 32-token sequence crosses it, while rank 0's own keys (contiguous) do not
        "longrope": RopeScaling.longrope(D, 16, 256, SHORT[:pairs], LONG[:pairs], n_hat=4),
        "longrope_partial": RopeScaling.longrope(D, 16, 256, SHORT[:4], LONG[:4], n_hat=3, rotary_dim=8,
                                                 layout="interleaved"),
        "dynamic_ntk": RopeScaling.dynamic_ntk(D, 4.0, 12),
        "yarn": RopeScaling.yarn(D, 8.0, 16),
    }[name]


# ---- cases run in the spawned groups --------------------------------------------------------------------------
# scheme, sharding of the data, B, N (whole sequence), Hq, Hkv, rope, keywords, positions, lse gradient, backend
def case(scheme="ring", sharding="zigzag", batch=1, n=32, hq=2, hkv=2, rope="default", positions="default",
         lse_grad=True, backend="reference", trace=None, dtype=torch.float32, **kwargs):
    return dict(scheme=scheme, sharding=sharding, batch=batch, n=n, hq=hq, hkv=hkv, rope=rope, positions=positions,
                lse_grad=lse_grad, backend=backend, trace=trace, dtype=dtype, kwargs=kwargs)


CASES_2 = {
    "ring-causal-zigzag": case(causal=True),
    "ring-causal-contiguous-gqa": case(sharding="contiguous", hq=4, hkv=2, causal=True),
    "ring-longrope-crossing-contiguous": case(sharding="contiguous", rope="longrope", causal=True),
    "ring-longrope-partial-interleaved-zigzag": case(rope="longrope_partial", causal=True, batch=2),
    "ring-longrope-short-only": case(sharding="contiguous", n=16, rope="longrope", causal=True),
    "ring-dynamic-ntk-contiguous": case(sharding="contiguous", n=24, rope="dynamic_ntk", causal=True),
    "ring-window": case(sharding="contiguous", causal=True, window=5, hq=4, hkv=1),
    "ring-window-noncausal": case(causal=False, window=7),
    "ring-noncausal-scale": case(causal=False, softmax_scale=0.3, rope="yarn"),
    "ring-rerope-logn": case(causal=True, rerope_window=6, logn_base=8.0),
    "ring-leaky-gqa": case(sharding="contiguous", causal=True, rerope_window=6, rerope_leak=4.0, hq=4, hkv=2),
    "ring-nope": case(rope="none", causal=True),
    "ring-bfloat16-longrope-gqa": case(rope="longrope", causal=True, hq=4, hkv=2, dtype=torch.bfloat16),
    "ulysses-bfloat16": case(scheme="ulysses", rope="longrope", causal=True, dtype=torch.bfloat16),
    # B=2: row 0 stays under LongRoPE's original length (short set), row 1 crosses it (long set); row 0's first
    # queries precede every key (no allowed key: out 0, lse -inf)
    "ring-explicit-rows": case(sharding="contiguous", batch=2, n=12, rope="longrope", positions="rows",
                               causal=True),
    "ring-explicit-shuffled-window": case(sharding="contiguous", positions="shuffled", causal=True, window=9,
                                          rerope_window=4),
    "ring-no-lse-grad": case(causal=True, lse_grad=False, rope="longrope"),
    "ring-triton-kernel-backward": case(n=32, causal=True, lse_grad=False, backend="triton", rope="longrope"),
    "ring-triton-lse-grad": case(sharding="contiguous", n=32, causal=True, backend="triton",
                                 rerope_window=5, rerope_leak=2.0),
    "ulysses-causal-zigzag-longrope": case(scheme="ulysses", rope="longrope", causal=True),
    "ulysses-gqa-leaky-explicit": case(scheme="ulysses", sharding="contiguous", hq=4, hkv=2, positions="rows",
                                       n=12, batch=2, rope="default", causal=True, rerope_window=4,
                                       rerope_leak=3.0),
    "ulysses-window-noncausal": case(scheme="ulysses", causal=False, window=6, logn_base=4.0),
    "trace-zigzag-causal": case(causal=True, trace="zigzag"),
}

CASES_4 = {
    "ring-causal-zigzag": case(causal=True),
    "ring-causal-contiguous-gqa-longrope": case(sharding="contiguous", hq=4, hkv=2, rope="longrope", causal=True),
    "ring-leaky-zigzag": case(causal=True, rerope_window=7, rerope_leak=2.0, n=48),
    # window 6: rank r's first query segment and rank r-1's first key segment are exactly 5 apart (one pair in)
    "ring-window-contiguous": case(sharding="contiguous", causal=True, window=6, trace="window"),
    "ring-explicit-rows": case(sharding="zigzag", batch=2, n=16, rope="longrope", positions="rows", causal=True),
    "ring-noncausal": case(causal=False, rope="dynamic_ntk"),
    "ulysses-causal-zigzag-gqa": case(scheme="ulysses", hq=8, hkv=4, rope="longrope", causal=True),
    "trace-contiguous-causal": case(sharding="contiguous", causal=True, trace="contiguous"),
    "trace-zigzag-causal": case(causal=True, trace="zigzag"),
}


def full_positions(spec, seed):
    """Whole-sequence (q, k) positions (B, N), or (None, None) for the defaults."""
    batch, n = spec["batch"], spec["n"]
    if spec["positions"] == "default":
        return None, None
    if spec["positions"] == "rows":
        k_pos = torch.stack([torch.arange(n) + 3, torch.arange(n) + 10])[:batch]
        q_pos = torch.stack([torch.arange(n), torch.arange(n) + 10])[:batch]
        return q_pos, k_pos
    if spec["positions"] == "shuffled":  # tokens in a random order, with gaps
        generator = torch.Generator().manual_seed(seed)
        pos = torch.stack([torch.randperm(n, generator=generator) * 2 for _ in range(batch)])
        return pos, pos.clone()
    raise AssertionError(spec["positions"])


def reference_run(q, k, v, rope, dout, dlse, compute_dtype, **kwargs):
    q, k, v = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    out, lse = reference.attention(q, k, v, rope, compute_dtype=compute_dtype, **kwargs)
    loss = (out * dout.to(out.dtype)).sum()
    if dlse is not None:
        loss = loss + (torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)) * dlse).sum()
    loss.backward()
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


def run_case(name, spec, rank, world, seed):
    dtype = spec["dtype"]
    rope = make_rope(spec["rope"])
    q, k, v = random_inputs(spec["batch"], spec["n"], spec["n"], spec["hq"], spec["hkv"], D, dtype, seed=seed)
    generator = torch.Generator().manual_seed(seed + 7)
    dout = torch.randn(q.shape, generator=generator).to(dtype)
    dlse = torch.randn(spec["batch"], spec["hq"], spec["n"], generator=generator) if spec["lse_grad"] else None
    q_pos, k_pos = full_positions(spec, seed)
    kwargs = dict(spec["kwargs"])
    full_kwargs = dict(kwargs, q_positions=q_pos, k_positions=k_pos)
    gold_dtype = GOLD_DTYPE[dtype]
    gold = reference_run(*(x.to(gold_dtype) for x in (q, k, v)), rope, dout.to(gold_dtype), dlse, gold_dtype,
                         **full_kwargs)
    base = reference_run(q, k, v, rope, dout, dlse, dtype, **full_kwargs)

    sharding = spec["sharding"]

    def shard(x, dim=1):
        return shard_sequence(x, rank, world, sharding=sharding, dim=dim)

    local = [shard(x).requires_grad_(True) for x in (q, k, v)]
    call_kwargs = dict(kwargs, backend=spec["backend"], return_lse=True)
    if q_pos is None:
        call_kwargs["sharding"] = sharding
    else:
        call_kwargs.update(q_positions=shard(q_pos), k_positions=shard(k_pos))
    fn = context_parallel_attention if spec["scheme"] == "ring" else ulysses_attention
    sd._TRACE = []
    try:
        out, lse = fn(*local, rope, **call_kwargs)
        loss = (out * shard(dout)).sum()
        if dlse is not None:
            loss = loss + (torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)) * shard(dlse, 2)).sum()
        loss.backward()
        trace = sd._TRACE
    finally:
        sd._TRACE = None
    results = [out.detach(), lse.detach()] + [x.grad for x in local]
    names = ["out", "lse", "dq", "dk", "dv"]
    dims = [1, 2, 1, 1, 1]
    for name_, got, g, b, dim in zip(names, results, gold, base, dims):
        assert_close_to_gold(name_, got, shard(g, dim), shard(b, dim), dtype)
    if spec["positions"] == "rows" and spec["scheme"] == "ring":  # the empty rows are really there
        assert torch.isneginf(gold[1]).any(), "case meant to have rows without keys has none"
    if spec["scheme"] == "ring":  # the kernel path wherever a kernel backend runs the blocks
        want = "kernel" if spec["backend"] == "triton" else "recompute"
        assert [e for e in trace if e[0] == "method"] == [("method", want)], trace[:3]
    if spec["trace"]:
        check_trace(spec, trace, rank, world)


def check_trace(spec, trace, rank, world):
    """What the ring computed and sent, from its trace."""
    calls = [e for e in trace if e[0] == "call"]
    n_local = spec["n"] // world
    half = n_local // 2
    for pass_ in ("fwd", "bwd"):
        mine = [e for e in calls if e[1] == pass_]
        by_src = {}
        for e in mine:
            by_src.setdefault(e[3], []).append(e[4:])
        if spec["trace"] == "zigzag":
            # every block pair is needed; off the diagonal only half of it is computed
            assert sorted(by_src) == list(range(world)), (pass_, by_src)
            for src, parts in by_src.items():
                area = sum((qh - ql) * (kh - kl) for ql, qh, kl, kh in parts)
                if src == rank:
                    assert area == 3 * half * half, (src, parts)
                elif src < rank:
                    assert parts == [(0, n_local, 0, half)], (src, parts)
                else:
                    assert parts == [(half, n_local, 0, n_local)], (src, parts)
        elif spec["trace"] == "contiguous":
            # causal: only earlier blocks and the own one
            assert sorted(by_src) == list(range(rank + 1)), (pass_, by_src)
        elif spec["trace"] == "window":
            # window 6 < N_local: only the own block and the previous rank's
            assert sorted(by_src) == sorted({rank, max(rank - 1, 0)}), (pass_, by_src)
        # the next block's transfer is posted before the current block is computed and awaited after it
        events = [e for e in trace if e[0] in ("call", "post", "wait") and e[1] == pass_]
        for step in range(world):
            step_calls = [i for i, e in enumerate(events) if e[0] == "call" and e[2] == step]
            posts = [i for i, e in enumerate(events) if e[0] == "post" and e[2] == step and e[3] == "kv"]
            waits = [i for i, e in enumerate(events) if e[0] == "wait" and e[2] == step and e[3] == "kv"]
            if step_calls and posts:
                assert posts[0] < step_calls[0] and waits[0] > step_calls[-1], (pass_, step, events)
    kv_sends = [e for e in trace if e[0] == "post" and e[1] == "fwd" and e[4]]
    if spec["trace"] == "contiguous":
        # block s is needed by ranks s..W-1: it travels W-1-s hops; rank r forwards blocks r, r-1, ..., 0 at steps
        # 0..r while r+1 still needs them, i.e. every step but when r is the last rank
        expected = 0 if rank == world - 1 else rank + 1
        assert len(kv_sends) == expected, (rank, kv_sends)
    if spec["trace"] == "window":
        # only block r goes to r+1 (step 0); nothing travels further
        assert len(kv_sends) == (0 if rank == world - 1 else 1), (rank, kv_sends)
        assert all(e[2] == 0 for e in kv_sends)


def check_errors(rank, world):
    """Invalid calls raise ValueError naming the argument, on every rank alike (no hang)."""
    q = torch.randn(1, 4, 2, D)
    k = torch.randn(1, 4, 1, D)
    with pytest.raises(ValueError, match="k/v heads"):
        ulysses_attention(q, k, k, None)
    with pytest.raises(ValueError, match="zigzag"):
        context_parallel_attention(q[:, :3], q[:, :3], q[:, :3], None, sharding="zigzag")
    pos = torch.arange(4).expand(1, 4)
    with pytest.raises(ValueError, match="sharding"):
        context_parallel_attention(q, q, q, None, q_positions=pos, k_positions=pos, sharding="zigzag")
    # ranks that disagree on the local length (explicit positions are exchanged first): all raise alike
    n = 4 + rank
    qq = torch.randn(1, n, 2, D)
    with pytest.raises(ValueError, match="same q N_local"):
        context_parallel_attention(qq, qq, qq, None, q_positions=torch.arange(n).expand(1, n),
                                   k_positions=torch.arange(n).expand(1, n))
    with pytest.raises(TypeError, match="group"):
        context_parallel_attention(q, q, q, None, group="world")
    # the group still works afterwards
    out = context_parallel_attention(q, q, q, None, backend="reference")
    assert out.shape == q.shape
    # gather_sequence puts the shards back together on every rank
    full = torch.arange(2 * 8 * world * 3, dtype=torch.float32).reshape(2, 8 * world, 3)
    for sharding in ("zigzag", "contiguous"):
        mine = shard_sequence(full, rank, world, sharding=sharding)
        assert torch.equal(sd.gather_sequence(mine, sharding=sharding), full)


def worker(rank, world, init_file, out_dir, names):
    """Runs the cases one after another, each in a fresh process group (a case that fails half-way cannot leave
    messages in flight for the next one); writes {case: [verdict, seconds]} for this rank."""
    torch.set_num_threads(1)
    cases = CASES_2 if world == 2 else CASES_4
    verdicts = {}
    for i, name in enumerate(names):
        start = time.time()
        dist.init_process_group("gloo", init_method=f"file://{init_file}.{i}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=30))
        try:
            if name == "errors":
                check_errors(rank, world)
            else:
                run_case(name, cases[name], rank, world, seed=100 + i)
            verdicts[name] = ["ok", time.time() - start]
        except Exception:  # recorded and reported by the test of this case
            verdicts[name] = [traceback.format_exc(), time.time() - start]
        finally:
            dist.destroy_process_group()
        if os.environ.get("SCALED_ROPE_TEST_VERBOSE"):
            print(f"rank {rank}: {name} {verdicts[name][1]:.2f} s {verdicts[name][0]}", flush=True)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(verdicts, f)


def spawn(world, names, timeout=300):
    out_dir = tempfile.mkdtemp(prefix=f"cp{world}-")
    init_file = os.path.join(out_dir, "store")
    context = mp.start_processes(worker, args=(world, init_file, out_dir, names), nprocs=world, join=False,
                                 start_method="spawn")
    deadline = time.time() + timeout
    while not context.join(timeout=1):
        if time.time() > deadline:
            for p in context.processes:
                p.kill()
            raise TimeoutError(f"the {world}-process group did not finish in {timeout} s")
    verdicts = {}
    for rank in range(world):
        with open(os.path.join(out_dir, f"rank{rank}.json")) as f:
            for name, (verdict, seconds) in json.load(f).items():
                verdicts.setdefault(name, {})[rank] = (verdict, seconds)
    return verdicts


@pytest.fixture(scope="module")
def world2():
    return spawn(2, ["errors"] + list(CASES_2))


@pytest.fixture(scope="module")
def world4():
    return spawn(4, list(CASES_4))


def _assert_ok(verdicts, name):
    assert name in verdicts, f"{name} did not run"
    failures = {rank: v for rank, (v, _) in verdicts[name].items() if v != "ok"}
    assert not failures, "\n".join(f"rank {rank}:\n{v}" for rank, v in failures.items())


@pytest.mark.parametrize("name", ["errors"] + list(CASES_2))
def test_two_processes(world2, name):
    _assert_ok(world2, name)


@pytest.mark.parametrize("name", list(CASES_4))
def test_four_processes(world4, name):
    _assert_ok(world4, name)


# ---- single-process tests of the pieces ------------------------------------------------------------------------
@pytest.mark.parametrize("sharding", ["contiguous", "zigzag"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_unshard_round_trip(sharding, world):
    x = torch.randn(2, 8 * world, 3)
    shards = [shard_sequence(x, r, world, sharding=sharding) for r in range(world)]
    assert all(s.shape == (2, 8, 3) for s in shards)
    assert torch.equal(unshard_sequence(shards, sharding=sharding), x)
    # every token exactly once
    idx = torch.cat([sequence_indices(8 * world, r, world, sharding) for r in range(world)])
    assert torch.equal(idx.sort().values, torch.arange(8 * world))


def test_zigzag_layout():
    assert sequence_indices(8, 0, 2, "zigzag").tolist() == [0, 1, 6, 7]
    assert sequence_indices(8, 1, 2, "zigzag").tolist() == [2, 3, 4, 5]
    assert sequence_indices(8, 1, 2, "contiguous").tolist() == [4, 5, 6, 7]
    with pytest.raises(ValueError, match="2 per rank"):
        sequence_indices(6, 0, 2, "zigzag")
    with pytest.raises(ValueError, match="sharding"):
        sequence_indices(8, 0, 2, "striped")


@pytest.mark.parametrize("name", ["longrope", "longrope_partial", "dynamic_ntk"])
@pytest.mark.parametrize("length", [9, 16, 17, 40])
def test_fixed_length_rope_is_exact(name, length):
    """The fixed-frequency rope gives bit-identical attention to the schedule evaluated at `length`."""
    rope = make_rope(name)
    fixed = fixed_length_rope(rope, length)
    assert not fixed.length_dependent
    inv, m = rope.frequencies(length)
    inv_f, m_f = fixed.frequencies(None)
    assert torch.equal(inv, inv_f) and m == m_f
    q, k, v = random_inputs(1, 6, 6, 2, 2, D, torch.float64, seed=length)
    k_pos = torch.tensor([[0, 2, 3, 5, 8, length - 1]])  # n_hat crossing and the row's length
    q_pos = torch.tensor([[1, 3, 4, 6, 9, length - 1]])
    a = reference.attention(q, k, v, rope, q_positions=q_pos, k_positions=k_pos, causal=False)
    b = reference.attention(q, k, v, fixed, q_positions=q_pos, k_positions=k_pos, causal=False)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # a call that sees only early keys: the naive rope would switch sets, the fixed one does not
    early = reference.attention(q, k[:, :3], v[:, :3], fixed, q_positions=q_pos, k_positions=k_pos[:, :3],
                                causal=False)
    want = reference.attention(q, k[:, :3], v[:, :3], rope, q_positions=q_pos, k_positions=k_pos[:, :3],
                               causal=False)
    if name.startswith("longrope") and length > 16:
        assert not torch.allclose(early[0], want[0]), "test meant to cross LongRoPE's original length"


def test_fixed_length_rope_keeps_other_schedules():
    rope = RopeScaling.yarn(D, 4.0, 16)
    assert fixed_length_rope(rope, 1000) is rope
    assert fixed_length_rope(None, 10) is None


def _config(rope, **options):
    opts = dict(causal=True, window=None, softmax_scale=D ** -0.5, rerope_window=None, rerope_leak=None,
                logn_base=None)
    opts.update(options)
    plan = sd._Plan(calls=(), last_hop=(0,), seq_lens=(1,))
    return sd._Config(group=None, rank=0, world=1, peers=(0,), plan=plan, row_groups=((rope, None),),
                      options=opts, backend="reference", acc_dtype=torch.float64)


@pytest.mark.parametrize("options", [dict(), dict(window=3), dict(rerope_window=2, rerope_leak=2.0),
                                     dict(causal=False, logn_base=3.0)])
def test_merge_and_block_gradients_match_full_attention(options):
    """Keys split in two blocks: lse-merged outputs equal full attention (rows with no key in a block, and rows
    with no key at all, included), and the per-block gradient formula summed over the blocks equals the full
    gradients of q, k, v through out and lse."""
    rope = RopeScaling.default(D)
    cfg = _config(rope, **options)
    q, k, v = random_inputs(1, 7, 9, 2, 1, D, torch.float64, seed=3)
    q_pos = torch.tensor([[0, 1, 2, 5, 8, 9, 11]])
    k_pos = torch.tensor([[3, 4, 5, 6, 7, 9, 10, 11, 12]])  # q at 0..2 precede every key
    generator = torch.Generator().manual_seed(5)
    dout = torch.randn(q.shape, generator=generator, dtype=torch.float64)
    dlse = torch.randn(1, 2, 7, generator=generator)
    kw = dict(cfg.options)
    gold = reference_run(q, k, v, rope, dout, dlse, torch.float64, q_positions=q_pos, k_positions=k_pos, **kw)
    assert torch.isneginf(gold[1]).any() == kw["causal"]  # the early queries have no key when causal
    split = 4
    out = torch.zeros(q.shape, dtype=torch.float64)
    lse = torch.full((1, 2, 7), float("-inf"), dtype=torch.float64)
    blocks = [(0, split), (split, 9)]
    for lo, hi in blocks:
        o, l_ = reference.attention(q, k[:, lo:hi], v[:, lo:hi], rope, q_positions=q_pos,
                                    k_positions=k_pos[:, lo:hi], **kw)
        sd._merge(out, lse, o, l_)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out, gold[0], rtol=1e-6, atol=1e-6)  # lse is float32 by contract
    assert torch.equal(torch.isneginf(lse), torch.isneginf(gold[1]))
    torch.testing.assert_close(lse.float(), gold[1], rtol=1e-6, atol=1e-6)
    dq = torch.zeros_like(q)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    for lo, hi in blocks:
        g = sd._grads_recompute(cfg, "reference", q, k[:, lo:hi], v[:, lo:hi], q_pos, k_pos[:, lo:hi], gold[0],
                                gold[1], dout, dlse)
        dq += g[0]
        dk[:, lo:hi] += g[1]
        dv[:, lo:hi] += g[2]
    for got, want in zip((dq, dk, dv), gold[2:]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # and without the lse gradient term the formula drops it
    gold2 = reference_run(q, k, v, rope, dout, None, torch.float64, q_positions=q_pos, k_positions=k_pos, **kw)
    g = [sd._grads_recompute(cfg, "reference", q, k[:, lo:hi], v[:, lo:hi], q_pos, k_pos[:, lo:hi], gold2[0],
                             gold2[1], dout, None) for lo, hi in blocks]
    torch.testing.assert_close(g[0][0] + g[1][0], gold2[2], rtol=1e-5, atol=1e-5)


def test_merge_keeps_empty_rows_empty():
    out = torch.zeros(1, 2, 1, 3)
    lse = torch.full((1, 1, 2), float("-inf"))
    sd._merge(out, lse, torch.zeros(1, 2, 1, 3), torch.full((1, 1, 2), float("-inf")))
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    sd._merge(out, lse, torch.ones(1, 2, 1, 3), torch.tensor([[[float("-inf"), 0.5]]]))
    assert torch.equal(out[0, 0], torch.zeros(1, 3)) and torch.equal(out[0, 1], torch.ones(1, 3))
    assert lse[0, 0, 0] == float("-inf") and lse[0, 0, 1] == 0.5


def test_plan_causal_contiguous_and_window():
    world, n = 4, 8
    ranges = [[[(t * n, t * n + 3), (t * n + 4, t * n + 7)]] for t in range(world)]
    for r in range(world):
        plan = sd._make_plan(ranges, ranges, r, n, n, True, None)
        assert [bool(c) for c in plan.calls] == [s <= r for s in range(world)]
        assert plan.calls[r] == ((0, 4, 0, 4), (4, 8, 0, 8))  # the diagonal: the upper-right quarter skipped
        assert plan.last_hop == (3, 2, 1, 0)
        assert plan.seq_lens == (32,)
    plan = sd._make_plan(ranges, ranges, 2, n, n, True, 3)
    assert [bool(c) for c in plan.calls] == [False, True, True, False]
    assert plan.calls[1] == ((0, 4, 4, 8),)  # the first half of the queries reaches the previous block's end
    assert plan.last_hop == (1, 1, 1, 0)
    # non-causal with no window: everything, whole blocks
    plan = sd._make_plan(ranges, ranges, 0, n, n, False, None)
    assert all(c == ((0, 8, 0, 8),) for c in plan.calls) and plan.last_hop == (3, 3, 3, 3)


def test_may_attend_boundaries():
    # causal: a query at the key's own position is allowed, one before it is not
    assert sd._may_attend((5, 9), (9, 12), True, None)
    assert not sd._may_attend((5, 8), (9, 12), True, None)
    # window w: distance w - 1 is allowed, w is not
    assert sd._may_attend((10, 12), (2, 7), True, 4)
    assert not sd._may_attend((11, 12), (2, 7), True, 4)
    # no causal mask: keys after the query count, and a window bounds only P - Q from above
    assert sd._may_attend((0, 1), (5, 9), False, 2)
    assert not sd._may_attend((20, 21), (5, 9), False, 11)


def test_plan_zigzag_halves():
    world = 4
    ranges = sd._default_ranges(8, world, "zigzag")
    rows = [[r] for r in ranges]
    for r in range(world):
        plan = sd._make_plan(rows, rows, r, 8, 8, True, None)
        for s in range(world):
            if s < r:
                assert plan.calls[s] == ((0, 8, 0, 4),)
            elif s > r:
                assert plan.calls[s] == ((4, 8, 0, 8),)
        assert plan.last_hop == (3, 3, 3, 3)


def test_one_process_group(tmp_path):
    """World size 1: both schemes reduce to one local call (no messages), gradients included."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        rope = make_rope("longrope")
        q, k, v = random_inputs(1, 24, 24, 2, 1, D, torch.float32, seed=9)
        gold = reference_run(q, k, v, rope, torch.ones_like(q), None, torch.float32, causal=True)
        for fn in (context_parallel_attention, ulysses_attention):
            leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
            out, lse = fn(*leaves, rope, causal=True, backend="reference", return_lse=True)
            out.sum().backward()
            torch.testing.assert_close(out, gold[0], rtol=2e-6, atol=2e-6)
            torch.testing.assert_close(lse, gold[1], rtol=2e-6, atol=2e-6)
            for got, want in zip((x.grad for x in leaves), gold[2:]):
                torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    finally:
        dist.destroy_process_group()


def test_validation_without_a_group():
    q = torch.randn(1, 4, 2, D)
    with pytest.raises(ValueError, match="group"):
        context_parallel_attention(q, q, q, None)
    with pytest.raises(ValueError, match="rerope_leak"):
        context_parallel_attention(q, q, q, RopeScaling.default(D), rerope_leak=2.0)
    with pytest.raises(ValueError, match="window"):
        ulysses_attention(q, q, q, None, window=0)
    with pytest.raises(ValueError, match="backend"):
        context_parallel_attention(q, q, q, None, backend="fast")
    with pytest.raises(ValueError, match="sharding"):
        context_parallel_attention(q, q, q, None, sharding="striped")
    with pytest.raises(ValueError, match="q_positions"):
        context_parallel_attention(q, q[:, :2], q[:, :2], None)
    with pytest.raises(ValueError, match="heads"):
        kv3 = torch.randn(1, 4, 3, D)
        context_parallel_attention(q, kv3, kv3, None)
