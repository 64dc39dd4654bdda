"""Decode / chunked prefill over an unrotated KV cache (`scaled_rope_attention_with_kvcache`).

Every case keeps the whole sequence of each row (K, V: (B, max_len, Hkv, D)) and checks the kernel against
`reference.attention` run on that row's prefix with explicit positions (docs/DESIGN.md §6 rule). CPU tier under
TRITON_INTERPRET=1 (float32/float16, small shapes); GPU tier marked `gpu`.
"""
import os

import pytest
import torch

from helpers import GOLD_DTYPE, assert_close_to_gold
from scaled_rope import RopeScaling, reference
from scaled_rope.kvcache import scaled_rope_attention_with_kvcache

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
needs_triton = pytest.mark.skipif(DEVICE == "cpu" and not INTERPRET,
                                  reason="Triton backend needs CUDA or TRITON_INTERPRET=1")

ORIGINAL = 48  # LongRoPE's original length in the small cases


def longrope(dim, rotary_dim=None, layout="half", n_hat=0, original=ORIGINAL):
    pairs = (rotary_dim or dim) // 2
    return RopeScaling.longrope(dim, original, 8 * original, [1.0 + 0.07 * i for i in range(pairs)],
                                [1.3 + 0.9 * i for i in range(pairs)], n_hat=n_hat, rotary_dim=rotary_dim,
                                layout=layout)


def schedules(dim):
    return {
        "default": RopeScaling.default(dim),
        "longrope": longrope(dim),
        "dynamic_ntk": RopeScaling.dynamic_ntk(dim, 4.0, ORIGINAL),
        "yarn": RopeScaling.yarn(dim, 8.0, ORIGINAL),
        "llama3": RopeScaling.llama3(dim, 8.0, ORIGINAL, 1.0, 4.0, base=500000.0),
    }


class Case:
    """Whole sequences of B rows, a cache holding their prefixes, and the new tokens to append."""

    def __init__(self, lens, *, n_new=0, n_q=1, hq=4, hkv=2, dim=64, dtype=torch.float32, page_size=None,
                 seed=0, capacity=None, device=DEVICE):
        g = torch.Generator().manual_seed(seed)
        self.lens, self.n_new, self.n_q, self.dtype = list(lens), n_new, n_q, dtype
        batch, max_len = len(lens), max(max(lens), 1)
        self.k = torch.randn(batch, max_len, hkv, dim, generator=g).to(device=device, dtype=dtype)
        self.v = torch.randn(batch, max_len, hkv, dim, generator=g).to(device=device, dtype=dtype)
        self.q = torch.randn(batch, n_q, hq, dim, generator=g).to(device=device, dtype=dtype)
        capacity = capacity or max_len + 5
        cached = [n - n_new for n in lens]
        self.cache_seqlens = torch.tensor(cached, dtype=torch.int32, device=device)
        nan = float("nan")  # slots past a row's length are NaN: reading them would show
        if page_size is None:
            self.block_table = None
            self.k_cache = torch.full((batch, capacity, hkv, dim), nan, dtype=dtype, device=device)
            self.v_cache = self.k_cache.clone()
            for b, n in enumerate(cached):
                self.k_cache[b, :n] = self.k[b, :n]
                self.v_cache[b, :n] = self.v[b, :n]
        else:
            pages_per_row = -(-capacity // page_size)
            perm = torch.randperm(batch * pages_per_row + 3, generator=g)[:batch * pages_per_row]
            self.block_table = perm.view(batch, pages_per_row).to(device=device, dtype=torch.int32)
            self.k_cache = torch.full((batch * pages_per_row + 3, page_size, hkv, dim), nan, dtype=dtype,
                                      device=device)
            self.v_cache = self.k_cache.clone()
            for b, n in enumerate(cached):
                pos = torch.arange(n, device=device)
                pages = self.block_table[b].long()[pos // page_size]
                self.k_cache[pages, pos % page_size] = self.k[b, :n]
                self.v_cache[pages, pos % page_size] = self.v[b, :n]
        self.k_new = self.v_new = None
        if n_new:
            self.k_new = torch.stack([self.k[b, n - n_new:n] for b, n in enumerate(lens)])
            self.v_new = torch.stack([self.v[b, n - n_new:n] for b, n in enumerate(lens)])

    def run(self, rope, backend="triton", **kwargs):
        return scaled_rope_attention_with_kvcache(
            self.q, self.k_cache, self.v_cache, rope, cache_seqlens=self.cache_seqlens, k_new=self.k_new,
            v_new=self.v_new, block_table=self.block_table, return_lse=True, backend=backend, **kwargs)

    def expected(self, rope, compute_dtype, **kwargs):
        """reference.attention on each row's whole prefix, inputs cast to compute_dtype."""
        outs, lses = [], []
        for b, n in enumerate(self.lens):
            q, k, v = (x[b:b + 1].to(compute_dtype) for x in (self.q, self.k[:, :n], self.v[:, :n]))
            k_pos = torch.arange(n, device=q.device)[None]
            q_pos = torch.arange(n - self.n_q, n, device=q.device)[None]
            out, lse = reference.attention(q, k, v, rope, q_positions=q_pos, k_positions=k_pos,
                                           compute_dtype=compute_dtype, **kwargs)
            outs.append(out)
            lses.append(lse)
        return torch.cat(outs), torch.cat(lses)

    def check(self, rope, backend="triton", **kwargs):
        out, lse = self.run(rope, backend=backend, **kwargs)
        gold = self.expected(rope, GOLD_DTYPE[self.dtype], **kwargs)
        base = self.expected(rope, self.dtype, **kwargs)
        assert_close_to_gold("out", out, gold[0], base[0], self.dtype)
        assert_close_to_gold("lse", lse, gold[1], base[1], self.dtype)
        return out, lse


# ---- CPU tier (interpreter) and GPU: correctness against the reference -------------------------------------
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("page_size", [None, 16])
@pytest.mark.parametrize("name", ["default", "longrope", "dynamic_ntk", "yarn", "llama3"])
def test_ragged_decode_each_schedule(name, page_size, dtype):
    # rows below, at and above LongRoPE's original length (48) and one empty row, in one batch
    case = Case([1, 47, 49, 130, 0], dtype=dtype, page_size=page_size, seed=len(name) + (page_size or 0))
    case.check(schedules(64)[name])


@needs_triton
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("n_new", [0, 1, 3])
def test_gqa_and_append(group, n_new):
    case = Case([20, 61, 97], n_new=n_new, n_q=max(n_new, 1), hq=2 * group, hkv=2, seed=group + 7 * n_new)
    case.check(longrope(64))


@needs_triton
@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_partial_rotary_odd_head_dim(layout):
    dim = 80  # rotary 48 (24 pairs, not a power of two), 32 pass-through dims
    case = Case([33, 70], hq=2, hkv=1, dim=dim, seed=3, page_size=16)
    case.check(longrope(dim, rotary_dim=48, layout=layout))


@needs_triton
def test_n_hat_positions_unscaled():
    case = Case([5, 40, 90], n_q=5, n_new=5, seed=11)
    case.check(longrope(64, n_hat=6))


@needs_triton
def test_no_rope():
    Case([17, 50], seed=5, page_size=32).check(None)


@needs_triton
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [None, 19])
def test_chunked_prefill(causal, window):
    # Nq = Nnew > 1 queries at the end of each row: chunked prefill / speculative verification
    case = Case([9, 64, 101], n_new=9, n_q=9, hq=4, hkv=1, seed=13, page_size=16)
    case.check(longrope(64), causal=causal, window=window, logn_base=32.0)


@needs_triton
@pytest.mark.parametrize("leak", [None, 4.0, 0.25])
@pytest.mark.parametrize("n_q", [1, 6])
def test_rerope_decode(leak, n_q):
    case = Case([6, 40, 120], n_new=n_q, n_q=n_q, seed=17, page_size=16)
    case.check(RopeScaling.default(64), rerope_window=24, rerope_leak=leak)


@needs_triton
def test_rerope_with_window_logn_noncausal_gqa():
    case = Case([4, 50, 93], n_new=4, n_q=4, hq=6, hkv=2, seed=59, page_size=32)
    case.check(RopeScaling.default(64, layout="interleaved"), causal=False, window=45, rerope_window=20,
               rerope_leak=3.0, logn_base=16.0)


@needs_triton
def test_softmax_scale_and_window_decode():
    case = Case([10, 77], seed=19)
    case.check(RopeScaling.default(64), window=30, softmax_scale=0.3)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name", ["longrope n_hat", "yarn interleaved partial"])
def test_xpos_decode_and_chunked_prefill(name, dtype):
    """xPos over the cache: q weighted once, the keys' j-table and the per-tile q shift carry the rest
    (docs/DESIGN.md §3.9); tiles below n_hat rotate per element. Rows cross LongRoPE's original length."""
    rope = longrope(64, n_hat=20) if name == "longrope n_hat" else \
        RopeScaling.yarn(64, 8.0, ORIGINAL, rotary_dim=48, layout="interleaved")
    for n_q in (1, 7):
        case = Case([9, 47, 130], n_new=n_q, n_q=n_q, hq=4, hkv=2, dtype=dtype, page_size=16, seed=61 + n_q)
        case.check(rope, xpos_scale_base=32.0, window=100, logn_base=16.0)


@needs_triton
def test_xpos_chunked_prefill_equals_one_pass():
    """Results depend on distances only: attending a sequence in chunks over the cache (each chunk appended, then
    its queries attend to everything so far) gives the rows of one pass of `scaled_rope_attention` over it."""
    from scaled_rope import scaled_rope_attention

    g = torch.Generator().manual_seed(67)
    q, k, v = (torch.randn(1, 90, h, 64, generator=g).to(DEVICE) for h in (4, 2, 2))
    rope = RopeScaling.default(64)
    whole = scaled_rope_attention(q, k, v, rope, xpos_scale_base=64.0, backend="triton")
    k_cache = torch.full((1, 96, 2, 64), float("nan"), device=DEVICE)
    v_cache = k_cache.clone()
    for start in range(0, 90, 30):
        chunk = scaled_rope_attention_with_kvcache(
            q[:, start:start + 30], k_cache, v_cache, rope, k_new=k[:, start:start + 30],
            v_new=v[:, start:start + 30], cache_seqlens=torch.tensor([start], dtype=torch.int32, device=DEVICE),
            xpos_scale_base=64.0, backend="triton")
        assert torch.allclose(chunk, whole[:, start:start + 30], atol=2e-6), start


@needs_triton
def test_reference_backend_matches():
    case = Case([12, 55], n_new=2, n_q=2, seed=23, page_size=16)
    case.check(longrope(64), backend="reference")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_split_counts_agree(num_splits, dtype):
    # 600 keys: with one split, 19 tiles of 32 walk through exact tile bases (every 8th for half types) and the
    # stepped ones in between
    from scaled_rope.tables import build_tables
    from scaled_rope.triton_kernels.decode import decode_attention

    case = Case([45, 600], seed=29, dtype=dtype)
    rope = longrope(64)
    seqlens = case.cache_seqlens
    tables = build_tables(rope, 2, case.q.device, seq_lens=seqlens)
    out, lse = decode_attention(case.q, case.k_cache, case.v_cache, seqlens, tables, num_splits=num_splits)
    gold = case.expected(rope, GOLD_DTYPE[dtype])
    base = case.expected(rope, dtype)
    assert_close_to_gold("out", out, gold[0], base[0], dtype)
    assert_close_to_gold("lse", lse, gold[1], base[1], dtype)


@needs_triton
def test_window_sets_the_split_count_by_the_window():
    """A windowed decode reads at most window + Nq keys per query: its split count follows that, not the cache
    length (more splits would only add empty programs and a longer merge); the result still matches the reference."""
    from scaled_rope.tables import build_tables
    from scaled_rope.triton_kernels.decode import DecodePlan, _num_sms, choose_num_splits

    case = Case([1500], seed=30, capacity=1600)
    rope = longrope(64)
    tables = build_tables(rope, 1, case.q.device, seq_lens=case.cache_seqlens)
    windowed = DecodePlan(case.q, case.k_cache, case.v_cache, case.cache_seqlens, tables, window=64)
    full = DecodePlan(case.q, case.k_cache, case.v_cache, case.cache_seqlens, tables)
    programs, sms = case.k_cache.shape[2], _num_sms(case.q.device)
    assert windowed.num_splits == choose_num_splits(programs, 64 + 1, sms) < full.num_splits
    case.check(rope, window=64)


@needs_triton
def test_plan_called_again_merges_its_splits_again():
    """A plan's split counters are its own, reset by each launch's merging programs: later calls (a model step's
    other layers) merge as the first did."""
    from scaled_rope.tables import build_tables
    from scaled_rope.triton_kernels.decode import DecodePlan

    case = Case([70, 130], seed=32)
    rope = longrope(64)
    tables = build_tables(rope, 2, case.q.device, seq_lens=case.cache_seqlens)
    plan = DecodePlan(case.q, case.k_cache, case.v_cache, case.cache_seqlens, tables, num_splits=3,
                      config={"BLOCK_N": 16})
    first = plan(case.q, case.k_cache, case.v_cache)
    for _ in range(2):
        again = plan(case.q, case.k_cache, case.v_cache)
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])
    gold, base = case.expected(rope, GOLD_DTYPE[case.dtype]), case.expected(rope, case.dtype)
    assert_close_to_gold("out", first[0], gold[0], base[0], case.dtype)


@needs_triton
def test_plan_falls_back_to_the_jit_call_when_a_launcher_refuses_its_arguments(monkeypatch):
    """A Triton whose compiled-kernel launcher takes other arguments raises TypeError before launching: the plan
    warns once, launches through the JIT call (same result) and makes no more direct launchers."""
    from scaled_rope.tables import build_tables
    from scaled_rope.triton_kernels import decode

    monkeypatch.setattr(decode, "_DIRECT_LAUNCH_FAILED", [])
    case = Case([70, 130], seed=33)
    rope = longrope(64)
    tables = build_tables(rope, 2, case.q.device, seq_lens=case.cache_seqlens)
    plan = decode.DecodePlan(case.q, case.k_cache, case.v_cache, case.cache_seqlens, tables, num_splits=2,
                             config={"BLOCK_N": 16})
    expected = plan(case.q, case.k_cache, case.v_cache)

    def refusing(*args):
        raise TypeError("function takes exactly 80 arguments")

    plan._launch = refusing
    with pytest.warns(RuntimeWarning, match="JIT call"):
        out = plan(case.q, case.k_cache, case.v_cache)
    assert torch.equal(out[0], expected[0]) and torch.equal(out[1], expected[1])
    assert plan._launch is None and decode._DIRECT_LAUNCH_FAILED
    later = decode.DecodePlan(case.q, case.k_cache, case.v_cache, case.cache_seqlens, tables, num_splits=2,
                              config={"BLOCK_N": 16})
    later(case.q, case.k_cache, case.v_cache)
    assert later._launch is None


@needs_triton
def test_paged_and_contiguous_agree():
    from scaled_rope.tables import build_tables
    from scaled_rope.triton_kernels.decode import decode_attention

    rope = longrope(64)
    results = []
    for page_size in (None, 16, 32):
        case = Case([30, 52, 99], seed=31, page_size=page_size, capacity=128)
        tables = build_tables(rope, 3, case.q.device, seq_lens=case.cache_seqlens)
        results.append(decode_attention(case.q, case.k_cache, case.v_cache, case.cache_seqlens, tables,
                                        block_table=case.block_table, num_splits=2, config={"BLOCK_N": 16}))
    for out, lse in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(lse, results[0][1])


@needs_triton
@pytest.mark.parametrize("page_size", [None, 16])
def test_append_writes_cache_in_place(page_size):
    case = Case([10, 33], n_new=4, n_q=4, seed=37, page_size=page_size)
    before_k = case.k_cache.clone()
    case.run(longrope(64))
    for b, n in enumerate(case.lens):
        for p in range(n + 2):
            if page_size is None:
                row, slot = b, p
            else:
                row, slot = int(case.block_table[b, p // page_size]), p % page_size
            expect_k = case.k[b, p] if p < n else before_k[row, slot]
            assert torch.equal(case.k_cache[row, slot], expect_k) or torch.isnan(expect_k).all()
            if p < n:
                assert torch.equal(case.v_cache[row, slot], case.v[b, p])


@needs_triton
def test_generation_crossing_original_length_matches_full_recompute():
    """Decode token by token across LongRoPE's original length: every step equals recomputing the whole
    sequence with the reference (which switches to the long factors for the whole sequence once past it)."""
    rope = longrope(64)
    dtype = torch.float32
    total, start = ORIGINAL + 3, ORIGINAL - 3
    case = Case([start, start + 9], seed=41, capacity=total + 10)
    g = torch.Generator().manual_seed(43)
    batch = 2
    k_all = torch.cat([case.k, torch.randn(batch, total - case.k.shape[1] + 9, 2, 64, generator=g)], 1)
    v_all = torch.cat([case.v, torch.randn(batch, total - case.v.shape[1] + 9, 2, 64, generator=g)], 1)
    q_all = torch.randn(batch, total + 9, 4, 64, generator=g)
    lens = list(case.lens)
    for _ in range(total - start):
        idx = torch.tensor(lens)
        k_new = torch.stack([k_all[b, n:n + 1] for b, n in enumerate(lens)])
        v_new = torch.stack([v_all[b, n:n + 1] for b, n in enumerate(lens)])
        q = torch.stack([q_all[b, n:n + 1] for b, n in enumerate(lens)])
        out, lse = scaled_rope_attention_with_kvcache(
            q, case.k_cache, case.v_cache, rope, cache_seqlens=idx.to(torch.int32), k_new=k_new, v_new=v_new,
            return_lse=True, backend="triton")
        lens = [n + 1 for n in lens]
        for b, n in enumerate(lens):
            full = [reference.attention(q_all[b:b + 1, :n].to(cd), k_all[b:b + 1, :n].to(cd),
                                        v_all[b:b + 1, :n].to(cd), rope, compute_dtype=cd)
                    for cd in (torch.float64, dtype)]
            assert_close_to_gold("out", out[b:b + 1], full[0][0][:, -1:], full[1][0][:, -1:], dtype)
            assert_close_to_gold("lse", lse[b:b + 1], full[0][1][:, :, -1:], full[1][1][:, :, -1:], dtype)
    assert case.lens[0] < ORIGINAL < lens[0]


@needs_triton
@pytest.mark.parametrize("n_q", [1, 3])
def test_positions_near_two_million(n_q):
    """Angles at positions ~2**21 (paged cache whose unread pages all alias one page; a window keeps the read
    to the last keys) against the reference at the same explicit positions."""
    page_size, window, length = 16, 40, 2 ** 21 - 7
    rope = longrope(64, original=4096)
    g = torch.Generator().manual_seed(53)
    n_pages = -(-length // page_size)
    table = torch.zeros(1, n_pages, dtype=torch.int32)
    table[0, -4:] = torch.arange(1, 5, dtype=torch.int32)
    k_cache = torch.randn(5, page_size, 2, 64, generator=g)
    v_cache = torch.randn(5, page_size, 2, 64, generator=g)
    q = torch.randn(1, n_q, 4, 64, generator=g)
    seqlens = torch.tensor([length], dtype=torch.int32)
    out, lse = scaled_rope_attention_with_kvcache(q, k_cache, v_cache, rope, cache_seqlens=seqlens,
                                                  block_table=table, window=window, return_lse=True,
                                                  backend="triton")
    first = length - n_q - window + 1
    pos = torch.arange(first, length)
    pages = table[0].long()[pos // page_size]
    k, v = k_cache[pages, pos % page_size][None], v_cache[pages, pos % page_size][None]
    q_pos = torch.arange(length - n_q, length)[None]
    expected = [reference.attention(q.to(cd), k.to(cd), v.to(cd), rope, q_positions=q_pos, k_positions=pos[None],
                                    window=window, compute_dtype=cd) for cd in (torch.float64, torch.float32)]
    assert_close_to_gold("out", out, expected[0][0], expected[1][0], torch.float32)
    assert_close_to_gold("lse", lse, expected[0][1], expected[1][1], torch.float32)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("page_size", [None, 16])
def test_int64_lengths_and_block_table(backend, page_size):
    """cache_seqlens and block_table as int64 (what torch.tensor([...]) gives) work like int32."""
    case = Case([30, 70], n_new=2, n_q=2, seed=59, page_size=page_size)
    case.cache_seqlens = case.cache_seqlens.long()
    if page_size is not None:
        case.block_table = case.block_table.long()
    case.check(longrope(64), backend=backend)


# ---- device-side length checks (no host synchronisation on CUDA) and cached tables ----------------------------
@needs_triton
@pytest.mark.parametrize("page_size", [None, 16])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_rows_outside_the_cache_read_nothing_and_give_nan(page_size, num_splits):
    # the kernels alone (as the API runs them on CUDA): rows 1 (too long after the append) and 2 (negative) are
    # refused on the device; row 0 is still right and the status flag is cleared
    from scaled_rope.tables import build_tables
    from scaled_rope.triton_kernels.decode import append_to_cache, decode_attention

    rope = longrope(64)
    case = Case([40, 60, 30], n_new=2, n_q=2, seed=43, page_size=page_size, capacity=64)
    case.cache_seqlens[1] = 63  # 63 + 2 > 64
    case.cache_seqlens[2] = -1
    before_k, before_v = case.k_cache.clone(), case.v_cache.clone()
    status = torch.ones(1, dtype=torch.int32, device=case.q.device)
    append_to_cache(case.k_cache, case.v_cache, case.k_new, case.v_new, case.cache_seqlens, case.block_table,
                    status=status)
    tables = build_tables(rope, 3, case.q.device, seq_lens=case.cache_seqlens + 2)
    out, lse = decode_attention(case.q, case.k_cache, case.v_cache, case.cache_seqlens, tables, n_new=2,
                                status=status, block_table=case.block_table, num_splits=num_splits)
    assert int(status) == 0
    assert torch.isnan(out[1:]).all() and torch.isnan(lse[1:]).all()
    changed = ~(torch.eq(case.k_cache, before_k) | (torch.isnan(case.k_cache) & torch.isnan(before_k)))
    rows = changed.flatten(1).any(1).nonzero().flatten().tolist()
    expect_rows = [0] if page_size is None else sorted({int(case.block_table[0, p // page_size]) for p in (38, 39)})
    assert rows == expect_rows  # only row 0's two new tokens were written
    assert torch.equal(torch.isnan(case.v_cache), torch.isnan(before_v) & ~changed)  # V where K was written
    gold = case.expected(rope, GOLD_DTYPE[case.dtype])
    base = case.expected(rope, case.dtype)
    assert_close_to_gold("out", out[:1], gold[0][:1], base[0][:1], case.dtype)
    assert_close_to_gold("lse", lse[:1], gold[1][:1], base[1][:1], case.dtype)


@needs_triton
def test_append_refuses_pages_outside_the_cache():
    from scaled_rope.triton_kernels.decode import append_to_cache

    case = Case([20, 20], n_new=1, seed=47, page_size=16, capacity=32)
    case.block_table[1, 1] = case.k_cache.shape[0]  # one past the last page
    before = case.k_cache.clone()
    status = torch.ones(1, dtype=torch.int32, device=case.q.device)
    append_to_cache(case.k_cache, case.v_cache, case.k_new, case.v_new, case.cache_seqlens, case.block_table,
                    status=status)
    assert int(status) == 0
    page0 = int(case.block_table[0, 1])
    assert torch.equal(case.k_cache[page0, 19 - 16], case.k_new[0, 0])
    mask = torch.ones(case.k_cache.shape[:2], dtype=torch.bool)
    mask[page0, 3] = False
    assert torch.equal(case.k_cache[mask].isnan(), before[mask].isnan())


@pytest.mark.parametrize("name", ["default", "longrope", "dynamic_ntk", "yarn", "llama3", "n_hat", "interleaved",
                                  "longrope_factors"])
@pytest.mark.parametrize("rerope_window, leak", [(None, None), (24, None), (24, 4.0)])
@pytest.mark.parametrize("added", [0, 3])
def test_table_set_equals_build_tables(name, rerope_window, leak, added):
    """The plan's tables (kept per hashable key, selected per row with tensor ops) equal tables built afresh at each
    row's length, for per-row lengths (negative ones included), one length for every row, and none."""
    from scaled_rope.tables import build_tables, table_set

    extra = {"n_hat": longrope(64, n_hat=6), "interleaved": longrope(64, layout="interleaved"),
             "longrope_factors": RopeScaling.longrope(64, ORIGINAL, 8 * ORIGINAL, [1.0] * 32, [1.0] * 32,
                                                      short_attention_factor=1.1, long_attention_factor=1.4)}
    rope = {**schedules(64), **extra}[name]
    if rerope_window is not None and rope.n_hat:
        return
    lens = torch.tensor([-5, 0, 44, 45, 46, 47, 48, 200], dtype=torch.int32)
    batch = lens.shape[0]
    for lengths in (lens, 46, None):
        for _ in range(2):  # the second call comes from the cache
            got = table_set(rope, torch.device("cpu"), lengths=lengths, added=added, rerope_window=rerope_window,
                            rerope_leak=leak)
            seq_lens = None if lengths is None else lengths + added
            sides = (("near", None), ("far_q", "q"), ("far_k", "k")) if rerope_window else (("near", None),)
            assert rerope_window or (got.far_q, got.far_k) == (None, None)
            for side, far in sides:
                tables = getattr(got, side)
                want = build_tables(rope, batch, "cpu", seq_lens=seq_lens, far=far, rerope_window=rerope_window,
                                    rerope_leak=leak)
                for field in ("turns", "offset", "turns_unscaled", "attention_factor"):
                    a, b = getattr(tables, field), getattr(want, field)
                    assert (a is None) == (b is None), (side, field)
                    assert a is None or torch.equal(a.expand_as(b), b), (side, field)
                assert (tables.n_hat, tables.rotary_dim, tables.interleaved) == \
                    (want.n_hat, want.rotary_dim, want.interleaved)
            if rerope_window is not None and leak is None:  # far q with k's attention factor too
                factor = got.far_q.attention_factor
                assert torch.equal(got.far_q_both.attention_factor, factor * factor)
            else:
                assert got.far_q_both is None


# ---- argument checks ----------------------------------------------------------------------------------------
def _args(**over):
    q = torch.randn(2, 1, 4, 64)
    kc = torch.randn(2, 32, 2, 64)
    args = dict(q=q, k_cache=kc, v_cache=kc.clone(), rope=RopeScaling.default(64),
                cache_seqlens=torch.tensor([3, 5], dtype=torch.int32))
    args.update(over)
    return args


def _call(args, **kwargs):
    args = dict(args)
    return scaled_rope_attention_with_kvcache(args.pop("q"), args.pop("k_cache"), args.pop("v_cache"),
                                              args.pop("rope"), **args, **kwargs)


@pytest.mark.parametrize("over, kwargs, word", [
    (dict(cache_seqlens=torch.tensor([3.0, 5.0])), {}, "cache_seqlens"),
    (dict(cache_seqlens=torch.tensor([3], dtype=torch.int32)), {}, "cache_seqlens"),
    (dict(cache_seqlens=torch.tensor([3, 40], dtype=torch.int32)), {}, "capacity"),
    (dict(cache_seqlens=torch.tensor([3, -1], dtype=torch.int32)), {}, "cache_seqlens"),
    (dict(cache_seqlens=torch.tensor([3, 30], dtype=torch.int32),
          k_new=torch.randn(2, 3, 2, 64), v_new=torch.randn(2, 3, 2, 64)), {}, "capacity"),
    (dict(k_new=torch.randn(2, 3, 2, 64)), {}, "v_new"),
    (dict(k_new=torch.randn(2, 3, 1, 64), v_new=torch.randn(2, 3, 1, 64)), {}, "k_new"),
    (dict(v_cache=torch.randn(2, 32, 2, 64, dtype=torch.float16)), {}, "v_cache"),
    (dict(q=torch.randn(2, 1, 3, 64)), {}, "heads"),
    (dict(k_cache=torch.randn(2, 32, 2, 32), v_cache=torch.randn(2, 32, 2, 32)), {}, "head dim"),
    (dict(k_cache=torch.randn(4, 12, 2, 64), v_cache=torch.randn(4, 12, 2, 64),
          block_table=torch.zeros(2, 2, dtype=torch.int32)), {}, "page size"),
    (dict(k_cache=torch.randn(4, 16, 2, 64), v_cache=torch.randn(4, 16, 2, 64),
          block_table=torch.zeros(2, 2)), {}, "block_table"),
    (dict(k_cache=torch.randn(4, 16, 2, 64), v_cache=torch.randn(4, 16, 2, 64),
          block_table=torch.zeros(3, 2, dtype=torch.int32)), {}, "block_table"),
    (dict(k_cache=torch.randn(3, 32, 2, 64), v_cache=torch.randn(3, 32, 2, 64)), {}, "k_cache"),
    ({}, dict(window=0), "window"),
    ({}, dict(rerope_leak=2.0), "rerope_leak"),
    (dict(rope=longrope(64, n_hat=4)), dict(rerope_window=8), "n_hat"),
    ({}, dict(logn_base=1.0), "logn_base"),
    ({}, dict(backend="fast"), "backend"),
])
def test_invalid_arguments_name_the_argument(over, kwargs, word):
    with pytest.raises(ValueError, match=word):
        _call(_args(**over), **kwargs)


def test_cuda_backend_not_implemented():
    with pytest.raises(NotImplementedError, match="backend"):
        _call(_args(), backend="cuda")


def test_reference_backend_on_cpu_appends():
    args = _args(k_new=torch.randn(2, 2, 2, 64), v_new=torch.randn(2, 2, 2, 64))
    out = _call(args, backend="reference")
    assert out.shape == (2, 1, 4, 64) and torch.isfinite(out).all()
    assert torch.equal(args["k_cache"][1, 5:7], args["k_new"][1])


# ---- GPU tier -----------------------------------------------------------------------------------------------
gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("page_size", [None, 16, 64, 256])
def test_gpu_decode_longrope_gqa(dtype, page_size):
    dim, original = 128, 1024
    rope = longrope(dim, original=original)
    case = Case([1, 1000, 1024, 1025, 3000, 4097], hq=32, hkv=8, dim=dim, dtype=dtype, page_size=page_size,
                n_new=1, device="cuda", seed=101)
    case.check(rope)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("leak", [None, 16.0])
def test_gpu_rerope_decode(dtype, leak):
    case = Case([100, 2000, 5000], hq=16, hkv=4, dim=128, dtype=dtype, page_size=64, n_new=1, device="cuda",
                seed=103)
    case.check(RopeScaling.default(128), rerope_window=512, rerope_leak=leak)


@gpu
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_chunked_prefill(causal):
    case = Case([300, 2100], hq=32, hkv=8, dim=128, dtype=torch.bfloat16, page_size=128, n_new=257, n_q=257,
                device="cuda", seed=107)
    case.check(longrope(128, original=1024), causal=causal, window=1500 if causal else None)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_xpos_decode(dtype):
    case = Case([1, 700, 1024, 1025, 3000], hq=32, hkv=8, dim=128, dtype=dtype, page_size=64, n_new=1,
                device="cuda", seed=111)
    case.check(longrope(128, original=1024), xpos_scale_base=512.0)


@gpu
def test_gpu_partial_rotary_interleaved_odd_dim():
    case = Case([777, 1500], hq=8, hkv=8, dim=96, dtype=torch.float16, n_new=1, device="cuda", seed=109)
    case.check(longrope(96, rotary_dim=64, layout="interleaved", original=1024), logn_base=512.0)


@gpu
def test_gpu_api_has_no_host_sync_and_captures_in_a_cuda_graph():
    rope = longrope(128, original=1024)
    case = Case([900, 1030, 2000], hq=16, hkv=4, dim=128, dtype=torch.bfloat16, page_size=64, n_new=1,
                device="cuda", seed=113)
    before_k, before_v = case.k_cache.clone(), case.v_cache.clone()
    expected = case.check(rope)[0]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call below raises
    try:
        out = case.run(rope)[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(out, expected)
    # capture one step (append + attention) and replay it on a fresh copy of the cache
    case.k_cache.copy_(before_k)
    case.v_cache.copy_(before_v)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        case.run(rope)  # warm-up outside the capture (caches, compilation)
    torch.cuda.current_stream().wait_stream(stream)
    case.k_cache.copy_(before_k)
    case.v_cache.copy_(before_v)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = case.run(rope)[0]
    case.k_cache.copy_(before_k)
    case.v_cache.copy_(before_v)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, expected)


@gpu
def test_gpu_plan_reuse_launches_directly_and_keeps_alignment_checks():
    """A DecodePlan's later calls, and later plans of the same specialisation, launch the kernel its first call
    compiled (no JIT call); they still match the reference on fresh tensors, and a q or cache that is not 16-byte aligned (compiled under another
    specialisation) takes the JIT call and is still right."""
    from scaled_rope.tables import build_tables
    from scaled_rope.triton_kernels.decode import DecodePlan

    rope = longrope(128, original=1024)
    first = Case([900, 2000], hq=16, hkv=4, dim=128, dtype=torch.bfloat16, device="cuda", seed=115)
    tables = build_tables(rope, 2, "cuda", seq_lens=first.cache_seqlens)
    plan = DecodePlan(first.q, first.k_cache, first.v_cache, first.cache_seqlens, tables)
    plan(first.q, first.k_cache, first.v_cache)
    assert plan._launch is not None, "no direct launcher on this Triton: the plan makes a JIT call every time"
    for seed in (116, 117):  # same shapes and lengths (the plan's own seqlens), other tensors
        case = Case([900, 2000], hq=16, hkv=4, dim=128, dtype=torch.bfloat16, device="cuda", seed=seed)
        out, lse = plan(case.q, case.k_cache, case.v_cache)
        gold, base = case.expected(rope, GOLD_DTYPE[case.dtype]), case.expected(rope, case.dtype)
        assert_close_to_gold("out", out, gold[0], base[0], case.dtype)
        assert_close_to_gold("lse", lse, gold[1], base[1], case.dtype)
    # a later plan of the same specialisation (a model's next decode step) starts with that launcher
    later = DecodePlan(first.q, first.k_cache, first.v_cache, first.cache_seqlens, tables)
    assert later._launch is plan._launch
    # q at an odd element offset: same shape and strides, another pointer alignment
    case = Case([900, 2000], hq=16, hkv=4, dim=128, dtype=torch.bfloat16, device="cuda", seed=118)
    storage = torch.empty(case.q.numel() + 1, dtype=case.q.dtype, device="cuda")
    shifted = storage[1:].view(case.q.shape)
    shifted.copy_(case.q)
    assert shifted.data_ptr() % 16 and shifted.stride() == case.q.stride()
    out, lse = plan(shifted, case.k_cache, case.v_cache)
    gold, base = case.expected(rope, GOLD_DTYPE[case.dtype]), case.expected(rope, case.dtype)
    assert_close_to_gold("out", out, gold[0], base[0], case.dtype)
    assert_close_to_gold("lse", lse, gold[1], base[1], case.dtype)
