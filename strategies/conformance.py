"""The conformance kit: properties every strategy must have, checked on in-memory clients.

A :class:`SimulatedClient` does what a real fedlora client does with a
:class:`~fedlora.lora.plan.ClientPlan` (merge the stacks it lists, start from the payload
as the plan says, train what is trainable, reply with what the plan says to send), using
the same plan and base-merge code as the real client, but its "training" is a seeded
random perturbation. So a strategy is exercised end to end on its public hooks, with
numpy only: no Flower, no torch. ``fedlora check-strategy NAME`` runs the kit.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from fedlora.lora.base_merge import NodeBase, without_stacks
from fedlora.strategies.api import (
    A_SUFFIX,
    B_SUFFIX,
    AdapterError,
    AdapterState,
    ClientPlan,
    ClientUpdate,
    LoraFactors,
    LoraSpec,
    LoraStrategy,
    aggregation_error,
)


@dataclass
class SimulatedClient:
    """One fake node: an id, its rank, a number of examples and a step size for its training.

    It keeps a merged base, what its plans keep (``ClientPlan.kept``: a local lora_B) and
    the fixed bases it was sent (``ClientPlan.core_bases``) across rounds, like a real
    node's store. A ``calibrate`` plan is answered with seeded random gradients.
    """

    node_id: int
    num_examples: int
    rank: int = 4
    step: float = 0.1
    base: NodeBase = field(default_factory=NodeBase)
    local: dict[str, np.ndarray] = field(default_factory=dict)
    bases: dict[str, np.ndarray] = field(default_factory=dict)
    bases_id: str = ""

    def fresh(self, current: AdapterState, rank: int, rng: np.random.Generator) -> dict:
        """A fresh peft-like initialisation at ``rank``: random A, zero B, the current dense."""
        out: dict[str, np.ndarray] = {}
        for module, f in current.factors.items():
            bound = 1.0 / np.sqrt(f.a.shape[1])
            out[module + A_SUFFIX] = rng.uniform(-bound, bound, (rank, f.a.shape[1])).astype(
                np.float32
            )
            out[module + B_SUFFIX] = np.zeros((f.b.shape[0], rank), np.float32)
        out.update({k: v.copy() for k, v in current.dense.items()})
        return out

    def train(
        self,
        strategy: LoraStrategy,
        plan: ClientPlan,
        payload: dict[str, np.ndarray],
        current: AdapterState,
        rng: np.random.Generator,
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Follow ``plan`` on ``payload``: the reply's tensors and metrics."""
        if plan.calibrate:
            shapes = plan.reply_shapes(current)
            return {k: rng.standard_normal(v).astype(np.float32) for k, v in shapes.items()}, {}
        self.base = self.base.merged(
            payload, plan.merge_rounds, strategy.scaling, reset=plan.reset_base
        )
        fresh = self.fresh(current, plan.rank, rng)
        local = self.local if plan.local_b else None
        if plan.core_bases:
            local = plan.sent_bases(without_stacks(payload), self.bases, self.bases_id)
            self.bases, self.bases_id = local, plan.core_bases
        start = plan.start(fresh, without_stacks(payload), local)
        trained = {}
        for key, value in start.items():
            noise = self.step * rng.standard_normal(value.shape) if plan.trains(key) else 0.0
            trained[key] = (value + noise).astype(np.float32)
        if plan.local_b:
            self.local = plan.kept(trained)
        return plan.reply(trained, without_stacks(payload)), self.base.report()


def simulate_round(
    strategy: LoraStrategy,
    server_round: int,
    current: AdapterState,
    clients: Sequence[SimulatedClient],
    rng: np.random.Generator,
) -> tuple[list[ClientUpdate], dict[int, str]]:
    """Plan, send, fake-train, decode and vet one round for ``clients`` (no aggregation).

    Returns the accepted updates and, per rejected node, the strategy's reason.
    """
    updates, rejected = [], {}
    for client in clients:
        plan = strategy.client_plan(server_round, client.node_id, client.rank)
        payload = strategy.payload(server_round, client.node_id, plan, current)
        reply, metrics = client.train(strategy, plan, payload, current, rng)
        state = strategy.decode_update(server_round, plan, reply, current)
        update = ClientUpdate(client.node_id, client.num_examples, state, metrics, plan)
        veto = strategy.accept_update(server_round, update)
        if veto is None:
            updates.append(update)
        else:
            rejected[client.node_id] = veto
    return updates, rejected


# --------------------------------------------------------------------------- #
# The conformance kit                                                          #
# --------------------------------------------------------------------------- #
MODULES = {"layer.0.q": (12, 10), "layer.0.v": (12, 10), "layer.1.q": (8, 6)}
DENSE = {"head.weight": (3, 12), "head.bias": (3,)}


@dataclass(frozen=True)
class CheckResult:
    """One property of the conformance kit: passed or not, and why."""

    name: str
    passed: bool
    detail: str = ""


def _initial(strategy: LoraStrategy, rank: int, seed: int) -> AdapterState:
    rng = np.random.default_rng(seed)
    factors = {
        m: LoraFactors(
            a=rng.uniform(-1 / np.sqrt(d_in), 1 / np.sqrt(d_in), (rank, d_in)).astype(np.float32),
            b=(0.05 * rng.standard_normal((d_out, rank))).astype(np.float32),
        )
        for m, (d_out, d_in) in MODULES.items()
    }
    dense = {k: rng.standard_normal(s).astype(np.float32) for k, s in DENSE.items()}
    return strategy.initial_state(AdapterState(factors, dense, strategy.scaling(rank)))


def _fresh(cls: type[LoraStrategy], rank: int, seed: int) -> LoraStrategy:
    return cls(LoraSpec(rank, 2.0 * rank, ("q", "v")), seed=seed)


def _clients(ranks: Sequence[int], examples: Sequence[int]) -> list[SimulatedClient]:
    return [SimulatedClient(i, n, r) for i, (r, n) in enumerate(zip(ranks, examples, strict=True))]


def _play(
    cls: type[LoraStrategy],
    ranks: Sequence[int],
    examples: Sequence[int],
    rounds: int,
    seed: int = 0,
    replying: Sequence[int] | None = None,
    clients: list[SimulatedClient] | None = None,
) -> tuple[LoraStrategy, list[AdapterState], list[tuple[list[ClientUpdate], np.ndarray]]]:
    """Run ``rounds`` in memory; return the strategy, the global states and each round's inputs.

    ``clients``: the nodes to play (they keep their state); by default fresh ones.
    """
    rank = max(ranks)
    strategy = _fresh(cls, rank, seed)
    current = _initial(strategy, rank, seed)
    clients = _clients(ranks, examples) if clients is None else clients
    rng = np.random.default_rng(seed + 1)
    states, inputs = [current], []
    for r in range(1, rounds + 1):
        chosen = [clients[i] for i in (replying if replying is not None else range(len(clients)))]
        updates, _ = simulate_round(strategy, r, current, chosen, rng)
        n = np.array([u.num_examples for u in updates], float)
        weights = n / n.sum()
        current = strategy.aggregate(r, updates, weights, current)
        states.append(current)
        inputs.append((updates, weights))
    return strategy, states, inputs


def _same(x: AdapterState, y: AdapterState, atol: float = 0.0) -> bool:
    a, b = x.to_state_dict(), y.to_state_dict()
    return a.keys() == b.keys() and all(
        a[k].shape == b[k].shape and np.allclose(a[k], b[k], rtol=0, atol=atol) for k in a
    )


def check_strategy(cls: type[LoraStrategy], seed: int = 0) -> list[CheckResult]:
    """Run every conformance property against ``cls``; never raises for a failing strategy."""
    checks = [
        ("output shapes and dtypes", _check_shapes),
        ("deterministic for a seed", _check_determinism),
        ("aggregation error vs exact average", _check_error),
        ("heterogeneous ranks", _check_mixed_ranks),
        ("one client", _check_one_client),
        ("dropped clients", _check_dropped),
        ("zero weight", _check_zero_weight),
        ("checkpoint and restore", _check_restore),
        ("inputs not mutated", _check_no_mutation),
        ("settings", _check_settings),
        ("central DP claim", _check_central_dp),
        ("server optimiser claim", _check_server_optimizer),
        ("secure sum claim", _check_secure_sum),
    ]
    out = []
    for name, fn in checks:
        try:
            detail = fn(cls, seed)
            out.append(CheckResult(name, True, detail or ""))
        except Exception as err:  # a failing property is a result, not a crash
            out.append(CheckResult(name, False, f"{type(err).__name__}: {err}"))
    return out


def assert_conforms(cls: type[LoraStrategy], seed: int = 0) -> None:
    """Pytest helper: fail with every broken property listed."""
    failed = [r for r in check_strategy(cls, seed) if not r.passed]
    if failed:
        lines = "\n".join(f"  - {r.name}: {r.detail}" for r in failed)
        raise AssertionError(f"{cls.__name__} fails the fedlora conformance kit:\n{lines}")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def _check_server_optimizer(cls: type[LoraStrategy], seed: int) -> str:
    """A strategy that allows a server optimiser keeps the global adapter as a fixed point.

    Nodes that send it back unchanged must get it back, so that aggregate - current is 0.
    """
    if not cls.server_optimizer:
        return "not claimed: server-optimizer is refused for this strategy"
    # with mixed ranks only an exact strategy keeps it (the server refuses the others):
    # a node of lower rank receives a truncated adapter
    mixed = cls.heterogeneous_ranks and cls.exact
    for ranks in ([4, 4, 4], [2, 4, 8]) if mixed else ([4, 4, 4],):
        strategy = _fresh(cls, max(ranks), seed)
        current = _initial(strategy, max(ranks), seed)
        idle = [
            SimulatedClient(i, n, r, step=0.0)
            for i, (r, n) in enumerate(zip(ranks, [10, 20, 30], strict=True))
        ]
        rng = np.random.default_rng(seed)
        for server_round in (1, 2):
            updates, _ = simulate_round(strategy, server_round, current, idle, rng)
            n = np.array([u.num_examples for u in updates], float)
            out = strategy.aggregate(server_round, updates, n / n.sum(), current)
            worst = max(
                float(np.max(np.abs(v - current.to_state_dict()[k]), initial=0.0))
                for k, v in out.to_state_dict().items()
            )
            _require(
                worst < 1e-5,
                f"claims server_optimizer, but nodes that sent the global adapter back "
                f"unchanged (ranks {ranks}) moved it by up to {worst:.2e} in round {server_round}",
            )
            current = out
    return "the global adapter is a fixed point" + (" (ranks 4/4/4 and 2/4/8)" if mixed else "")


def _check_secure_sum(cls: type[LoraStrategy], seed: int) -> str:
    """A strategy that allows SecAgg+ aggregates the weighted mean of the replies as well.

    Over two rounds, ``aggregate`` of the decoded replies must equal ``aggregate`` of one
    update decoded from sum_k p_k reply_k, with weight 1: all SecAgg+ gives the server.
    """
    if not cls.secure_sum:
        return "not claimed: secure-aggregation is refused for this strategy"
    strategy = _fresh(cls, 4, seed)
    current = _initial(strategy, 4, seed)
    clients = _clients([4, 4, 4], [10, 20, 30])
    rng = np.random.default_rng(seed)
    weights = np.array([10, 20, 30], float) / 60
    for server_round in (1, 2):
        plans = [strategy.client_plan(server_round, c.node_id, c.rank) for c in clients]
        _require(len(set(plans)) == 1, f"round {server_round}: the nodes' plans differ")
        replies, updates = [], []
        for client, plan in zip(clients, plans, strict=True):
            payload = strategy.payload(server_round, client.node_id, plan, current)
            reply, metrics = client.train(strategy, plan, payload, current, rng)
            replies.append(reply)
            state = strategy.decode_update(server_round, plan, reply, current)
            updates.append(ClientUpdate(client.node_id, client.num_examples, state, metrics, plan))
        _require(
            all(r.keys() == replies[0].keys() for r in replies), "replies differ in their tensors"
        )
        mean = {
            k: np.sum(
                [w * r[k].astype(np.float64) for w, r in zip(weights, replies, strict=True)], 0
            ).astype(np.float32)
            for k in replies[0]
        }
        one = ClientUpdate(
            -1, 60, strategy.decode_update(server_round, plans[0], mean, current), {}, plans[0]
        )
        expected = strategy.aggregate(server_round, updates, weights, current)
        got = strategy.aggregate(server_round, [one], np.ones(1), current)
        _require(
            _same(expected, got, atol=1e-5),
            f"claims secure_sum, but aggregating the weighted mean of the replies differs from "
            f"aggregating the replies in round {server_round}",
        )
        current = expected
    return "aggregate(replies) = aggregate(their weighted mean), 2 rounds"


def _errors(
    inputs: Sequence[tuple[list[ClientUpdate], np.ndarray]], states: Sequence[AdapterState]
) -> list[float]:
    """The aggregation error of each round after the first state, calibration rounds left out.

    A calibration round's nodes train nothing, so it has no product to compare (the server
    records none either).
    """
    return [
        aggregation_error(u, w, s)
        for (u, w), s in zip(inputs, states[1:], strict=True)
        if not all(x.plan.calibrate for x in u)
    ]


def _check_shapes(cls: type[LoraStrategy], seed: int) -> str:
    _, states, _ = _play(cls, [4, 4, 4], [10, 20, 30], rounds=2, seed=seed)
    first = states[0]
    for state in states[1:]:
        _require(set(state.factors) == set(first.factors), "modules changed")
        _require(set(state.dense) == set(first.dense), "dense tensors changed")
        for m, f in state.factors.items():
            _require(f.a.dtype == np.float32 and f.b.dtype == np.float32, f"{m}: not float32")
            _require(f.a.shape[1] == first.factors[m].a.shape[1], f"{m}: A has wrong d_in")
            _require(f.b.shape[0] == first.factors[m].b.shape[0], f"{m}: B has wrong d_out")
            _require(f.a.shape[0] == f.b.shape[1], f"{m}: A and B ranks differ")
        for k, v in state.dense.items():
            _require(v.shape == first.dense[k].shape, f"{k}: shape changed")
        state.check_finite()
    return ""


def _check_determinism(cls: type[LoraStrategy], seed: int) -> str:
    _, a, _ = _play(cls, [4, 4, 4], [10, 20, 30], rounds=2, seed=seed)
    _, b, _ = _play(cls, [4, 4, 4], [10, 20, 30], rounds=2, seed=seed)
    _require(all(_same(x, y) for x, y in zip(a, b, strict=True)), "two runs with one seed differ")
    return ""


def _check_error(cls: type[LoraStrategy], seed: int) -> str:
    if cls.personal_factors:
        _require(not cls.exact, "claims exact, but personal factors leave no global product")
        return _check_personal(cls, seed)
    _, states, inputs = _play(cls, [4, 4, 4], [10, 20, 30], rounds=2, seed=seed)
    errors = _errors(inputs, states)
    if cls.exact:
        _require(max(errors) < 1e-5, f"claims exact, error {max(errors):.2e}")
    return f"max error {max(errors):.2e}" + (" (claims exact)" if cls.exact else "")


def _check_personal(cls: type[LoraStrategy], seed: int) -> str:
    """``personal_factors``: what a node keeps never travels, and each node's stays its own."""
    strategy = _fresh(cls, 4, seed)
    current = _initial(strategy, 4, seed)
    clients = _clients([4, 4, 4], [10, 20, 30])
    rng = np.random.default_rng(seed)
    for server_round in (1, 2):
        for client in clients:
            plan = strategy.client_plan(server_round, client.node_id, client.rank)
            payload = strategy.payload(server_round, client.node_id, plan, current)
            reply, _ = client.train(strategy, plan, payload, current, rng)
            kept = set(client.local)
            _require(bool(kept), f"round {server_round}: node {client.node_id} kept nothing")
            _require(not kept & set(reply), f"the reply carries kept tensors {sorted(kept)}")
            _require(not kept & set(payload), f"the payload carries kept tensors {sorted(kept)}")
    first = clients[0].local
    _require(
        any(not np.array_equal(first[k], c.local[k]) for c in clients[1:] for k in first),
        "every node kept the same tensors: nothing is personal",
    )
    return "no global product (personal factors): kept tensors never travel, 2 rounds"


def _check_mixed_ranks(cls: type[LoraStrategy], seed: int) -> str:
    if not cls.heterogeneous_ranks:
        return "not claimed: the server refuses nodes that declare another rank"
    _, states, inputs = _play(cls, [2, 4, 8], [10, 20, 30], rounds=2, seed=seed)
    errors = _errors(inputs, states)
    if cls.exact:
        _require(max(errors) < 1e-5, f"claims exact, error {max(errors):.2e} with ranks 2/4/8")
    return f"ranks 2/4/8, max error {max(errors):.2e}"


def _check_one_client(cls: type[LoraStrategy], seed: int) -> str:
    _, states, inputs = _play(cls, [4], [7], rounds=2, seed=seed)
    errors = _errors(inputs, states)
    return f"error {max(errors):.2e}"


def _check_dropped(cls: type[LoraStrategy], seed: int) -> str:
    _, states, inputs = _play(cls, [4, 4, 4, 4], [5, 6, 7, 8], rounds=2, seed=seed, replying=[0, 2])
    _require(all(len(u) == 2 for u, _ in inputs), "expected two replies per round")
    for s in states[1:]:
        s.check_finite()
    return ""


def _check_zero_weight(cls: type[LoraStrategy], seed: int) -> str:
    strategy = _fresh(cls, 4, seed)
    current = _initial(strategy, 4, seed)
    clients = _clients([4, 4, 4], [10, 20, 30])
    rng = np.random.default_rng(seed)
    server_round, weights = 1, np.array([0.0, 0.4, 0.6])
    updates, _ = simulate_round(strategy, server_round, current, clients, rng)
    while all(u.plan.calibrate for u in updates):  # nothing trained: check a training round
        current = strategy.aggregate(server_round, updates, weights, current)
        server_round += 1
        updates, _ = simulate_round(strategy, server_round, current, clients, rng)
    out = strategy.aggregate(server_round, updates, weights, current)
    out.check_finite()
    without = aggregation_error(updates[1:], weights[1:], out)
    with_zero = aggregation_error(updates, weights, out)
    _require(abs(without - with_zero) < 1e-6, "a zero-weight client changes the target")
    return f"error {with_zero:.2e}"


def _round_with_failures(
    strategy: LoraStrategy,
    server_round: int,
    current: AdapterState,
    nodes: Sequence[SimulatedClient],
    rng: np.random.Generator,
) -> tuple[AdapterState, dict[int, str]]:
    """One round in which a node may fail or be rejected; the new state and who was left out.

    A node's ``AdapterError`` stands for a real node's failed reply. The state is
    ``current`` when no update is accepted; each node left out comes with why.
    """
    updates, left_out = [], {}
    for node in nodes:
        try:
            accepted, rejected = simulate_round(strategy, server_round, current, [node], rng)
        except AdapterError as err:
            left_out[node.node_id] = f"failed: {err}"
            continue
        updates += accepted
        left_out |= rejected
    if not updates:
        return current, left_out
    n = np.array([u.num_examples for u in updates], float)
    return strategy.aggregate(server_round, updates, n / n.sum(), current), left_out


def _check_restore(cls: type[LoraStrategy], seed: int) -> str:
    """A strategy restored from its checkpoint after round 2 plays on as the original does.

    Round 3 goes to the nodes of rounds 1-2, their stores kept: the restored strategy
    must accept them all and match the original. It then goes to fresh nodes (SuperNodes
    restarted with the server, their stores empty). The restored strategy must either
    give them the round the kept nodes get (unless its plan keeps a node's own trained
    factors, ``local_b``, which a lost store cannot hold) or leave them out with a reason
    and catch them up: in round 4 none may be left out again.
    """
    from fedlora.run.checkpoint import restore_state, serialise_state

    played = _clients([4, 4, 4], [10, 20, 30])
    strategy, states, _ = _play(cls, [4, 4, 4], [10, 20, 30], rounds=2, seed=seed, clients=played)
    clone = _fresh(cls, 4, seed)
    clone.load_state_dict(restore_state(*serialise_state(strategy.state_dict())))

    def round_three(
        strat: LoraStrategy, nodes: list[SimulatedClient]
    ) -> tuple[AdapterState, dict[int, str], LoraStrategy, list[SimulatedClient]]:
        strat, nodes = copy.deepcopy(strat), copy.deepcopy(nodes)  # a round changes them
        rng = np.random.default_rng(seed + 7)
        out, left_out = _round_with_failures(strat, 3, states[2], nodes, rng)
        return out, left_out, strat, nodes

    original, _, _, _ = round_three(strategy, played)
    kept, left_out, _, _ = round_three(clone, played)
    _require(not left_out, f"the restored strategy leaves out the nodes it knew: {left_out}")
    _require(_same(original, kept), "the restored strategy's next round differs")
    fresh, left_out, strat, nodes = round_three(clone, _clients([4, 4, 4], [10, 20, 30]))
    if not left_out:
        if copy.deepcopy(clone).client_plan(3, 0, 4).local_b:
            return "restarted nodes: accepted (their own factors start again)"
        _require(_same(fresh, kept), "restarted nodes get another round than kept nodes")
        return "restarted nodes: the same round"
    _require(all(left_out.values()), f"restarted nodes left out without a reason: {left_out}")
    _, again = _round_with_failures(strat, 4, fresh, nodes, np.random.default_rng(seed + 8))
    _require(not again, f"restarted nodes are never caught up: {again}")
    return "restarted nodes: left out once, then caught up"


def _check_no_mutation(cls: type[LoraStrategy], seed: int) -> str:
    strategy = _fresh(cls, 4, seed)
    current = _initial(strategy, 4, seed)
    clients = _clients([4, 4, 4], [10, 20, 30])
    updates, _ = simulate_round(strategy, 1, current, clients, np.random.default_rng(seed))
    before = [{k: v.copy() for k, v in u.state.to_state_dict().items()} for u in updates]
    current_before = {k: v.copy() for k, v in current.to_state_dict().items()}
    weights = np.array([0.2, 0.3, 0.5])
    strategy.aggregate(1, updates, weights.copy(), current)
    for u, b in zip(updates, before, strict=True):
        for k, v in u.state.to_state_dict().items():
            _require(np.array_equal(v, b[k]), f"aggregate modified client tensor {k}")
    for k, v in current.to_state_dict().items():
        _require(np.array_equal(v, current_before[k]), f"aggregate modified current tensor {k}")
    return ""


def _check_central_dp(cls: type[LoraStrategy], seed: int) -> str:
    """What ``central_dp`` promises, checked on one round.

    With uniform weights at one rank, every tensor of the result must be the plain mean of
    the decoded replies' (so noise z C / m on it is the Gaussian mechanism); ``"client"``
    also needs each reply to carry exactly the tensors the node was sent (Flower's
    ``fixedclipping_mod`` clips reply minus payload and fails the reply otherwise), and
    ``"server"`` needs every node to send every tensor.
    """
    if not cls.central_dp:
        return "not claimed"
    unknown = set(cls.central_dp) - {"client", "server"}
    _require(not unknown, f"unknown central_dp modes {sorted(unknown)}")
    strategy = _fresh(cls, 4, seed)
    current = _initial(strategy, 4, seed)
    clients = _clients([4, 4, 4], [10, 20, 30])
    updates, _ = simulate_round(strategy, 1, current, clients, np.random.default_rng(seed))
    out = strategy.aggregate(1, updates, np.full(3, 1 / 3), current).to_state_dict()
    replies = [u.state.to_state_dict() for u in updates]
    for key, value in out.items():
        mean = np.mean([r[key] for r in replies], axis=0)
        _require(
            np.allclose(value, mean, rtol=1e-5, atol=1e-6),
            f"claims central DP but '{key}' is not the plain mean of the replies",
        )
    if "client" in cls.central_dp:
        _check_reply_keys(cls, seed)
    if "server" in cls.central_dp:
        _require(
            all(u.plan.send_a for u in updates),
            "claims server-side clipping but its replies leave out lora_A",
        )
    return "modes " + ", ".join(sorted(cls.central_dp))


def _check_reply_keys(cls: type[LoraStrategy], seed: int) -> None:
    """Two rounds in which every node replies with the keys of its payload."""
    strategy = _fresh(cls, 4, seed)
    current = _initial(strategy, 4, seed)
    rng = np.random.default_rng(seed)
    clients = _clients([4, 4, 4], [10, 20, 30])
    for server_round in (1, 2):  # two rounds: RoLoRA-like strategies alternate the factor
        updates = []
        for client in clients:
            plan = strategy.client_plan(server_round, client.node_id, client.rank)
            payload = strategy.payload(server_round, client.node_id, plan, current)
            reply, metrics = client.train(strategy, plan, payload, current, rng)
            missing, extra = sorted(set(payload) - set(reply)), sorted(set(reply) - set(payload))
            _require(
                not missing and not extra,
                f"claims client-side clipping but in round {server_round} a reply leaves out "
                f"{missing[:2]} / adds {extra[:2]} of the payload's tensors: Flower's "
                "fixedclipping_mod fails a reply whose keys differ from the payload's",
            )
            state = strategy.decode_update(server_round, plan, reply, current)
            updates.append(ClientUpdate(client.node_id, client.num_examples, state, metrics, plan))
        current = strategy.aggregate(server_round, updates, np.full(3, 1 / 3), current)


def _check_settings(cls: type[LoraStrategy], seed: int) -> str:
    """``Settings`` is a frozen dataclass that builds with its defaults alone."""
    settings = cls.Settings
    _require(dataclasses.is_dataclass(settings), f"Settings {settings!r} is not a dataclass")
    _require(
        settings.__dataclass_params__.frozen,  # type: ignore[attr-defined]
        "Settings must be frozen (strategies read them, never change them)",
    )
    instance = settings()
    names = [f.name.replace("_", "-") for f in dataclasses.fields(instance)]
    return "options: " + (", ".join(names) if names else "none")
