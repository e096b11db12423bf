"""Stage-3 refinement on a synthetic problem: edgeqra's small GP vs nevergrad's BO and baselines.

    python bench/bayes_compare.py --seeds 5 --init 16 --evals 40

The problem has the shape of the real one, at no fine-tuning cost: 30 units (SmolLM2-135M's
decoder layers), Q = (2, 3, 4, 8), R = (0, 4, 8, 16, 32), the memory of GPTQ weights (group
64) plus trained LoRA adapters (fp32 weight, gradient, two AdamW moments) per layer, and a
budget that binds (the unconstrained best, 8 bits rank 32 everywhere, needs 2.3x the budget).
The score, maximised, is

    Σ_l w_l f(q_l)                  quantisation loss, later layers more fragile (w_l grows)
  + Σ_l v_l g(r_l)                  adapter gain, diminishing in rank
  + Σ_l ½ w_l |f(q_l)| g(r_l)       an adapter recovers up to half its layer's quantisation loss
  − Σ_l 0.3 w̄ [q_l = q_{l+1} = 2]   two adjacent 2-bit layers compound
  + N(0, noise²)                    the seed-to-seed noise of a short fine-tuning run

divided by the number of units. Every method starts from the same 16 feasible random configs
(rejection-sampled, per seed) and gets the same number of further evaluations. nevergrad
works on an ``ng.p.Tuple`` of ``ng.p.TransitionChoice`` (bits, rank per unit); an infeasible
ask is *repaired* with :func:`edgeqra.space.repair` (uniform importance: it knows bytes, not
the objective), the repaired config is evaluated and told as a not-asked candidate. A method
is credited with the noise-free score of the config it measured best ("best found").
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import time
import warnings
from collections.abc import Callable

import nevergrad as ng
import numpy as np
from bayes_opt.util import NotUniqueError

from edgeqra.search.bayes import BayesSettings, refine
from edgeqra.space import Choice, Config, SearchSpace, repair

N_UNITS = 30
BITS = (2, 3, 4, 8)
RANKS = (0, 4, 8, 16, 32)
LAYER_PARAMS = 3_538_944  # SmolLM2-135M: q, k, v, o, gate, up, down of one decoder layer
LORA_WIDTH = 10_176  # Σ (d_in + d_out) over those seven projections
GROUP = 64
LORA_BYTES = 16  # per adapter parameter while training: fp32 weight, grad, two AdamW moments
QUANT_LOSS = {2: -1.0, 3: -0.35, 4: -0.1, 8: 0.0}
ADAPTER_GAIN = {0: 0.0, 4: 0.45, 8: 0.7, 16: 0.88, 32: 1.0}

Run = tuple[
    list[tuple[Config, float]], float, int
]  # (new evaluations, seconds of own work, repaired)


class Problem:
    """The fixed synthetic instance: weights drawn once, noise drawn per evaluation."""

    def __init__(self, noise: float, budget_fraction: float, seed: int = 1234) -> None:
        rng = np.random.default_rng(seed)
        self.w = 0.5 + np.linspace(0.0, 1.0, N_UNITS) + rng.uniform(0.0, 0.3, N_UNITS)
        self.v = rng.uniform(0.2, 0.6, N_UNITS)
        self.noise = noise
        self.space = SearchSpace(N_UNITS, BITS, RANKS)
        self.unit_bytes = {
            (q, r): int(LAYER_PARAMS * (q + (16 + q) / GROUP) / 8 + r * LORA_WIDTH * LORA_BYTES)
            for q in BITS
            for r in RANKS
        }
        low = self.memory(Config.uniform(N_UNITS, BITS[0], RANKS[0]))
        high = self.memory(Config.uniform(N_UNITS, BITS[-1], RANKS[-1]))
        self.budget = int(low + budget_fraction * (high - low))

    def memory(self, config: Config) -> int:
        """Bytes: additive over units."""
        return sum(self.unit_bytes[(c.bits, c.rank)] for c in config)

    def feasible(self, config: Config) -> bool:
        """The hard budget."""
        return self.memory(config) <= self.budget

    def true_score(self, config: Config) -> float:
        """Noise-free score (what a method is credited with)."""
        total = 0.0
        for i, c in enumerate(config):
            f, g = QUANT_LOSS[c.bits], ADAPTER_GAIN[c.rank]
            total += self.w[i] * f + self.v[i] * g + 0.5 * self.w[i] * abs(f) * g
            if i + 1 < N_UNITS and c.bits == 2 and config[i + 1].bits == 2:
                total -= 0.3 * (self.w[i] + self.w[i + 1]) / 2
        return total / N_UNITS

    def evaluator(self, seed: int) -> Callable[[Config], float]:
        """A noisy evaluation with its own seeded noise stream."""
        rng = np.random.default_rng(seed)
        return lambda config: self.true_score(config) + float(rng.normal(0.0, self.noise))

    def random_feasible(self, rng: random.Random) -> Config:
        """A uniform random config, rejection-sampled under the budget."""
        for _ in range(100_000):
            config = self.space.sample(rng)
            if self.feasible(config):
                return config
        raise RuntimeError("budget too tight for rejection sampling; raise --budget-fraction")

    def reference(self) -> float:
        """A strong noise-free reference: hill climbing with single and paired one-step moves."""
        starts = [Config.uniform(N_UNITS, q, r) for q in BITS for r in RANKS]
        starts = [repair(c, self.space, self.memory, self.budget, list(self.w)) for c in starts]
        return max(self._climb(c) for c in set(starts))

    def _climb(self, current: Config) -> float:
        """First-improvement hill climbing to a local optimum for one- and two-step moves."""
        best = self.true_score(current)
        improved = True
        while improved:
            improved = False
            for a in self.space.neighbours(current):
                for b in [a, *self.space.neighbours(a)]:
                    if self.feasible(b) and (s := self.true_score(b)) > best + 1e-12:
                        current, best, improved = b, s, True
                        break
                if improved:
                    break
        return best


def _as_tuple(config: Config) -> tuple[int, ...]:
    return tuple(v for c in config for v in (c.bits, c.rank))


def _from_tuple(values: tuple[int, ...]) -> Config:
    return Config(tuple(Choice(values[i], values[i + 1]) for i in range(0, len(values), 2)))


def run_gp(problem: Problem, init, evals: int, seed: int, with_repair: bool = True) -> Run:
    """edgeqra.search.bayes.refine (EI stop off for an equal budget); repair as the driver does."""
    evaluate, spent = problem.evaluator(seed), [0.0]

    def timed(config: Config) -> float:
        t = time.perf_counter()
        score = evaluate(config)
        spent[0] += time.perf_counter() - t
        return score

    settings = BayesSettings(max_rounds=evals, ei_threshold=0.0)
    start = time.perf_counter()
    fix = None
    if with_repair:
        ones = [1.0] * N_UNITS  # uniform importance, as the nevergrad runs get

        def fix(config: Config) -> Config:
            return repair(config, problem.space, problem.memory, problem.budget, ones)

    new = refine(timed, init, problem.space, problem.feasible, settings, repair=fix, seed=seed)
    return new, time.perf_counter() - start - spent[0], 0


def run_random(problem: Problem, init, evals: int, seed: int) -> Run:
    """Random feasible search."""
    evaluate, rng, new, own = problem.evaluator(seed), random.Random(seed + 1), [], 0.0
    for _ in range(evals):
        t = time.perf_counter()
        config = problem.random_feasible(rng)
        own += time.perf_counter() - t
        new.append((config, evaluate(config)))
    return new, own, 0


def run_nevergrad(problem: Problem, init, evals: int, seed: int, make) -> Run:
    """Ask/tell on a Tuple of TransitionChoice; infeasible asks repaired, told as not-asked."""
    param = ng.p.Tuple(
        *(ng.p.TransitionChoice(BITS if i % 2 == 0 else RANKS) for i in range(2 * N_UNITS))
    )
    param.random_state = np.random.RandomState(seed)
    np.random.seed(seed)  # some nevergrad mutations draw from the global numpy stream
    opt = make(param, budget=len(init) + evals)
    evaluate, new, own, repaired = problem.evaluator(seed), [], 0.0, 0
    start = time.perf_counter()
    for config, score in init:
        opt.tell(param.spawn_child(new_value=_as_tuple(config)), -score)
    own += time.perf_counter() - start
    for _ in range(evals):
        t = time.perf_counter()
        candidate = opt.ask()
        config = _from_tuple(candidate.value)
        if not problem.feasible(config):
            config = repair(config, problem.space, problem.memory, problem.budget)
            candidate = param.spawn_child(new_value=_as_tuple(config))
            repaired += 1
        own += time.perf_counter() - t
        score = evaluate(config)
        t = time.perf_counter()
        try:
            opt.tell(candidate, -score)
        except NotUniqueError:
            pass  # bayes_opt refuses a point it holds; the repeat still cost an evaluation
        own += time.perf_counter() - t
        new.append((config, score))
    return new, own, repaired


METHODS: dict[str, Callable[..., Run]] = {
    "edgeqra small GP + trust region": run_gp,
    "edgeqra small GP, walks not repaired": lambda *a: run_gp(*a, with_repair=False),
    "nevergrad BO (EI, alpha 1e-3)": lambda *a: run_nevergrad(
        *a,
        ng.families.ParametrizedBO(utility_kind="ei", init_budget=0, gp_parameters={"alpha": 1e-3}),
    ),
    "random feasible search": run_random,
    "nevergrad DiscreteLenglerOnePlusOne": lambda *a: run_nevergrad(
        *a, ng.optimizers.DiscreteLenglerOnePlusOne
    ),
}


def _fmt(values: list[float], digits: int = 4) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0, help="run seeds first..first+n-1")
    parser.add_argument("--init", type=int, default=16, help="shared feasible random start")
    parser.add_argument("--evals", type=int, default=40, help="evaluations after the start")
    parser.add_argument("--noise", type=float, default=0.005, help="sd of evaluation noise")
    parser.add_argument(
        "--budget-fraction", type=float, default=0.35, help="budget between min and max memory"
    )
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", module="nevergrad")
    warnings.filterwarnings("ignore", module="bayes_opt")

    problem = Problem(args.noise, args.budget_fraction)
    reference = problem.reference()
    rng = random.Random(0)
    frac = sum(problem.feasible(problem.space.sample(rng)) for _ in range(10_000)) / 10_000
    print(
        f"budget {problem.budget / 2**20:.1f} MiB; {frac:.1%} of uniform random configs fit; "
        f"noise-free reference best {reference:.4f}"
    )
    rows = {
        name: {"best": [], "closed": [], "own": [], "n": [], "rep": [], "dup": []}
        for name in args.methods
    }
    init_best = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        rng = random.Random(1000 + seed)
        starts = [problem.random_feasible(rng) for _ in range(args.init)]
        noisy = problem.evaluator(10_000 + seed)
        init = [(c, noisy(c)) for c in starts]
        start_best = problem.true_score(max(init, key=lambda item: item[1])[0])
        init_best.append(start_best)
        for name in args.methods:
            new, own, repaired = METHODS[name](problem, init, args.evals, seed)
            found = problem.true_score(max([*init, *new], key=lambda item: item[1])[0])
            assert all(problem.feasible(c) for c, _ in new), name
            seen = {c for c, _ in init}
            repeats = 0
            for c, _ in new:
                repeats += c in seen
                seen.add(c)
            r = rows[name]
            r["best"].append(found)
            r["closed"].append(100 * (found - start_best) / (reference - start_best))
            r["own"].append(own / max(len(new), 1))
            r["n"].append(len(new))
            r["rep"].append(repaired)
            r["dup"].append(repeats)
            print(
                f"seed {seed} {name}: best {found:.4f}, gap closed {r['closed'][-1]:.1f} %, "
                f"start {start_best:.4f} ({len(new)} evals, {own:.1f} s own work, "
                f"{repaired} repaired, {repeats} repeats)",
                flush=True,
            )

    print()
    print(f"start (best of the {args.init} shared random configs): {_fmt(init_best)}")
    print()
    print(
        "| method | best found (noise-free, mean ± sd) | gap to reference closed (%) | evals | "
        "infeasible asks repaired | repeated configs | s / proposal |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {_fmt(r['best'])} | {_fmt(r['closed'], 1)} | "
            f"{statistics.mean(r['n']):.0f} | {statistics.mean(r['rep']):.1f} | "
            f"{statistics.mean(r['dup']):.1f} | {_fmt(r['own'], 3)} |"
        )


if __name__ == "__main__":
    main()
