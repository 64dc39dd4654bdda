"""scaled_rope.search: LongRoPE's evolutionary search on a tiny random model (CPU, reference backend), the
rope_parameters round trip, and bench/bench_extension.py --tiny end to end."""
import copy
import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from scaled_rope import RopeScaling  # noqa: E402
from scaled_rope.evaluate import perplexity  # noqa: E402
from scaled_rope.integrations.transformers import is_patched, patch_model, unpatch_model  # noqa: E402
from scaled_rope.search import rope_parameters, search_longrope, search_short_factors  # noqa: E402

transformers.logging.set_verbosity_error()
ROOT = Path(__file__).resolve().parent.parent
VOCAB, HEAD_DIM, ORIGINAL, TARGET = 64, 16, 16, 64
PAIRS = HEAD_DIM // 2
SMALL = dict(population_size=6, parents=3, mutations=2, crossovers=2, generations=2, backend="reference",
             progress=False)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=HEAD_DIM,
                         max_position_embeddings=ORIGINAL, initializer_range=0.3, bos_token_id=None,
                         eos_token_id=None, pad_token_id=None, attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()



@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: threads only add overhead (and a lot of it when the machine is busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def docs():
    g = torch.Generator().manual_seed(1)
    # a repeated random block: copying across distance makes the loss depend on the rope
    return [torch.randint(0, VOCAB, (24,), generator=g).repeat(3)[:TARGET] for _ in range(2)]


def _search(model, docs, **kwargs):
    return search_longrope(model, docs, target_length=TARGET, original_length=ORIGINAL, batch_size=2,
                           **{**SMALL, **kwargs})


def _check_factors(factors, top):
    assert len(factors) == PAIRS
    assert all(x >= 1.0 for x in factors) and max(factors) <= top + 1e-9
    assert all(a <= b for a, b in zip(factors, factors[1:])), factors  # monotone: high -> low frequency
    assert all(abs((x - 1) / 0.01 - round((x - 1) / 0.01)) < 1e-6 for x in factors)  # on the 0.01 grid


def test_search_satisfies_the_constraints_and_returns_the_best(model, docs):
    choices = (0, 2, 4)
    found = _search(model, docs, n_hat_choices=choices, seed=3)
    top = 1.25 * TARGET / ORIGINAL
    _check_factors(found.factors, top)
    assert found.n_hat in choices and found.kind == "long" and found.generations == 2
    for h in found.history:
        _check_factors(h["factors"], top)
        assert h["n_hat"] in choices and math.isfinite(h["fitness"])
    keys = [(tuple(h["factors"]), h["n_hat"]) for h in found.history]
    assert len(keys) == len(set(keys)) == 6 + 2 * 4  # nothing evaluated twice
    assert found.fitness == min(h["fitness"] for h in found.history)
    # the initial population starts from PI, NTK and YaRN
    seeds = {h["origin"]: h["factors"] for h in found.history if h["origin"].startswith("seed:")}
    assert seeds["seed:pi"] == [4.0] * PAIRS
    assert seeds["seed:ntk"][0] == 1.0 and seeds["seed:ntk"][-1] == 4.0 and len(set(seeds["seed:ntk"])) == PAIRS
    assert seeds["seed:yarn"][0] == 1.0 and seeds["seed:yarn"][-1] == 4.0
    # the returned rope is the evaluated candidate: recompute its fitness independently
    rope = found.rope
    assert rope.kind == "longrope" and rope.n_hat == found.n_hat
    assert tuple(rope.param("long_factors")) == found.factors and set(rope.param("short_factors")) == {1.0}
    assert not is_patched(model)  # restored
    patch_model(model, rope=rope, backend="reference")
    try:
        assert perplexity(model, docs, length=TARGET, batch_size=2) == pytest.approx(found.fitness, rel=1e-9)
    finally:
        unpatch_model(model)


def test_search_is_reproducible(model, docs):
    a = _search(model, docs, seed=5)
    b = _search(model, docs, seed=5)
    c = _search(model, docs, seed=6)
    assert a.history == b.history and a.factors == b.factors and a.n_hat == b.n_hat
    assert [h["factors"] for h in a.history] != [h["factors"] for h in c.history]


def test_time_budget_still_evaluates_the_seeds(model, docs):
    """max_seconds=0 stops the search as soon as it may, which is after the PI, NTK and YaRN seeds: the result is
    never worse than its best seed."""
    found = _search(model, docs, seed=5, max_seconds=0.0)
    origins = [h["origin"] for h in found.history]
    assert found.stopped_early and {"seed:pi", "seed:ntk", "seed:yarn"} <= set(origins)
    assert all(o.startswith("seed:") for o in origins)
    assert found.fitness == min(h["fitness"] for h in found.history)


def test_resume_from_checkpoint_continues_identically(model, docs, tmp_path):
    whole = _search(model, docs, seed=7, generations=3)
    path = tmp_path / "search.json"
    first = _search(model, docs, seed=7, generations=3, checkpoint=path, max_evaluations=4)  # stops in generation 0
    assert first.stopped_early and first.evaluations == 4 and path.exists()
    state = json.loads(path.read_text())
    assert state["generation"] == 0 and sum(c["fitness"] is not None for c in state["pending"]) == 4
    second = _search(model, docs, seed=7, generations=1, checkpoint=path)  # finish generation 1 only
    assert not second.stopped_early and second.generations == 1
    third = _search(model, docs, seed=7, generations=3, checkpoint=path, max_evaluations=3)  # stops mid-generation
    assert third.stopped_early
    last = _search(model, docs, seed=7, generations=3, checkpoint=path)
    assert last.history == whole.history and last.factors == whole.factors and last.n_hat == whole.n_hat
    assert last.fitness == whole.fitness and last.generations == 3
    with pytest.raises(ValueError, match="seed"):
        _search(model, docs, seed=8, generations=3, checkpoint=path)


def test_stock_evaluator_agrees_and_the_model_is_restored(model, docs):
    rope_before = copy.deepcopy(model.config.rope_parameters)
    rotary_before = model.model.rotary_emb
    ours = _search(model, docs, n_hat_choices=(0,), seed=2, generations=0)
    stock = _search(model, docs, n_hat_choices=(0,), seed=2, generations=0, evaluator="stock")
    assert [h["factors"] for h in ours.history] == [h["factors"] for h in stock.history]
    for a, b in zip(ours.history, stock.history):  # float32 model: the two rope paths agree to rounding
        assert a["fitness"] == pytest.approx(b["fitness"], rel=2e-5)
    assert model.config.rope_parameters == rope_before and model.model.rotary_emb is rotary_before
    with pytest.raises(ValueError, match="n_hat"):
        _search(model, docs, evaluator="stock")  # transformers has no n̂


def test_a_patched_model_gets_its_patch_back(model, docs):
    rope = RopeScaling.linear(HEAD_DIM, 2.0)
    patch_model(model, rope=rope, backend="reference")
    try:
        _search(model, docs, generations=0, population_size=2)
        assert is_patched(model) and model._scaled_rope_patch.rope == rope
    finally:
        unpatch_model(model)


def test_fallback_progress_lines(model, docs, monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_tqdm(name, *args, **kwargs):
        if name.startswith("tqdm"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tqdm)
    _search(model, docs, generations=1, population_size=3, progress=True)
    lines = [x for x in capsys.readouterr().err.splitlines() if "generation" in x]
    assert len(lines) == 2 and "generation 1/1" in lines[-1] and "best perplexity" in lines[-1]


def test_search_short_factors(model, docs):
    long_rope = RopeScaling.longrope(HEAD_DIM, ORIGINAL, TARGET, [1.0] * PAIRS, [1.0 + 0.4 * i for i in range(PAIRS)],
                                     n_hat=2)
    short_docs = [d[:ORIGINAL] for d in docs]
    found = search_short_factors(model, short_docs, long_rope=long_rope, batch_size=2, seed=1, **SMALL)
    _check_factors(found.factors, max(long_rope.param("long_factors")))
    rope = found.rope
    assert found.kind == "short" and found.fitness_length == ORIGINAL
    assert tuple(rope.param("short_factors")) == found.factors
    assert rope.param("long_factors") == long_rope.param("long_factors") and rope.n_hat == 2
    torch.testing.assert_close(rope.frequencies(TARGET)[0], long_rope.frequencies(TARGET)[0], rtol=0, atol=0)
    assert {h["origin"] for h in found.history} >= {"seed:identity", "seed:long"}
    patch_model(model, rope=rope, backend="reference")
    try:
        assert perplexity(model, short_docs, length=ORIGINAL, batch_size=2) == pytest.approx(found.fitness, rel=1e-9)
    finally:
        unpatch_model(model)
    with pytest.raises(ValueError, match="length"):
        search_short_factors(model, docs, long_rope=long_rope, length=TARGET, **SMALL)


def test_rope_parameters_round_trip(model, docs):
    found = _search(model, docs, n_hat_choices=(0, 4), seed=4, generations=1)
    params = found.rope_parameters()
    assert params["rope_type"] == "longrope" and params["long_factor"] == list(found.factors)
    assert params["original_max_position_embeddings"] == ORIGINAL and params["factor"] == TARGET / ORIGINAL
    assert set(params) <= {"rope_type", "rope_theta", "short_factor", "long_factor", "original_max_position_embeddings",
                           "factor", "attention_factor", "partial_rotary_factor"}  # keys transformers knows
    json.dumps(params)
    # our reader: the same rope (transformers has no n̂, so it comes back as 0)
    expected = replace(found.rope, n_hat=0)
    config = {"rope_parameters": params, "head_dim": HEAD_DIM, "max_position_embeddings": ORIGINAL}
    assert RopeScaling.from_hf_config(config) == expected
    # transformers' reader: a model built from the config rotates with the same frequencies and attention factor
    hf = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_attention_heads=2, head_dim=HEAD_DIM,
                     max_position_embeddings=ORIGINAL, rope_parameters=copy.deepcopy(params))
    assert RopeScaling.from_hf_config(hf) == expected
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    emb = LlamaRotaryEmbedding(hf)
    emb(torch.zeros(1), torch.arange(TARGET)[None])  # past the original length: the long set
    inv_freq, factor = expected.frequencies(TARGET)
    torch.testing.assert_close(emb.inv_freq.double(), inv_freq, rtol=1e-6, atol=0)
    assert emb.attention_scaling == pytest.approx(factor)
    with pytest.raises(ValueError, match="longrope"):
        rope_parameters(RopeScaling.linear(HEAD_DIM, 2.0))


@pytest.mark.parametrize("kwargs,name", [
    (dict(target_length=ORIGINAL), "target_length"), (dict(n_hat_choices=(0, ORIGINAL)), "n_hat_choices"),
    (dict(evaluator="eager"), "evaluator"), (dict(population_size=0), "population_size"),
    (dict(mutation_probability=0.0), "mutation_probability"), (dict(max_factor=0.5), "max_factor"),
    (dict(short_factors=[1.0]), "short_factors"), (dict(seeds=[[2.0]]), "seeds"),
    (dict(backend="fast"), "backend")])
def test_search_rejects_bad_arguments(model, docs, kwargs, name):
    args = dict(target_length=TARGET, original_length=ORIGINAL, **SMALL)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        search_longrope(model, docs, **args)


def test_bench_extension_tiny(tmp_path):
    """The benchmark's CPU smoke run: trains a tiny byte model, searches, evaluates every method, writes JSON."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the bench's tiny run uses the reference backend
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_extension.py"), "--tiny", "--out", str(tmp_path),
                          "--scales", "1,2", "--trials", "1", "--budget-seconds", "3"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    [path] = tmp_path.glob("extension-*.json")
    data = json.loads(path.read_text())
    methods = {r["method"] for r in data["results"]}
    assert methods == {"none", "pi", "ntk", "dynamic_ntk", "yarn", "longrope", "longrope_no_nhat", "rerope",
                       "leaky_rerope"}
    assert all(math.isfinite(r["perplexity"]) and r["length"] in (128, 256) for r in data["results"])
    assert {(s["method"], s["scale"]) for s in data["searches"]} == {("longrope", 2), ("longrope_no_nhat", 2)}
    assert data["throughput"]["scaled_rope"]["candidates"] >= 1 and data["throughput"]["stock"]["candidates"] >= 1
    assert data["check"]["patched_perplexity"] == pytest.approx(data["check"]["stock_perplexity"], rel=1e-4)
    assert path.with_suffix(".md").exists()


def test_train_byte_model_is_deterministic(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import train_byte_model as tbm
    finally:
        sys.path.remove(str(ROOT / "bench"))
    files = tbm.stdlib_files()
    assert files == sorted(files) and files and all(f.endswith(".py") for f in files)
    heldout = [f for f in files if tbm.is_heldout(f)]
    assert 0 < len(heldout) < len(files) / 10
    a = tbm.train(tmp_path / "a", tiny=True, steps=3, device="cpu", quiet=True)
    b = tbm.train(tmp_path / "b", tiny=True, steps=3, device="cpu", quiet=True)
    assert a["heldout_files"] == heldout
    trained = [f for f in files if not tbm.is_heldout(f)][:tbm.TINY_TRAIN_FILES]
    assert a["training_sha256"] == tbm.training_stream(trained)[1]  # no held-out file in the training bytes
    assert a["training_sha256"] == b["training_sha256"] and a["loss_curve"] == b["loss_curve"]
    assert a["heldout_perplexity"] == b["heldout_perplexity"]
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    c = tbm.train(tmp_path / "c", tiny=True, steps=3, device="cpu", quiet=True, seed=1)
    assert c["loss_curve"] != a["loss_curve"]
