"""LongRoPE's evolutionary search for per-pair rescale factors and n̂ (Ding et al. 2024, section 3 / algorithm 1).

    from scaled_rope.search import search_longrope
    found = search_longrope(model, heldout_tokens, target_length=8192, original_length=512, seed=0,
                            checkpoint="search.json")
    found.rope                 # RopeScaling.longrope with the searched long factors and n̂
    found.rope_parameters()    # {"rope_type": "longrope", "long_factor": [...], ...} for a transformers config

What is searched. Pair i of the rotary dims (i = 0 is the highest frequency) gets frequency w0_i / lambda_i. A
candidate is (lambda_0..lambda_{R/2-1}, n̂): lambda on a grid 1, 1 + step, ..., max_factor (default 1.25 * s,
s = target / original, step 0.01 as in the paper), non-decreasing in i (low frequencies are interpolated at least
as much as high ones) and >= 1; n̂ (the first n̂ positions keep the unscaled rotation) from a small set (default
the paper's {0, 1, 2, 4, ..., 256}; pass (0,) to search factors only). Fitness is the perplexity of `tokens`
(held-out text) at the target length, lower is better, computed with `scaled_rope.evaluate.perplexity` on the
model patched with the candidate (`patch_model(model, rope=candidate)`: a new frequency table per candidate, no
recompilation) or, with evaluator="stock", on the unpatched transformers model with the candidate written into
`config.rope_parameters` and its rotary embedding rebuilt (eager rope + SDPA; n̂ must then be 0).

The algorithm, as the paper's algorithm 1:
1. initial population: the PI (lambda = s), NTK (lambda_i = s^(2i/(R-2))) and YaRN factors of the scale (and any
   `seeds`), snapped to the grid, plus mutations of them up to `population_size`;
2. each generation keeps the `parents` fittest candidates so far (top-k) and adds `mutations` children, each a
   mutation of a random parent, and `crossovers` children, each a crossover of two random parents;
3. mutation: each lambda_i changes with probability `mutation_probability` to a random grid value between its
   neighbours' (so the order is kept), n̂ likewise to a random choice; crossover: each gene from the second
   parent with probability 1/2, retried until the child is monotone (else a mutation of the first parent);
   children already evaluated are never evaluated again;
4. after `generations` generations the fittest candidate wins.

Reproducible: one `random.Random(seed)` drives every choice, and the evaluation is deterministic on one machine.
Resumable: with `checkpoint=PATH` the state (generation, parents, pending children and their fitness so far, the
random state, history) is written as JSON after every generation and every `checkpoint_seconds` within one; calling
again with the same arguments continues from it and ends exactly where an uninterrupted run ends (`generations` may
be raised to search further). `max_seconds` (checked between evaluations, once the seeds are evaluated) and
`max_evaluations` stop a call early (the result says so; the checkpoint resumes it).

`search_short_factors` searches the short set the same way with fitness at the original length (the long set, n̂
and everything else fixed), as the paper does to restore short-context quality after extension.
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from .evaluate import perplexity
from .scaling import RopeScaling

N_HAT_CHOICES = (0, 1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 64, 128, 256)
EVALUATORS = ("scaled_rope", "stock")
FORMAT = "scaled_rope.search/1"


# ---- results ----------------------------------------------------------------------------------------------------
@dataclass
class SearchResult:
    """The winner of a search and how it was found.

    rope: RopeScaling.longrope with the searched set (long for search_longrope, short for search_short_factors);
    factors: that set; n_hat; fitness: its perplexity at `fitness_length`; history: one dict per evaluated
    candidate in evaluation order (generation, factors, n_hat, fitness, origin); generations: completed
    generations; evaluations / seconds: candidates evaluated and time spent in this call (not the resumed part);
    stopped_early: a time or evaluation limit ended the search before `generations`."""

    rope: RopeScaling
    factors: tuple[float, ...]
    n_hat: int
    fitness: float
    history: list[dict]
    kind: str
    fitness_length: int
    generations: int
    evaluations: int
    seconds: float
    stopped_early: bool
    settings: dict = field(default_factory=dict)

    @property
    def candidates_per_minute(self) -> float:
        return 60.0 * self.evaluations / self.seconds if self.seconds > 0 else math.inf

    def rope_parameters(self) -> dict:
        return rope_parameters(self.rope)


def rope_parameters(rope: RopeScaling) -> dict:
    """A LongRoPE RopeScaling as a transformers `rope_parameters` dict (rope_type, rope_theta, short_factor,
    long_factor, original_max_position_embeddings, factor, attention_factor, and partial_rotary_factor when the
    rotary dim is partial). transformers has no n̂: it is not written (see `rope.n_hat`). `RopeScaling.from_hf_config`
    reads the dict back (with head_dim from the model config)."""
    if rope.kind != "longrope":
        raise ValueError(f"rope must be a longrope RopeScaling, got kind {rope.kind!r}")
    original, maximum = rope.param("original_max_position"), rope.param("max_position")
    # the attention factor of each set, through the public API (frequencies at a short and a long length)
    short_m, long_m = rope.frequencies(original)[1], rope.frequencies(original + 1)[1]
    if short_m != long_m:
        raise ValueError(f"rope has different short and long attention factors ({short_m}, {long_m}); "
                         f"transformers' longrope rope_parameters hold one attention_factor")
    params = {"rope_type": "longrope", "rope_theta": rope.base,
              "short_factor": list(rope.param("short_factors")), "long_factor": list(rope.param("long_factors")),
              "original_max_position_embeddings": original, "factor": maximum / original,
              "attention_factor": float(long_m)}
    if rope.rotary_dim != rope.head_dim:
        params["partial_rotary_factor"] = rope.rotary_dim / rope.head_dim
    return params


# ---- the search space ---------------------------------------------------------------------------------------------
@dataclass
class _Candidate:
    grid: tuple[int, ...]  # lambda_i = 1 + grid_i * step
    n_hat: int
    origin: str
    generation: int
    fitness: float | None = None

    @property
    def key(self) -> tuple:
        return self.grid, self.n_hat

    def to_json(self) -> dict:
        return {"grid": list(self.grid), "n_hat": self.n_hat, "origin": self.origin, "generation": self.generation,
                "fitness": self.fitness}

    @classmethod
    def from_json(cls, d: dict) -> "_Candidate":
        return cls(tuple(int(x) for x in d["grid"]), int(d["n_hat"]), d["origin"], int(d["generation"]),
                   None if d["fitness"] is None else float(d["fitness"]))


class _Space:
    def __init__(self, pairs: int, step: float, max_factor: float, n_hat_choices: tuple[int, ...]):
        self.pairs, self.step, self.top = pairs, step, int(round((max_factor - 1.0) / step))
        self.n_hat_choices = n_hat_choices

    def factors(self, grid: Sequence[int]) -> tuple[float, ...]:
        return tuple(round(1.0 + g * self.step, 10) for g in grid)

    def snap(self, factors: Sequence[float]) -> tuple[int, ...]:
        grid, low = [], 0
        for x in factors:
            g = min(max(int(round((float(x) - 1.0) / self.step)), 0), self.top)
            low = max(low, g)  # monotone after rounding
            grid.append(low)
        return tuple(grid)

    def mutate(self, rng: random.Random, parent: _Candidate, p: float, seen: set, tries: int = 64):
        for _ in range(tries):
            grid, n_hat = list(parent.grid), parent.n_hat
            for i in range(self.pairs):
                if rng.random() < p:
                    low = grid[i - 1] if i > 0 else 0
                    high = grid[i + 1] if i + 1 < self.pairs else self.top
                    grid[i] = rng.randint(low, high)
            if len(self.n_hat_choices) > 1 and rng.random() < p:
                n_hat = rng.choice(self.n_hat_choices)
            if (tuple(grid), n_hat) not in seen:
                return tuple(grid), n_hat
        return None

    def crossover(self, rng: random.Random, a: _Candidate, b: _Candidate, seen: set, tries: int = 20):
        if a.key == b.key:
            return None
        for _ in range(tries):
            take = [rng.random() < 0.5 for _ in range(self.pairs + 1)]
            grid = tuple(y if t else x for x, y, t in zip(a.grid, b.grid, take))
            n_hat = b.n_hat if take[-1] else a.n_hat
            if all(grid[i] <= grid[i + 1] for i in range(self.pairs - 1)) and (grid, n_hat) not in seen:
                return grid, n_hat
        return None


# ---- evaluation ---------------------------------------------------------------------------------------------------
class _PatchedEvaluator:
    """Fitness through scaled_rope's kernels: the model patched with each candidate in turn; restored afterwards."""

    def __init__(self, model, backend: str):
        from .integrations.transformers import is_patched

        self.model, self.backend = model, backend
        self.previous = getattr(model, "_scaled_rope_patch", None) if is_patched(model) else None

    def use(self, rope: RopeScaling) -> None:
        from .integrations.transformers import patch_model

        patch_model(self.model, rope=rope, backend=self.backend)

    def close(self) -> None:
        from .integrations.transformers import is_patched, patch_model, unpatch_model

        if self.previous is None:
            if is_patched(self.model):
                unpatch_model(self.model)
            return
        p = self.previous
        patch_model(self.model, rope=p.rope, rerope_window=getattr(p, "rerope_window", None),
                    rerope_leak=getattr(p, "rerope_leak", None), logn_base=getattr(p, "logn_base", None),
                    backend=getattr(p, "backend", "auto"))


class _StockEvaluator:
    """Fitness through stock transformers (eager rope + the model's attention, SDPA by default): the candidate goes
    into config.rope_parameters and the model's rotary embedding is rebuilt from it; restored afterwards."""

    def __init__(self, model):
        from .integrations.transformers import is_patched

        if is_patched(model):
            raise ValueError("evaluator='stock' needs an unpatched model (unpatch_model(model) first)")
        self.model = model
        self.owner = self._rotary_owner(model)
        self.previous = (copy.deepcopy(model.config.rope_parameters), self.owner.rotary_emb)

    @staticmethod
    def _rotary_owner(model):
        for module in model.modules():
            if isinstance(getattr(module, "rotary_emb", None), torch.nn.Module):
                return module
        raise ValueError(f"evaluator='stock': {type(model).__name__} has no rotary_emb module to rebuild")

    def use(self, rope: RopeScaling) -> None:
        if rope.n_hat:
            raise ValueError("evaluator='stock' cannot evaluate n_hat > 0 (transformers has no n̂); pass "
                             "n_hat_choices=(0,)")
        self.model.config.rope_parameters = rope_parameters(rope)
        old = self.owner.rotary_emb
        buffer = next(old.buffers(), None)
        new = type(old)(config=self.model.config)
        if buffer is not None:
            new = new.to(buffer.device)
        self.owner.rotary_emb = new

    def close(self) -> None:
        self.model.config.rope_parameters, self.owner.rotary_emb = self.previous


# ---- the evolution ------------------------------------------------------------------------------------------------
def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_number(name: str, value, low: float, high: float = math.inf, *, closed_low: bool = True) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and \
        (value >= low if closed_low else value > low) and value <= high
    if not ok:
        raise ValueError(f"{name} must be a number in {'[' if closed_low else '('}{low}, {high}], got {value!r}")
    return float(value)


def _model_rope(model, base_rope: RopeScaling | None) -> RopeScaling:
    if base_rope is not None:
        if not isinstance(base_rope, RopeScaling):
            raise ValueError(f"base_rope must be a RopeScaling, got {type(base_rope).__name__}")
        return base_rope
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError("the model has no config to read its rope from; pass base_rope=")
    return RopeScaling.from_hf_config(config)


def _seed_factors(template: RopeScaling, scale: float, original: int) -> dict[str, tuple[float, ...]]:
    """lambda_i = w0_i / w_i of PI, NTK and YaRN at this scale."""
    kw = dict(base=template.base, rotary_dim=template.rotary_dim)
    w0 = template.unscaled_frequencies()
    ropes = {"pi": RopeScaling.linear(template.head_dim, scale, **kw),
             "ntk": RopeScaling.ntk(template.head_dim, scale, **kw),
             "yarn": RopeScaling.yarn(template.head_dim, scale, original, **kw)}
    return {name: tuple((w0 / r.frequencies()[0]).tolist()) for name, r in ropes.items()}


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="gen", file=sys.stderr)


class _Evolution:
    def __init__(self, *, space: _Space, make_rope: Callable[[tuple[float, ...], int], RopeScaling],
                 fitness: Callable[[RopeScaling], float], seeds: dict[str, tuple[float, ...]], seed_n_hat: int,
                 population_size: int, parents: int, mutations: int, crossovers: int, generations: int,
                 mutation_probability: float, seed: int, checkpoint: Path | None, settings: dict,
                 checkpoint_seconds: float, progress: bool, desc: str):
        self.space, self.make_rope, self.fitness = space, make_rope, fitness
        self.population_size, self.parents, self.mutations, self.crossovers = \
            population_size, parents, mutations, crossovers
        self.generations, self.p = generations, mutation_probability
        self.checkpoint, self.settings, self.checkpoint_seconds = checkpoint, settings, checkpoint_seconds
        self.progress, self.desc = progress, desc
        self.rng = random.Random(seed)
        self.history: list[_Candidate] = []
        self.parent_pool: list[_Candidate] = []
        self.pending: list[_Candidate] = []
        self.generation = 0
        if not self._load():
            self.pending = self._initial(seeds, seed_n_hat)
            self._save()

    # -- state --
    def _state(self) -> dict:
        version, internal, gauss = self.rng.getstate()
        return {"format": FORMAT, "settings": self.settings, "generation": self.generation,
                "parents": [c.to_json() for c in self.parent_pool], "pending": [c.to_json() for c in self.pending],
                "history": [c.to_json() for c in self.history], "rng": [version, list(internal), gauss]}

    def _save(self) -> None:
        if self.checkpoint is None:
            return
        self.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.checkpoint.with_name(self.checkpoint.name + ".tmp")
        tmp.write_text(json.dumps(self._state()))
        os.replace(tmp, self.checkpoint)

    def _load(self) -> bool:
        if self.checkpoint is None or not self.checkpoint.exists():
            return False
        state = json.loads(self.checkpoint.read_text())
        if state.get("format") != FORMAT:
            raise ValueError(f"checkpoint {self.checkpoint} is not a {FORMAT} file")
        saved = state["settings"]
        differ = sorted(k for k in set(saved) | set(self.settings) if saved.get(k) != self.settings.get(k))
        if differ:
            raise ValueError(f"checkpoint {self.checkpoint} was written by a search with other settings "
                             f"({', '.join(differ)} differ); use another checkpoint path or the same arguments")
        self.generation = int(state["generation"])
        self.parent_pool = [_Candidate.from_json(d) for d in state["parents"]]
        self.pending = [_Candidate.from_json(d) for d in state["pending"]]
        self.history = [_Candidate.from_json(d) for d in state["history"]]
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        return True

    def _seen(self) -> set:
        return {c.key for c in self.history} | {c.key for c in self.parent_pool} | {c.key for c in self.pending}

    # -- population --
    def _initial(self, seeds: dict[str, tuple[float, ...]], seed_n_hat: int) -> list[_Candidate]:
        population, seen = [], set()
        for name, factors in seeds.items():
            c = _Candidate(self.space.snap(factors), seed_n_hat, f"seed:{name}", 0)
            if c.key not in seen:
                seen.add(c.key)
                population.append(c)
        base = list(population)
        misses = 0
        while len(population) < self.population_size and misses < 4 * self.population_size:
            parent = base[len(population) % len(base)]
            child = self.space.mutate(self.rng, parent, self.p, seen)
            if child is None:
                misses += 1
                continue
            seen.add(child)
            population.append(_Candidate(child[0], child[1], "mutation", 0))
        return population

    def _children(self) -> list[_Candidate]:
        pool = sorted(self.parent_pool + self.pending, key=lambda c: c.fitness)[:self.parents]
        self.parent_pool, g, seen, children = pool, self.generation + 1, self._seen(), []
        for _ in range(self.mutations):
            child = self.space.mutate(self.rng, self.rng.choice(pool), self.p, seen)
            if child is not None:
                seen.add(child)
                children.append(_Candidate(child[0], child[1], "mutation", g))
        for _ in range(self.crossovers):
            if len(pool) < 2:
                break
            a, b = sorted(self.rng.sample(range(len(pool)), 2))
            child = self.space.crossover(self.rng, pool[a], pool[b], seen)
            origin = "crossover"
            if child is None:
                child, origin = self.space.mutate(self.rng, pool[a], self.p, seen), "mutation"
            if child is not None:
                seen.add(child)
                children.append(_Candidate(child[0], child[1], origin, g))
        return children

    def _evaluate(self, c: _Candidate) -> None:
        value = float(self.fitness(self.make_rope(self.space.factors(c.grid), c.n_hat)))
        c.fitness = value if math.isfinite(value) else math.inf
        self.history.append(c)

    # -- main loop --
    def run(self, max_seconds: float | None, max_evaluations: int | None) -> tuple[int, float, bool]:
        start = last_save = time.perf_counter()
        evaluations, stopped = 0, False
        bar = _progress(self.generations + 1, self.progress, self.desc)
        if bar is not None:
            bar.update(min(self.generation, self.generations + 1))
        try:
            while True:
                for c in self.pending:
                    if c.fitness is not None:
                        continue
                    # the seeds (PI, NTK, YaRN) are evaluated whatever the time: a result worse than its seeds
                    # would be no search at all
                    out_of_time = max_seconds is not None and evaluations and not c.origin.startswith("seed:") \
                        and time.perf_counter() - start >= max_seconds
                    if (max_evaluations is not None and evaluations >= max_evaluations) or out_of_time:
                        stopped = True
                        break
                    self._evaluate(c)
                    evaluations += 1
                    if time.perf_counter() - last_save >= self.checkpoint_seconds:
                        self._save()
                        last_save = time.perf_counter()
                if stopped:
                    break
                best = min(self.parent_pool + self.pending, key=lambda c: c.fitness)
                message = f"{self.desc}: generation {self.generation}/{self.generations}, best perplexity " \
                          f"{best.fitness:.4g}, {len(self.history)} candidates evaluated"
                if bar is not None:
                    bar.set_postfix(best=f"{best.fitness:.4g}", evaluated=len(self.history))
                    bar.update(1)
                elif self.progress:
                    print(message, file=sys.stderr, flush=True)
                if self.generation >= self.generations:
                    break
                self.pending = self._children()
                self.generation += 1
                self._save()
                last_save = time.perf_counter()
        finally:
            if bar is not None:
                bar.close()
        self._save()
        return evaluations, time.perf_counter() - start, stopped

    def best(self) -> _Candidate:
        done = [c for c in self.parent_pool + self.pending if c.fitness is not None]
        if not done:
            raise RuntimeError("the search stopped before any candidate was evaluated; raise max_seconds / "
                               "max_evaluations")
        return min(done, key=lambda c: c.fitness)

    def history_dicts(self) -> list[dict]:
        return [{"generation": c.generation, "factors": list(self.space.factors(c.grid)), "n_hat": c.n_hat,
                 "fitness": c.fitness, "origin": c.origin} for c in self.history]


def _common_checks(tokens, population_size, parents, mutations, crossovers, generations, mutation_probability,
                   step, n_hat_choices, n_hat_limit, seed, batch_size, evaluator, backend, checkpoint_seconds,
                   max_seconds, max_evaluations):
    if tokens is None:
        raise ValueError("tokens must hold held-out token ids (one document or a list of documents)")
    _check_int("population_size", population_size, 1)
    _check_int("parents", parents, 1)
    _check_int("mutations", mutations, 0)
    _check_int("crossovers", crossovers, 0)
    _check_int("generations", generations, 0)
    _check_number("mutation_probability", mutation_probability, 0.0, 1.0, closed_low=False)
    _check_number("step", step, 0.0, closed_low=False)
    _check_int("seed", seed, 0)
    _check_int("batch_size", batch_size, 1)
    if evaluator not in EVALUATORS:
        raise ValueError(f"evaluator must be one of {EVALUATORS}, got {evaluator!r}")
    if backend not in ("auto", "triton", "cuda", "reference"):
        raise ValueError(f"backend must be one of 'auto', 'triton', 'cuda', 'reference', got {backend!r}")
    choices = tuple(n_hat_choices)
    if not choices or any(isinstance(n, bool) or not isinstance(n, int) or n < 0 or n >= n_hat_limit
                          for n in choices) or len(set(choices)) != len(choices):
        raise ValueError(f"n_hat_choices must be distinct integers in [0, original length {n_hat_limit}), got "
                         f"{n_hat_choices!r}")
    if evaluator == "stock" and choices != (0,):
        raise ValueError("evaluator='stock' cannot evaluate n_hat > 0 (transformers has no n̂); pass "
                         "n_hat_choices=(0,)")
    _check_number("checkpoint_seconds", checkpoint_seconds, 0.0)
    if max_seconds is not None:
        _check_number("max_seconds", max_seconds, 0.0)
    if max_evaluations is not None:
        _check_int("max_evaluations", max_evaluations, 0)
    return choices


def _run(model, tokens, *, kind, space, make_rope, seeds, seed_n_hat, fitness_length, stride, batch_size,
         evaluator, backend, population_size, parents, mutations, crossovers, generations, mutation_probability,
         seed, checkpoint, checkpoint_seconds, progress, max_seconds, max_evaluations, settings) -> SearchResult:
    runner = _PatchedEvaluator(model, backend) if evaluator == "scaled_rope" else _StockEvaluator(model)

    def fitness(rope: RopeScaling) -> float:
        runner.use(rope)
        return perplexity(model, tokens, length=fitness_length, stride=stride, batch_size=batch_size)

    was_training = getattr(model, "training", False)
    if was_training:
        model.eval()
    try:
        evolution = _Evolution(space=space, make_rope=make_rope, fitness=fitness, seeds=seeds, seed_n_hat=seed_n_hat,
                               population_size=population_size, parents=parents, mutations=mutations,
                               crossovers=crossovers, generations=generations,
                               mutation_probability=mutation_probability, seed=seed,
                               checkpoint=None if checkpoint is None else Path(checkpoint), settings=settings,
                               checkpoint_seconds=checkpoint_seconds, progress=progress, desc=f"{kind} search")
        evaluations, seconds, stopped = evolution.run(max_seconds, max_evaluations)
    finally:
        runner.close()
        if was_training:
            model.train()
    best = evolution.best()
    factors = space.factors(best.grid)
    return SearchResult(rope=make_rope(factors, best.n_hat), factors=factors, n_hat=best.n_hat, fitness=best.fitness,
                        history=evolution.history_dicts(), kind=kind, fitness_length=fitness_length,
                        generations=evolution.generation, evaluations=evaluations, seconds=seconds,
                        stopped_early=stopped, settings=settings)


# ---- public API ---------------------------------------------------------------------------------------------------
def search_longrope(model, tokens, *, target_length: int, original_length: int | None = None,
                    population_size: int = 64, parents: int = 32, mutations: int = 16, crossovers: int = 16,
                    generations: int = 40, mutation_probability: float = 0.3, step: float = 0.01,
                    max_factor: float | None = None, n_hat_choices: Sequence[int] | None = None,
                    short_factors: Sequence[float] | None = None, attention_factor: float | None = None,
                    seeds: dict[str, Sequence[float]] | Sequence[Sequence[float]] = (),
                    base_rope: RopeScaling | None = None, stride: int | None = None, batch_size: int = 1,
                    evaluator: str = "scaled_rope", backend: str = "auto", seed: int = 0,
                    checkpoint: str | os.PathLike | None = None, checkpoint_seconds: float = 30.0,
                    progress: bool = True, max_seconds: float | None = None,
                    max_evaluations: int | None = None) -> SearchResult:
    """Search LongRoPE long factors and n̂ for extending `model` from `original_length` (default: the config's
    original_max_position_embeddings or max_position_embeddings) to `target_length` tokens; fitness = perplexity
    of `tokens` at target_length (windows of target_length advancing by `stride`, `batch_size` at a time).

    Defaults are the paper's: population 64, top-k parents 32, 16 mutations and 16 crossovers per generation, 40
    generations, mutation probability 0.3, grid step 0.01, max_factor 1.25 * target/original, n̂ from
    N_HAT_CHOICES below the original length. short_factors: the short set of the returned rope (default all 1.0,
    the model as trained); attention_factor: as RopeScaling.longrope (default sqrt(1 + ln s / ln original)).
    seeds: extra initial candidates (e.g. a previous search's factors, for progressive extension), by name or as a
    list. base_rope: the
    model's unscaled rope (head_dim, rotary_dim, base; default read from model.config). evaluator: "scaled_rope"
    (the model patched with each candidate, `backend`) or "stock" (transformers' own rope from rope_parameters;
    n_hat_choices must be (0,)). The model is restored afterwards (unpatched if it was, else its previous patch).
    Returns a SearchResult (rope, factors, n_hat, fitness, history, ...)."""
    template = _model_rope(model, base_rope)
    if original_length is None:
        config = getattr(model, "config", None)
        original_length = getattr(config, "original_max_position_embeddings", None) or \
            (getattr(config, "rope_parameters", None) or {}).get("original_max_position_embeddings") or \
            getattr(config, "max_position_embeddings", None)
    _check_int("original_length", original_length, 2)
    _check_int("target_length", target_length, 2)
    if target_length <= original_length:
        raise ValueError(f"target_length ({target_length}) must exceed original_length ({original_length}); "
                         f"search_short_factors searches lengths up to the original")
    scale = target_length / original_length
    if n_hat_choices is None:
        n_hat_choices = tuple(n for n in N_HAT_CHOICES if n < original_length)
    choices = _common_checks(tokens, population_size, parents, mutations, crossovers, generations,
                             mutation_probability, step, n_hat_choices, original_length, seed, batch_size, evaluator,
                             backend, checkpoint_seconds, max_seconds, max_evaluations)
    max_factor = 1.25 * scale if max_factor is None else _check_number("max_factor", max_factor, 1.0)
    if max_factor < 1.0 + step:
        raise ValueError(f"max_factor ({max_factor}) must be at least 1 + step ({1 + step})")
    pairs = template.pairs
    short = tuple([1.0] * pairs if short_factors is None else short_factors)
    if len(short) != pairs:
        raise ValueError(f"short_factors must have rotary_dim/2 = {pairs} entries, got {len(short)}")
    if attention_factor is not None:
        _check_number("attention_factor", attention_factor, 0.0, closed_low=False)
    space = _Space(pairs, step, max_factor, choices)
    named = dict(seeds) if isinstance(seeds, dict) else {f"given{i}": s for i, s in enumerate(seeds)}
    for name, s in named.items():
        if len(tuple(s)) != pairs:
            raise ValueError(f"seeds[{name!r}] must have rotary_dim/2 = {pairs} entries, got {len(tuple(s))}")
    all_seeds = {**_seed_factors(template, scale, original_length), **{k: tuple(v) for k, v in named.items()}}

    def make_rope(factors, n_hat):
        return RopeScaling.longrope(template.head_dim, original_length, target_length, short, factors, n_hat=n_hat,
                                    attention_factor=attention_factor, base=template.base,
                                    rotary_dim=template.rotary_dim, layout=template.layout)

    settings = _settings("long", template, original_length, target_length, space, short, attention_factor,
                         all_seeds, stride, population_size, parents, mutations, crossovers, mutation_probability,
                         seed, evaluator, tokens)
    return _run(model, tokens, kind="long", space=space, make_rope=make_rope, seeds=all_seeds, seed_n_hat=choices[0]
                if 0 not in choices else 0, fitness_length=target_length, stride=stride, batch_size=batch_size,
                evaluator=evaluator, backend=backend, population_size=population_size, parents=parents,
                mutations=mutations, crossovers=crossovers, generations=generations,
                mutation_probability=mutation_probability, seed=seed, checkpoint=checkpoint,
                checkpoint_seconds=checkpoint_seconds, progress=progress, max_seconds=max_seconds,
                max_evaluations=max_evaluations, settings=settings)


def search_short_factors(model, tokens, *, long_rope: RopeScaling, length: int | None = None,
                         population_size: int = 64, parents: int = 32, mutations: int = 16, crossovers: int = 16,
                         generations: int = 40, mutation_probability: float = 0.3, step: float = 0.01,
                         max_factor: float | None = None, seeds: dict[str, Sequence[float]] |
                         Sequence[Sequence[float]] = (), stride: int | None = None, batch_size: int = 1,
                         evaluator: str = "scaled_rope", backend: str = "auto", seed: int = 0,
                         checkpoint: str | os.PathLike | None = None, checkpoint_seconds: float = 30.0,
                         progress: bool = True, max_seconds: float | None = None,
                         max_evaluations: int | None = None) -> SearchResult:
    """Search the short factor set of `long_rope` (a longrope RopeScaling, e.g. `search_longrope(...).rope`): the
    factors used up to its original length. Fitness = perplexity of `tokens` at `length` (default the original
    length; must not exceed it). Everything else of long_rope (long set, n̂, attention factor) is kept. Seeds: all
    1.0 (the model as trained), the current short set, the long set capped at max_factor (default the long set's
    largest factor) and their geometric middle, plus `seeds`. Other arguments as `search_longrope`."""
    if not isinstance(long_rope, RopeScaling) or long_rope.kind != "longrope":
        raise ValueError("long_rope must be a RopeScaling.longrope (for example search_longrope(...).rope)")
    original = long_rope.param("original_max_position")
    length = original if length is None else length
    _check_int("length", length, 2)
    if length > original:
        raise ValueError(f"length ({length}) must not exceed the original length ({original}): beyond it the "
                         f"long factors are used")
    if evaluator == "stock" and long_rope.n_hat:
        raise ValueError("evaluator='stock' cannot evaluate long_rope.n_hat > 0 (transformers has no n̂)")
    _common_checks(tokens, population_size, parents, mutations, crossovers, generations, mutation_probability, step,
                   (0,), length, seed, batch_size, evaluator, backend, checkpoint_seconds, max_seconds,
                   max_evaluations)
    long = tuple(long_rope.param("long_factors"))
    top = max(long) if max_factor is None else _check_number("max_factor", max_factor, 1.0)
    if top < 1.0 + step:
        top = 1.0 + step
    pairs = long_rope.pairs
    space = _Space(pairs, step, top, (long_rope.n_hat,))
    capped = tuple(min(x, top) for x in long)
    named = dict(seeds) if isinstance(seeds, dict) else {f"given{i}": s for i, s in enumerate(seeds)}
    for name, s in named.items():
        if len(tuple(s)) != pairs:
            raise ValueError(f"seeds[{name!r}] must have rotary_dim/2 = {pairs} entries, got {len(tuple(s))}")
    all_seeds = {"identity": (1.0,) * pairs, "current": tuple(long_rope.param("short_factors")), "long": capped,
                 "middle": tuple(math.sqrt(x) for x in capped), **{k: tuple(v) for k, v in named.items()}}

    def make_rope(factors, n_hat):
        return replace(long_rope, params=tuple(sorted({**dict(long_rope.params),
                                                       "short_factors": tuple(factors)}.items())))

    settings = _settings("short", long_rope, original, length, space, long, None, all_seeds, stride,
                         population_size, parents, mutations, crossovers, mutation_probability, seed, evaluator,
                         tokens)
    return _run(model, tokens, kind="short", space=space, make_rope=make_rope, seeds=all_seeds,
                seed_n_hat=long_rope.n_hat, fitness_length=length, stride=stride, batch_size=batch_size,
                evaluator=evaluator, backend=backend, population_size=population_size, parents=parents,
                mutations=mutations, crossovers=crossovers, generations=generations,
                mutation_probability=mutation_probability, seed=seed, checkpoint=checkpoint,
                checkpoint_seconds=checkpoint_seconds, progress=progress, max_seconds=max_seconds,
                max_evaluations=max_evaluations, settings=settings)


def _tokens_fingerprint(tokens) -> list:
    """A cheap identity of the fitness tokens for the checkpoint (count and a checksum)."""
    from .evaluate import _documents

    docs = _documents(tokens)
    total = sum(int(d.numel()) for d in docs)
    checksum = sum(int((d.long() * torch.arange(1, d.numel() + 1, device=d.device)).sum()) % 1_000_000_007
                   for d in docs)
    return [len(docs), total, checksum % 1_000_000_007]


def _settings(kind, rope, original, length, space, fixed, attention_factor, seeds, stride, population_size, parents,
              mutations, crossovers, mutation_probability, seed, evaluator, tokens) -> dict:
    """Everything that decides the search's path (what a checkpoint must agree with); generations and the
    limits may change between calls."""
    return {"kind": kind, "head_dim": rope.head_dim, "rotary_dim": rope.rotary_dim, "base": rope.base,
            "original_length": original, "length": length, "step": space.step, "top": space.top,
            "n_hat_choices": list(space.n_hat_choices), "fixed_factors": list(fixed),
            "attention_factor": attention_factor, "seeds": {k: list(v) for k, v in seeds.items()},
            "stride": stride, "population_size": population_size, "parents": parents, "mutations": mutations,
            "crossovers": crossovers, "mutation_probability": mutation_probability, "seed": seed,
            "evaluator": evaluator, "tokens": _tokens_fingerprint(tokens)}
