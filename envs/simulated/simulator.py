"""The calibrated generative simulator: decides, per question and per node, which answer
each node of a collaboration graph gives.

The model (details and every parameter in ``docs/simulator.md``):

* Question q has a difficulty ``b_q ~ N(0, s)``, each model m a per-question deviation
  ``e_qm ~ N(0, t)`` shared by all its calls (what this model happens to know), and an
  answer space: the correct answer
  ``"0"`` and K wrong answers ``"1".."K"`` with Zipf-skewed popularity, partly shared by
  all models (``error_correlation``) and partly model specific, so errors collide.
* A source node of model m is right with probability ``sigmoid(a_m - b_q + e_qm)``
  (below, ``a_m - b_q`` stands for ``a_m - b_q + e_qm``); otherwise it
  draws a wrong answer by its popularity.
* A node with d predecessors makes its own attempt (its ability lowered by a context
  penalty ``kappa * d^p / z_m`` that shrinks with model size) and then picks one candidate
  answer: each distinct answer x gets weight ``votes_x^gamma * exp(beta * [x correct])``,
  where votes count the inputs giving x plus the own attempt (weighted by role), gamma is
  the role's plurality sharpness, and ``beta = (g + w) * sigmoid(a_m - b_q + offset -
  penalty) - w``: strong when the model can verify the answer, negative (drawn to wrong
  answers) when it cannot. A fuser leans on selection (small own weight, sharp plurality).
  Nodes of one model and role that see the same inputs share most of their selection
  randomness (``synthesis_diversity`` is the share that is their own), as identical
  prompts pick alike; their own attempts stay independent samples.
* A synthesiser at topological level l garbles a right answer with probability
  ``1 - exp(-rho * l / z_m)``: deep chains of weak models lose what they gained.

The execution plan and the synthesis rule are shared with the replay environment
(:mod:`graphtune.envs.synthesis`); this module applies them over arrays of questions.

Randomness comes from a splitmix64 hash of (seed, question, canonical node position,
model, role, sorted input answers), never from a global RNG; graphs are evaluated in
canonical form, so node naming does not change anything. Work is vectorised over
questions with numpy.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from scipy.special import expit, ndtri

from graphtune.envs.base import Environment, NodeOutcome, QuestionResult
from graphtune.envs.simulated.profile import Profile, load_profile
from graphtune.envs.synthesis import (SUPPORTED_ROLES, NodePlan, Plan, SynthesisRule, acts_like_map, check_graph,
                                      execution_plan)
from graphtune.errors import EnvError
from graphtune.graphs.cost import CostModel, ModelInfo, TaskShape, node_flops, node_latency_s, node_usd
from graphtune.graphs.model import Graph, RoleSpec

SPLITS = ("dev", "test")
__all__ = ["SPLITS", "SUPPORTED_ROLES", "SimulatedEnvironment", "Simulation"]

# -- counter-based hashing (splitmix64 over uint64 arrays) ----------------------------

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_INV53 = 1.0 / float(1 << 53)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, elementwise on a uint64 array (wraps mod 2^64)."""
    z = x + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def _unit(x: np.ndarray) -> np.ndarray:
    """uint64 -> float64 uniform in [0, 1)."""
    return (x >> np.uint64(11)).astype(np.float64) * _INV53


def _key(*parts: object) -> np.uint64:
    """A stable 64-bit key of some values (same in every process and platform)."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return np.uint64(int.from_bytes(digest, "little"))


def _streams(base: np.ndarray, n: int) -> list[np.ndarray]:
    """``n`` independent uniform streams derived from per-question keys ``base``."""
    with np.errstate(over="ignore"):
        return [_unit(_mix(base + np.uint64(j + 1) * _GOLDEN)) for j in range(n)]


@dataclass(frozen=True)
class Simulation:
    """Raw per-question, per-node outcome arrays (canonical node positions as columns)."""

    answers: np.ndarray  # (Q, n) int, 0 = correct
    prompt_tokens: np.ndarray  # (Q, n) int
    completion_tokens: np.ndarray  # (Q, n) int
    sink: int

    @property
    def correct(self) -> np.ndarray:
        """(Q,) bool: the graph's answer is right."""
        return self.answers[:, self.sink] == 0


class SimulatedEnvironment(Environment):
    """A task simulated from a :class:`Profile`; deterministic given ``seed``.

    ``profile`` is a built-in name (``math``, ``mmlu``, ``humaneval``), a path to a
    YAML/JSON profile, or a :class:`Profile`. Every model of ``costs.pool`` must be in the
    profile. The ``dev`` and ``test`` splits are disjoint question populations drawn from
    the profile's difficulty distribution.
    """

    kind = "simulated"

    def __init__(self, profile: Profile | str | Path, costs: CostModel, *, seed: int = 0,
                 dev_size: int = 100, test_size: int = 500, roles: Iterable[RoleSpec] = ()):
        self.profile = load_profile(profile)
        #: roles users define, modelled as the built-in role each acts like
        self.roles = tuple(roles)
        self._acts_like = acts_like_map(self.roles)
        self.costs = costs
        self.seed = int(seed)
        p = self.profile
        missing = [m for m in costs.pool if m not in p.model_names]
        if missing:
            raise EnvError(f"model {missing[0]!r} of the pool is not in simulator profile {p.name!r} "
                           f"({p.source}); the profile's models: {list(p.model_names)}; add it to the profile "
                           "with its measured accuracy")
        for size, label in ((dev_size, "dev_size"), (test_size, "test_size")):
            if int(size) < 1:
                raise EnvError(f"{label} must be at least 1, got {size}")
        self._sizes = {"dev": int(dev_size), "test": int(test_size)}
        self._build_questions()
        self._plans: dict[Graph, Plan] = {}
        self._source_cache: dict[tuple[int, str, str], np.ndarray] = {}
        self._wrong_cdf: dict[str, np.ndarray] = {}
        self._hardness: dict[str, np.ndarray] = {}

    @property
    def rule(self) -> SynthesisRule:
        """The synthesis rule with this profile's parameters (shared with the replay)."""
        return SynthesisRule(self.profile)

    # -- the Environment contract ----------------------------------------------------
    def split(self, name: str) -> list[str]:
        if name not in self._sizes:
            raise EnvError(f"unknown split {name!r}; the simulator has splits {list(SPLITS)}")
        return list(self._ids[name])

    @property
    def shape(self) -> TaskShape:
        return TaskShape(self.profile.input_tokens, self.profile.output_tokens)

    def describe(self) -> str:
        p = self.profile
        return (f"Task '{p.name}': {p.task}. Answer format: {p.answer_format}. "
                f"Prompts average about {p.input_tokens:.0f} tokens and answers about "
                f"{p.output_tokens:.0f} tokens; every predecessor's answer is appended to a node's prompt.")

    def evaluate(self, graph: Graph, question_ids: Sequence[str]) -> list[QuestionResult]:
        plan = self._plan_of(graph)
        idx = self._indices(question_ids)
        sim = self._run(plan, idx)
        return self._package(plan, sim, list(question_ids))

    # -- fast paths (calibration, benchmarks) -----------------------------------------
    def simulate(self, graph: Graph, question_ids: Sequence[str]) -> Simulation:
        """The raw outcome arrays, without building result objects (columns are
        canonical node positions)."""
        return self._run(self._plan_of(graph), self._indices(question_ids))

    def accuracy(self, graph: Graph, question_ids: Sequence[str]) -> float:
        """Fraction of questions the graph answers correctly."""
        return float(self.simulate(graph, question_ids).correct.mean())

    # -- questions ----------------------------------------------------------------------
    def _build_questions(self) -> None:
        p = self.profile
        self._ids: dict[str, tuple[str, ...]] = {}
        keys, diffs = [], []
        self._split_slices: dict[str, slice] = {}
        start = 0
        for name in SPLITS:
            n = self._sizes[name]
            ids = tuple(f"{p.name}-{name}-{i:04d}" for i in range(n))
            self._ids[name] = ids
            skey = _key("questions", self.seed, p.name, name)
            with np.errstate(over="ignore"):
                qk = _mix(np.arange(n, dtype=np.uint64) * _GOLDEN ^ skey)
            diffs.append(p.difficulty_spread * self._stratified_normal(qk, "difficulty"))
            keys.append(qk)
            self._split_slices[name] = slice(start, start + n)
            start += n
        self._qkey = np.concatenate(keys)
        self._difficulty = np.concatenate(diffs)
        self._index = {qid: i for i, qid in enumerate(self._ids["dev"] + self._ids["test"])}
        noise = ndtri(np.clip(_unit(_mix(self._qkey ^ _key("prompt"))), 1e-12, 1 - 1e-12))
        tau = p.token_noise
        self._prompt_base = np.maximum(1, np.rint(p.input_tokens * np.exp(tau * noise - tau * tau / 2))).astype(np.int64)

    @staticmethod
    def _stratified_normal(keys: np.ndarray, label: str) -> np.ndarray:
        """One standard-normal value per key: one per 1/n quantile slice, in hashed order,
        so a split's values follow N(0, 1) closely (single-model accuracy then lands on its
        target without sampling noise)."""
        n = len(keys)
        with np.errstate(over="ignore"):
            slot = np.argsort(_unit(_mix(keys ^ _key("slot", label))), kind="stable")
            jitter = _unit(_mix(keys ^ _key("jitter", label)))
        rank = np.empty(n, dtype=np.int64)
        rank[slot] = np.arange(n)
        return ndtri((rank + jitter) / n)

    def _hardness_of(self, model: str) -> np.ndarray:
        """(N_questions,) ``b_q - e_qm``: how hard each question is for ``model``."""
        h = self._hardness.get(model)
        if h is None:
            h = self._difficulty.copy()
            t = self.profile.idiosyncrasy
            if t > 0:
                for sl in self._split_slices.values():
                    h[sl] -= t * self._stratified_normal(self._qkey[sl], f"idio/{self.seed}/{model}")
            self._hardness[model] = h
        return h

    def _indices(self, question_ids: Sequence[str]) -> np.ndarray:
        try:
            return np.fromiter((self._index[q] for q in question_ids), dtype=np.int64, count=len(question_ids))
        except KeyError as err:
            raise EnvError(f"unknown question id {err.args[0]!r}; ids look like "
                           f"{self._ids['test'][0]!r} (splits: dev {self._sizes['dev']}, "
                           f"test {self._sizes['test']}; use env.split(name))") from None

    # -- per-model data -------------------------------------------------------------------
    @cached_property
    def _model_info(self) -> dict[str, tuple[float, float, float, ModelInfo]]:
        """name -> (ability, tolerance z_m, verbosity, ModelInfo)."""
        out = {}
        for name, info in self.costs.pool.items():
            mp = self.profile.model(name)
            z = self.rule.tolerance(info.params)
            out[name] = (mp.ability, z, mp.verbosity, info)
        return out

    def _model(self, name: str) -> tuple[float, float, float, ModelInfo]:
        try:
            return self._model_info[name]
        except KeyError:
            raise EnvError(f"graph uses model {name!r}, which is not in the pool "
                           f"{sorted(self.costs.pool)}") from None

    def _wrong_cdf_of(self, model: str) -> np.ndarray:
        """(N_questions, K) cumulative distribution of model's wrong answers 1..K."""
        cdf = self._wrong_cdf.get(model)
        if cdf is None:
            p = self.profile
            k = p.n_wrong
            zipf = np.arange(1, k + 1, dtype=np.float64) ** -p.wrong_answer_skew
            zipf /= zipf.sum()
            # the model's own preference: the same Zipf weights over a permutation of the
            # wrong answers, drawn per question from a hash of (seed, question, model)
            with np.errstate(over="ignore"):
                mk = _mix(self._qkey ^ _key("pref", self.seed, model))
                cells = _mix(mk[:, None] + np.arange(k, dtype=np.uint64)[None, :] * _GOLDEN)
            perm_rank = np.argsort(np.argsort(cells, axis=1), axis=1)
            own = zipf[perm_rank]
            probs = p.error_correlation * zipf[None, :] + (1.0 - p.error_correlation) * own
            cdf = np.cumsum(probs, axis=1)
            cdf[:, -1] = 1.0
            self._wrong_cdf[model] = cdf
        return cdf

    def _draw_wrong(self, model: str, idx: np.ndarray, u: np.ndarray) -> np.ndarray:
        cdf = self._wrong_cdf_of(model)[idx]
        return 1 + np.minimum((cdf <= u[:, None]).sum(axis=1), self.profile.n_wrong - 1)

    def _source_correct(self, node: NodePlan) -> np.ndarray:
        """(N_questions,) bool: is the first attempt of a source node right?

        Systematic sampling within each split (in a hashed order): every question keeps
        its exact marginal ``sigmoid(a - b_q)``, and the number right in a split is that
        expectation rounded, so single-model accuracy shows no Bernoulli noise.
        """
        ck = (node.pos, node.model, node.role)
        hit = self._source_cache.get(ck)
        if hit is None:
            ability = self._model(node.model)[0]
            hit = np.zeros(len(self._qkey), dtype=bool)
            for name, sl in self._split_slices.items():
                k = _key("source", self.seed, self.profile.name, name, *ck)
                n = sl.stop - sl.start
                with np.errstate(over="ignore"):
                    order = np.argsort(_mix(np.arange(n, dtype=np.uint64) * _GOLDEN ^ k), kind="stable")
                    v = float(_unit(_mix(np.array([k ^ _GOLDEN])))[0])
                prob = expit(ability - self._hardness_of(node.model)[sl])[order]
                c = np.cumsum(prob) + v
                prev = np.concatenate(([v], c[:-1]))
                local = np.zeros(n, dtype=bool)
                local[order] = np.floor(c) > np.floor(prev)
                hit[sl] = local
            self._source_cache[ck] = hit
        return hit

    # -- evaluation ---------------------------------------------------------------------
    def _plan_of(self, graph: Graph) -> Plan:
        plan = self._plans.get(graph)
        if plan is None:
            check_graph(graph, "the simulator", lambda n: self._model(n.model), self.roles)
            plan = execution_plan(graph, self._acts_like)
            if len(self._plans) > 4096:
                self._plans.clear()
            self._plans[graph] = plan
        return plan

    def _run(self, plan: Plan, idx: np.ndarray) -> Simulation:
        p = self.profile
        rule = SynthesisRule(p)
        nq, nn = len(idx), len(plan.nodes)
        answers = np.zeros((nq, nn), dtype=np.int64)
        completion = np.zeros((nq, nn), dtype=np.int64)
        prompt = np.zeros((nq, nn), dtype=np.int64)
        qkey = self._qkey[idx]
        rows = np.arange(nq)
        tau = p.token_noise
        n_answers = p.n_wrong + 1
        for node in plan.nodes:
            ability, z, verbosity, _ = self._model(node.model)
            b = self._hardness_of(node.model)[idx]
            salt = _key("node", self.seed, node.pos, node.model, node.role)
            with np.errstate(over="ignore"):
                base = _mix(qkey ^ salt)
                if node.preds:
                    # the sorted multiset of input answers, hashed order-free (a sum of
                    # hashes), so twin inputs are interchangeable
                    ik = np.zeros(nq, dtype=np.uint64)
                    for q in node.preds:
                        ik += _mix(answers[:, q].astype(np.uint64) + _GOLDEN)
                    base = _mix(base ^ ik)
                    # the selection randomness a synthesiser shares with every node of its
                    # model and role that sees the same inputs (identical prompts pick alike)
                    shared = _mix(_mix(qkey ^ _key("pick", self.seed, node.model, node.role)) ^ ik)
            u_own, u_wrong, u_pick, u_garble, u_tok, u_broken, u_mode = _streams(base, 7)
            if not node.preds:
                correct = self._source_correct(node)[idx]
                ans = np.where(correct, 0, self._draw_wrong(node.model, idx, u_wrong))
                prompt[:, node.pos] = self._prompt_base[idx]
            else:
                x = ability - b  # the node's ability on each question, in logits
                penalty = rule.context_penalty(len(node.preds), z)
                own_right = u_own < rule.own_right(x, penalty)
                own = np.where(own_right, 0, self._draw_wrong(node.model, idx, u_wrong))
                votes = np.zeros((nq, n_answers))
                for q in node.preds:
                    votes[rows, answers[:, q]] += 1.0
                votes[rows, own] += rule.own_weight(node.role)
                gamma = rule.sharpness(node.role)
                weight = votes ** gamma if gamma != 1.0 else votes
                weight[:, 0] *= np.exp(rule.beta(x, penalty))
                cum = np.cumsum(weight, axis=1)
                total = cum[:, -1]
                if rule.diversity < 1.0:
                    u_shared = _streams(shared, 1)[0]
                    u_pick = np.where(u_mode < rule.diversity, u_pick, u_shared)
                ans = (cum <= (u_pick * total)[:, None]).sum(axis=1)
                ans = np.minimum(ans, n_answers - 1)
                # nothing to choose from (all weights zero) cannot happen: own votes > 0
                # unless own weight is 0 and every input weight vanished; fall back to own
                ans = np.where(total > 0, ans, own)
                garble = rule.garble(node.level, z)
                broken = (ans == 0) & (u_garble < garble)
                if broken.any():
                    ans = np.where(broken, self._draw_wrong(node.model, idx, u_broken), ans)
                prompt[:, node.pos] = self._prompt_base[idx] + completion[:, list(node.preds)].sum(axis=1)
            answers[:, node.pos] = ans
            noise = ndtri(np.clip(u_tok, 1e-12, 1 - 1e-12))
            completion[:, node.pos] = np.maximum(
                1, np.rint(p.output_tokens * verbosity * np.exp(tau * noise - tau * tau / 2)))
        return Simulation(answers=answers, prompt_tokens=prompt, completion_tokens=completion, sink=plan.sink)

    def _package(self, plan: Plan, sim: Simulation, question_ids: list[str]) -> list[QuestionResult]:
        infos = {node.pos: self._model(node.model)[3] for node in plan.nodes}
        answers = sim.answers.tolist()
        prompts = sim.prompt_tokens.tolist()
        completions = sim.completion_tokens.tolist()
        order = [node.pos for node in plan.nodes]
        preds = {node.pos: node.preds for node in plan.nodes}
        original = plan.original_ids
        out = []
        for qi, qid in enumerate(question_ids):
            ans_row, p_row, c_row = answers[qi], prompts[qi], completions[qi]
            finish: dict[int, float] = {}
            flops = usd = 0.0
            outcomes = []
            for pos in order:
                m = infos[pos]
                pt, ct = p_row[pos], c_row[pos]
                lat = node_latency_s(m, pt, ct)
                finish[pos] = max((finish[q] for q in preds[pos]), default=0.0) + lat
                flops += node_flops(m, pt, ct)
                usd += node_usd(m, pt, ct)
                a = ans_row[pos]
                outcomes.append(NodeOutcome(node_id=original[pos], answer=str(a), correct=a == 0,
                                            prompt_tokens=pt, completion_tokens=ct, latency_s=lat))
            final = ans_row[plan.sink]
            out.append(QuestionResult(
                question_id=qid, answer=str(final), correct=final == 0, score=1.0 if final == 0 else 0.0,
                prompt_tokens=sum(p_row), completion_tokens=sum(c_row), flops=flops, usd=usd,
                latency_s=max(finish.values()), nodes=tuple(outcomes)))
        return out
