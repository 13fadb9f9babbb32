"""A probabilistic collaboration graph: a real distribution over the graphs of a space.

Layout. ``S = space.max_nodes`` node *slots* in a fixed order, named ``s0 .. s{S-1}``;
the last slot is the sink. Parameters (all logits, float64):

* ``model_logits[j, m]``: categorical over the space's models for slot j;
* ``role_logits[j, r]``: categorical over the space's roles for slot j, masked to the
  roles the slot may take (``Space.role_allowed``: no input-needing role without a
  predecessor, no input-less role with one, the sink only ``space.sink_roles`` and roles
  that may be the sink);
* ``edge_logits[i, j]`` for i < j, and ``slot_logits[i]``: edge ``s_i -> s_j`` is drawn
  with probability ``sigmoid(edge_logits[i, j] + slot_logits[i])``. ``slot_logits[i]``
  is slot i's *activation*: a shared bias on every edge leaving it (a slot does work
  only when it feeds something that reaches the sink).

The latent sample ``z`` draws, for every slot j independently: its model, its incoming
edges from slots i < j (in the order i = j-1 .. 0; once ``space.max_in_degree`` edges
are drawn the rest are forced absent, with probability one), then its role given
whether it got an input. Since edges only go from lower to higher slots, every sample
is a DAG. The graph is ``z`` pruned to the ancestors of the sink (slots that do not
reach the sink do no work), its nodes keeping their slot names.

Two log-probabilities:

* ``log_prob(sample)``: of the full latent ``z`` (every factor of every slot);
* ``log_prob(graph)`` / ``log_prob(sample, marginal=True)``: of the *slot-labelled
  pruned graph*: the product over reached slots of their model, role and every
  incoming edge bit. The factors of unreached slots sum out (they cannot change which
  slots are reached: reachability flows from the sink downwards through edges *out* of
  a slot), so this is the exact marginal probability of the graph with its slot names.
  Its score function is the REINFORCE gradient we use: unbiased, and free of the noise
  of factors that did not influence the evaluated graph.

Budget and space limits (width, depth, budget) are handled by **rejection**, not
repair: ``sample`` redraws until the graph is valid and in budget, so accepted graphs
follow ``p`` restricted to the feasible set F, ``q(z) = p(z) / p(F)``. Then
``grad log q = grad log p - grad log p(F)``, and the second term is the same for every
sample of a batch; with a baseline equal to the batch mean (or advantages normalised to
zero mean, as the searchers do) its contribution ``sum_k (R_k - mean R) * grad log p(F)``
is exactly zero. So ``grad_log_prob`` of the graph actually evaluated gives the exact
gradient of the truncated distribution, with no estimate of ``p(F)``. (A repair step
would make the mapping z -> graph many-to-one in a parameter-dependent way, and
rejection keeps the learned probabilities an honest description of feasible graphs.)

``entropy()`` is the exact entropy of the latent policy (every factor of every slot),
which bounds the entropy of the graph distribution from above; the entropy floor keeps
it above a fraction of its maximum so the search does not collapse early.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from graphtune.errors import BudgetError, GraphError
from graphtune.graphs.cost import Budget, CostModel
from graphtune.graphs.model import Graph, Node
from graphtune.graphs.space import Space, prune_to_sink, structural_errors

STATE_VERSION = 1


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x)
    return x - (m + math.log(float(np.sum(np.exp(x - m)))))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _bern_entropy(p: float) -> float:
    if p <= 0.0 or p >= 1.0:
        return 0.0
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


def _non_finite(model_preference: Mapping[str, Any] | None, role_preference: Mapping[str, Any] | None,
                edge_changes: Sequence[Mapping[str, Any]], scale: float, max_delta: float) -> str | None:
    """The first non-finite number of an update, named (None when all are finite)."""
    named: list[tuple[str, Any]] = [("scale", scale), ("max_delta", max_delta)]
    named += [(f"model_preference[{k!r}]", x) for k, x in (model_preference or {}).items()]
    named += [(f"role_preference[{k!r}]", x) for k, x in (role_preference or {}).items()]
    named += [(f"edge_changes[{i}].delta", ch.get("delta", 0.0)) for i, ch in enumerate(edge_changes)]
    for name, x in named:
        try:
            ok = math.isfinite(float(x))
        except (TypeError, ValueError, OverflowError):
            ok = False
        if not ok:
            return name
    return None


@dataclass(frozen=True)
class GraphSample:
    """One latent draw: per slot model and role index (role -1 where no role is
    allowed), the incoming edge bits that were actually drawn (not forced by the
    in-degree cap), the slots that reach the sink, and the pruned graph."""

    models: tuple[int, ...]
    roles: tuple[int, ...]
    #: (i, j, bit) for every edge variable drawn; forced-absent edges are not listed
    edge_bits: tuple[tuple[int, int, int], ...]
    reached: tuple[bool, ...]
    graph: Graph

    @property
    def edges(self) -> tuple[tuple[int, int], ...]:
        return tuple((i, j) for i, j, b in self.edge_bits if b)


class ProbabilisticGraph:
    """A distribution over the graphs of ``space`` that fit ``budget`` (see module doc)."""

    def __init__(self, space: Space, costs: CostModel, budget: Budget, *, edge_init: float = -1.0,
                 logit_clip: float = 6.0):
        if space.max_nodes < 1:
            raise GraphError("space.max_nodes must be at least 1")
        self.space, self.costs, self.budget = space, costs, budget
        self.models: tuple[str, ...] = tuple(space.models)
        self.roles: tuple[str, ...] = tuple(space.roles)
        self.S = int(space.max_nodes)
        self.sink = self.S - 1
        self.logit_clip = float(logit_clip)
        S, M, R = self.S, len(self.models), len(self.roles)
        self.model_logits = np.zeros((S, M))
        self.role_logits = np.zeros((S, R))
        self.edge_logits = np.full((S, S), float(edge_init))
        self.slot_logits = np.zeros(S)
        self._iu = np.triu_indices(S, k=1)
        # role masks per (slot, has_input): the space's rules of each role (inputs needed,
        # inputs taken, may be the sink), built-in or declared by the user
        self._role_mask = np.ones((S, 2, R), dtype=bool)
        for j in range(S):
            for has_in in (0, 1):
                for k, r in enumerate(self.roles):
                    self._role_mask[j, has_in, k] = space.role_allowed(r, has_inputs=bool(has_in),
                                                                       is_sink=j == self.sink)
        # Adam moments of the flat parameter vector
        self._adam_m = np.zeros(self.n_params)
        self._adam_v = np.zeros(self.n_params)
        self._adam_t = 0
        self._cost_cache: dict[tuple[int, int], tuple[float, float]] = {}
        self._tab: dict[str, np.ndarray] | None = None  # probability tables, rebuilt after a change

    def _tables(self) -> dict[str, np.ndarray]:
        """Model/role probabilities and edge probabilities for the current logits (the
        hot path of sampling and of the entropy floor); invalidated by ``set_params``."""
        if self._tab is None:
            S, R = self.S, len(self.roles)
            pm = np.exp(self.model_logits - self.model_logits.max(axis=1, keepdims=True))
            pm /= pm.sum(axis=1, keepdims=True)
            pe = 1.0 / (1.0 + np.exp(-(self.edge_logits + self.slot_logits[:, None])))
            pr = np.zeros((S, 2, R))
            for j in range(S):
                for h in (0, 1):
                    mask = self._role_mask[j, h]
                    if mask.any():
                        x = self.role_logits[j][mask]
                        e = np.exp(x - x.max())
                        pr[j, h, mask] = e / e.sum()
            self._tab = {"pm": pm, "cm": np.cumsum(pm, axis=1), "pe": pe, "pr": pr, "cr": np.cumsum(pr, axis=2)}
        return self._tab

    # -- naming --------------------------------------------------------------------------
    @staticmethod
    def slot_id(i: int) -> str:
        return f"s{i}"

    def slot_index(self, node_id: str) -> int | None:
        """Slot index of a slot name (``s3`` -> 3), None for any other name."""
        if node_id.startswith("s") and node_id[1:].isdigit():
            i = int(node_id[1:])
            if 0 <= i < self.S:
                return i
        return None

    # -- probabilities -------------------------------------------------------------------
    def edge_prob(self, i: int, j: int) -> float:
        return float(self._tables()["pe"][i, j])

    def model_probs(self, j: int) -> np.ndarray:
        return self._tables()["pm"][j]

    def role_probs(self, j: int, has_input: bool) -> np.ndarray:
        return self._tables()["pr"][j, int(has_input)]

    def model_marginals(self) -> dict[str, float]:
        """Mean model probability over slots (for reports)."""
        p = np.mean([self.model_probs(j) for j in range(self.S)], axis=0)
        return {m: float(x) for m, x in zip(self.models, p)}

    # -- sampling ------------------------------------------------------------------------
    def _draw_latent(self, rng: np.random.Generator) -> tuple[list[int], list[int], list[tuple[int, int, int]]]:
        S, cap = self.S, self.space.max_in_degree
        # one uniform per factor, drawn up front: (model, S-1 edge slots, role) per slot
        u = rng.random((S, S + 1))
        t = self._tables()
        cmt, pe, crt = t["cm"], t["pe"], t["cr"]
        M, R = len(self.models), len(self.roles)
        models: list[int] = []
        roles: list[int] = []
        bits: list[tuple[int, int, int]] = []
        for j in range(S):
            cm = cmt[j]
            models.append(min(int(np.searchsorted(cm, u[j, 0] * cm[-1], side="right")), M - 1))
            k = 0
            for n, i in enumerate(range(j - 1, -1, -1)):
                if k >= cap:
                    break  # forced absent: probability one, no factor
                b = int(u[j, 1 + n] < pe[i, j])
                bits.append((i, j, b))
                k += b
            cr = crt[j, int(k > 0)]
            if cr[-1] > 0:
                roles.append(min(int(np.searchsorted(cr, u[j, S] * cr[-1], side="right")), R - 1))
            else:
                roles.append(-1)
        return models, roles, bits

    def _quick_reject(self, models: Sequence[int], bits: Sequence[tuple[int, int, int]],
                      budget: Budget | None = None) -> bool:
        """Cheap budget check on the reached nodes (FLOPs, units, dollars depend only on
        each node's model and in-degree) before building the graph."""
        b = self.budget if budget is None else budget
        if b.units is None and b.flops is None and b.usd is None:
            return False
        preds: list[list[int]] = [[] for _ in range(self.S)]
        for i, j, x in bits:
            if x:
                preds[j].append(i)
        reached = [False] * self.S
        reached[self.sink] = True
        flops = usd = 0.0
        for j in range(self.S - 1, -1, -1):
            if reached[j]:
                for i in preds[j]:
                    reached[i] = True
                f, d = self._node_cost(models[j], len(preds[j]))
                flops += f
                usd += d
        tol = 1 + 1e-9
        return bool((b.units is not None and flops / self.costs.unit_flops > b.units * tol)
                    or (b.flops is not None and flops > b.flops * tol) or (b.usd is not None and usd > b.usd * tol))

    def _node_cost(self, model: int, in_degree: int) -> tuple[float, float]:
        key = (model, in_degree)
        if key not in self._cost_cache:
            from graphtune.graphs.cost import node_flops, node_usd

            m = self.costs.model(self.models[model])
            p, c = self.costs.node_tokens(in_degree)
            self._cost_cache[key] = (node_flops(m, p, c), node_usd(m, p, c))
        return self._cost_cache[key]

    def _build(self, models: Sequence[int], roles: Sequence[int],
               bits: Sequence[tuple[int, int, int]]) -> tuple[Graph | None, tuple[bool, ...]]:
        S = self.S
        preds: list[list[int]] = [[] for _ in range(S)]
        for i, j, b in bits:
            if b:
                preds[j].append(i)
        reached = [False] * S
        reached[self.sink] = True
        for j in range(S - 1, -1, -1):
            if reached[j]:
                for i in preds[j]:
                    reached[i] = True
        if any(roles[j] < 0 for j in range(S) if reached[j]):
            return None, tuple(reached)
        nodes = [Node.make(self.slot_id(j), self.roles[roles[j]], self.models[models[j]])
                 for j in range(S) if reached[j]]
        edges = [(self.slot_id(i), self.slot_id(j)) for j in range(S) if reached[j] for i in preds[j]]
        return Graph.build(nodes, edges), tuple(reached)

    def feasible(self, graph: Graph, budget: Budget | None = None) -> bool:
        """Whether ``graph`` fits the space and ``budget`` (default: the distribution's own)."""
        if structural_errors(graph, self.space):
            return False
        return (self.budget if budget is None else budget).fits(self.costs.cost(graph))

    def sample_unconstrained(self, rng: np.random.Generator) -> GraphSample | None:
        """One latent draw without the feasibility check (None when a reached slot has no
        allowed role)."""
        models, roles, bits = self._draw_latent(rng)
        g, reached = self._build(models, roles, bits)
        if g is None:
            return None
        return GraphSample(tuple(models), tuple(roles), tuple(bits), reached, g)

    def sample(self, rng: np.random.Generator, *, max_tries: int = 5000,
               budget: Budget | None = None) -> tuple[GraphSample, float]:
        """A feasible sample and its marginal log-probability (of the slot-labelled graph,
        before truncation to the feasible set; see the module doc for why that is the
        right one for the gradient). Rejection sampling on space limits and ``budget``
        (default: the distribution's own; a pipeline's stage draws under its share)."""
        for _ in range(max_tries):
            models, roles, bits = self._draw_latent(rng)
            if self._quick_reject(models, bits, budget):
                continue
            g, reached = self._build(models, roles, bits)
            if g is None:
                continue
            s = GraphSample(tuple(models), tuple(roles), tuple(bits), reached, g)
            if self.feasible(s.graph, budget):
                return s, self.log_prob(s, marginal=True)
        raise BudgetError(f"no feasible graph in {max_tries} draws from the probabilistic graph; "
                          "raise `budget` or relax `space`")

    # -- log-probability and its gradient ------------------------------------------------
    def _factors(self, sample: GraphSample, marginal: bool):
        """Yield (kind, slot, payload) for every factor counted in the log-probability."""
        counted = [bool(sample.reached[j]) or not marginal for j in range(self.S)]
        has_in = [False] * self.S
        for i, j, b in sample.edge_bits:
            if b:
                has_in[j] = True
        for j in range(self.S):
            if counted[j]:
                yield "model", j, sample.models[j]
                if sample.roles[j] >= 0:
                    yield "role", j, (sample.roles[j], has_in[j])
        for i, j, b in sample.edge_bits:
            if counted[j]:
                yield "edge", j, (i, b)

    def log_prob(self, x: GraphSample | Graph, *, marginal: bool | None = None) -> float:
        """Log-probability of a latent sample (``marginal=False``, the default for a
        sample) or of a slot-labelled graph (``marginal=True``; a ``Graph`` argument must
        name its nodes by slot, ``s0``..``s{S-1}`` with the sink last). ``-inf`` when the
        graph cannot come from this distribution."""
        if isinstance(x, Graph):
            sample = self.embed(x)
            if sample is None:
                return float("-inf")
            marginal = True
        else:
            sample = x
            marginal = bool(marginal)
        lp = 0.0
        for kind, j, pay in self._factors(sample, marginal):
            if kind == "model":
                lp += float(_log_softmax(self.model_logits[j])[pay])
            elif kind == "role":
                r, h = pay
                mask = self._role_mask[j, int(h)]
                if not mask[r]:
                    return float("-inf")
                lr = _log_softmax(self.role_logits[j][mask])
                lp += float(lr[int(np.sum(mask[:r]))])
            else:
                i, b = pay
                z = float(self.edge_logits[i, j] + self.slot_logits[i])
                lp += _log_sigmoid(z) if b else _log_sigmoid(-z)
        return lp

    def embed(self, graph: Graph) -> GraphSample | None:
        """The slot-labelled sample of a graph whose nodes are named by slot (None when
        it is not one: other names, wrong sink, an edge i -> j with i >= j, an in-degree
        above the cap, unknown model or role)."""
        idx = {}
        for n in graph.nodes:
            i = self.slot_index(n.id)
            if i is None or n.model not in self.models or n.role not in self.roles:
                return None
            idx[n.id] = i
        if self.slot_id(self.sink) not in idx:
            return None
        preds: dict[int, set[int]] = {j: set() for j in idx.values()}
        for u, v in graph.edges:
            if idx[u] >= idx[v]:
                return None
            preds[idx[v]].add(idx[u])
        models, roles = [0] * self.S, [0] * self.S
        reached = [False] * self.S
        for n in graph.nodes:
            j = idx[n.id]
            models[j], roles[j], reached[j] = self.models.index(n.model), self.roles.index(n.role), True
        bits: list[tuple[int, int, int]] = []
        cap = self.space.max_in_degree
        for j in range(self.S):
            if not reached[j]:
                continue
            if len(preds[j]) > cap:
                return None
            k = 0
            for i in range(j - 1, -1, -1):
                if k >= cap:
                    break
                b = int(i in preds[j])
                bits.append((i, j, b))
                k += b
        # the graph must be exactly the pruned one: every node reaches the sink
        g2 = prune_to_sink(graph, self.slot_id(self.sink))
        if g2.size != graph.size:
            return None
        return GraphSample(tuple(models), tuple(roles), tuple(bits), tuple(reached), graph)

    def grad_log_prob(self, sample: GraphSample, *, marginal: bool = True) -> np.ndarray:
        """Analytic gradient of ``log_prob(sample, marginal=...)`` w.r.t. the flat
        parameter vector (see ``params``)."""
        gM = np.zeros_like(self.model_logits)
        gR = np.zeros_like(self.role_logits)
        gE = np.zeros_like(self.edge_logits)
        gA = np.zeros_like(self.slot_logits)
        for kind, j, pay in self._factors(sample, marginal):
            if kind == "model":
                gM[j] -= np.exp(_log_softmax(self.model_logits[j]))
                gM[j, pay] += 1.0
            elif kind == "role":
                r, h = pay
                mask = self._role_mask[j, int(h)]
                gR[j][mask] -= np.exp(_log_softmax(self.role_logits[j][mask]))
                gR[j, r] += 1.0
            else:
                i, b = pay
                d = b - _sigmoid(float(self.edge_logits[i, j] + self.slot_logits[i]))
                gE[i, j] += d
                gA[i] += d
        return self._flatten(gM, gR, gE, gA)

    # -- entropy -------------------------------------------------------------------------
    def _slot_edge_entropy(self, j: int) -> tuple[float, float]:
        """Entropy of slot j's incoming edge bits (with the in-degree cap) and the
        probability that it gets at least one input."""
        cap = self.space.max_in_degree
        # dist[k] = P(k edges drawn so far)
        dist = np.zeros(cap + 2)
        dist[0] = 1.0
        h = 0.0
        for i in range(j - 1, -1, -1):
            p = self.edge_prob(i, j)
            alive = float(dist[:cap].sum())  # capacity remains: the bit is drawn
            h += alive * _bern_entropy(p)
            new = dist.copy()
            new[1:cap + 1] += dist[:cap] * p
            new[:cap] -= dist[:cap] * p
            dist = new
        return h, float(1.0 - dist[0])

    def entropy(self) -> float:
        """Exact entropy (nats) of the latent policy: every slot's model, incoming edges
        (under the in-degree cap) and role given whether it has an input."""
        total = 0.0
        for j in range(self.S):
            pm = self.model_probs(j)
            total += float(-np.sum(pm[pm > 0] * np.log(pm[pm > 0])))
            he, p_in = self._slot_edge_entropy(j)
            total += he
            for has_in, w in ((True, p_in), (False, 1.0 - p_in)):
                pr = self.role_probs(j, has_in)
                nz = pr[pr > 0]
                total += w * float(-np.sum(nz * np.log(nz)))
        return total

    def max_entropy(self) -> float:
        """Entropy with every logit at zero (the most random policy of this layout)."""
        saved = self.params.copy()
        self.set_params(np.zeros_like(saved))
        try:
            return self.entropy()
        finally:
            self.set_params(saved)

    def enforce_entropy_floor(self, min_entropy: float) -> float:
        """If the entropy is below ``min_entropy``, shrink every logit towards zero by the
        smallest common factor that restores it (bisection). Returns the factor used."""
        if self.entropy() >= min_entropy:
            return 1.0
        base = self.params.copy()
        lo, hi = 0.0, 1.0  # entropy(lo * base) >= floor > entropy(hi * base)
        for _ in range(30):
            mid = (lo + hi) / 2
            self.set_params(mid * base)
            if self.entropy() >= min_entropy:
                lo = mid
            else:
                hi = mid
        self.set_params(lo * base)
        return lo

    # -- parameters and updates ----------------------------------------------------------
    def _flatten(self, M: np.ndarray, R: np.ndarray, E: np.ndarray, A: np.ndarray) -> np.ndarray:
        return np.concatenate([M.ravel(), R.ravel(), E[self._iu], A[: self.S - 1]])

    @property
    def n_params(self) -> int:
        S = self.S
        return S * len(self.models) + S * len(self.roles) + S * (S - 1) // 2 + (S - 1)

    @property
    def params(self) -> np.ndarray:
        return self._flatten(self.model_logits, self.role_logits, self.edge_logits, self.slot_logits)

    def set_params(self, theta: np.ndarray) -> None:
        theta = np.asarray(theta, dtype=float)
        if theta.shape != (self.n_params,):
            raise GraphError(f"parameter vector has shape {theta.shape}, expected ({self.n_params},)")
        S, M, R = self.S, len(self.models), len(self.roles)
        a = 0
        self.model_logits = theta[a:a + S * M].reshape(S, M).copy()
        a += S * M
        self.role_logits = theta[a:a + S * R].reshape(S, R).copy()
        a += S * R
        E = np.zeros((S, S))
        n_e = S * (S - 1) // 2
        E[self._iu] = theta[a:a + n_e]
        self.edge_logits = E
        a += n_e
        A = np.zeros(S)
        A[: S - 1] = theta[a:a + S - 1]
        self.slot_logits = A
        self._tab = None

    def _clip(self) -> None:
        self.set_params(np.clip(self.params, -self.logit_clip, self.logit_clip))

    def step(self, grad: np.ndarray, lr: float, *, beta1: float = 0.9, beta2: float = 0.999,
             max_step: float = 1.0) -> float:
        """One Adam ascent step along ``grad`` (a REINFORCE estimate); each coordinate
        moves at most ``max_step``. Returns the largest move. A step that would leave a
        non-finite logit or moment is refused: nothing changes and it returns 0.0."""
        g = np.asarray(grad, dtype=float)
        t = self._adam_t + 1
        m = beta1 * self._adam_m + (1 - beta1) * g
        v = beta2 * self._adam_v + (1 - beta2) * g * g
        mh = m / (1 - beta1 ** t)
        vh = v / (1 - beta2 ** t)
        delta = np.clip(lr * mh / (np.sqrt(vh) + 1e-8), -max_step, max_step)
        theta = np.clip(self.params + delta, -self.logit_clip, self.logit_clip)
        if not (np.all(np.isfinite(m)) and np.all(np.isfinite(v)) and np.all(np.isfinite(theta))):
            # a non-finite gradient or rate would turn every logit and moment into NaN
            # for good (and a NaN state cannot be saved as JSON): refuse the step
            return 0.0
        self._adam_t, self._adam_m, self._adam_v = t, m, v
        self.set_params(theta)
        return float(np.max(np.abs(delta))) if delta.size else 0.0

    def expected_in_degree(self, j: int, shift: float = 0.0) -> float:
        cap = self.space.max_in_degree
        return min(float(cap), sum(_sigmoid(float(self.edge_logits[i, j] + self.slot_logits[i] + shift))
                                   for i in range(j)))

    def apply_deltas(self, *, model_preference: Mapping[str, float] | None = None,
                     role_preference: Mapping[str, float] | None = None,
                     edge_changes: Sequence[Mapping[str, Any]] = (),
                     target_width: int | None = None, target_depth: int | None = None,
                     scale: float = 1.0, max_delta: float = 2.0) -> dict[str, Any]:
        """Apply an agent's structured update, each delta times ``scale`` and clipped to
        ``max_delta``. Unknown models, roles or slots are skipped with a reason. Returns
        what was applied and what was rejected (plain data, for the store).

        The distribution never stores a non-finite logit: an update holding a non-finite
        number (delta, ``scale``, ``max_delta``), or one that would leave one, raises
        :class:`~graphtune.errors.GraphError` and leaves every logit as it was."""
        bad = _non_finite(model_preference, role_preference, edge_changes, scale, max_delta)
        if bad:
            raise GraphError(f"agent update refused: {bad} is not a finite number; the distribution is unchanged")
        saved = self.params.copy()
        try:
            applied = self._apply_deltas(model_preference, role_preference, edge_changes, target_width,
                                         target_depth, scale, max_delta)
        except BaseException:
            self.set_params(saved)
            raise
        if not np.all(np.isfinite(self.params)):
            self.set_params(saved)
            raise GraphError("agent update refused: it would leave a non-finite logit; the distribution is unchanged")
        return applied

    def _apply_deltas(self, model_preference, role_preference, edge_changes, target_width, target_depth,
                      scale, max_delta) -> dict[str, Any]:
        applied: dict[str, Any] = {"scale": scale, "model": {}, "role": {}, "edges": [], "rejected": []}

        def d(x: float) -> float:
            return float(np.clip(float(x) * scale, -max_delta, max_delta))

        for m, x in (model_preference or {}).items():
            if m not in self.models:
                applied["rejected"].append(f"model_preference: unknown model {m!r} (pool: {list(self.models)})")
                continue
            k = self.models.index(m)
            self.model_logits[:, k] += d(x)
            applied["model"][m] = d(x)
        for r, x in (role_preference or {}).items():
            if r not in self.roles:
                applied["rejected"].append(f"role_preference: unknown role {r!r} (roles: {list(self.roles)})")
                continue
            k = self.roles.index(r)
            self.role_logits[:, k] += d(x)
            applied["role"][r] = d(x)
        for ch in edge_changes:
            src, dst = str(ch.get("src")), str(ch.get("dst"))
            i, j = self.slot_index(src), self.slot_index(dst)
            if i is None or j is None:
                bad = src if i is None else dst
                applied["rejected"].append(f"edge_changes: unknown node {bad!r}; edges name slots s0..s{self.S - 1}")
                continue
            if i >= j:
                applied["rejected"].append(f"edge_changes: {src}->{dst} goes against the slot order "
                                           "(only s_i -> s_j with i < j exist; it would allow a cycle)")
                continue
            self.edge_logits[i, j] += d(ch.get("delta", 0.0))
            applied["edges"].append([src, dst, d(ch.get("delta", 0.0))])
        if target_width is not None:
            w = int(target_width)
            if not 1 <= w <= self.space.max_width:
                applied["rejected"].append(f"target_width {w} outside 1..{self.space.max_width}")
            else:
                # width w ~ w inputs into the sink (w = 1: a single node, no inputs)
                want = 0.0 if w == 1 else float(min(w, self.space.max_in_degree))
                shift = self._solve_shift(lambda s: self.expected_in_degree(self.sink, s), max(want, 0.05))
                self.edge_logits[: self.sink, self.sink] += d(shift)
                applied["target_width"] = {"width": w, "sink_edge_shift": d(shift)}
        if target_depth is not None:
            dep = int(target_depth)
            if not 1 <= dep <= self.space.max_depth:
                applied["rejected"].append(f"target_depth {dep} outside 1..{self.space.max_depth}")
            else:
                # depth beyond 2 needs edges between non-sink slots: aim the mean number of
                # inputs of a non-sink slot at (depth - 2) / 2, i.e. ~0 for depth <= 2
                inner = [j for j in range(1, self.sink)]
                if inner:
                    want = max(0.05, (dep - 2) / 2.0)

                    def mean_in(s: float) -> float:
                        return float(np.mean([self.expected_in_degree(j, s) for j in inner]))

                    shift = self._solve_shift(mean_in, want)
                    for j in inner:
                        self.edge_logits[:j, j] += d(shift)
                    applied["target_depth"] = {"depth": dep, "inner_edge_shift": d(shift)}
        self._clip()
        return applied

    @staticmethod
    def _solve_shift(f, target: float) -> float:
        lo, hi = -12.0, 12.0
        for _ in range(40):
            mid = (lo + hi) / 2
            if f(mid) < target:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "slots": self.S, "models": list(self.models), "roles": list(self.roles),
                "params": [float(x) for x in self.params],
                "adam": {"m": [float(x) for x in self._adam_m], "v": [float(x) for x in self._adam_v],
                         "t": self._adam_t}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if (state.get("slots") != self.S or list(state.get("models", [])) != list(self.models)
                or list(state.get("roles", [])) != list(self.roles)):
            raise GraphError("probabilistic-graph state does not match this space (slots, models or roles "
                             "changed); start a new study")
        params = np.array(state["params"], dtype=float)
        m = np.array(state["adam"]["m"], dtype=float)
        v = np.array(state["adam"]["v"], dtype=float)
        if not (np.all(np.isfinite(params)) and np.all(np.isfinite(m)) and np.all(np.isfinite(v))):
            raise GraphError("probabilistic-graph state holds non-finite values (NaN or inf, stored before "
                             "graphtune refused non-finite agent replies); start a new study")
        self.set_params(params)
        self._adam_m, self._adam_v = m, v
        self._adam_t = int(state["adam"]["t"])
