"""The conformance kit passes every built-in and catches broken strategies."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from fedlora.run.registry import BUILTINS, load_strategy_class
from fedlora.strategies.api import A_SUFFIX, B_SUFFIX, AdapterState, LoraFactors
from fedlora.strategies.conformance import _play, assert_conforms, check_strategy
from fedlora.strategies.fedavg import FedAvg

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_every_builtin_passes_the_kit(name):
    assert_conforms(load_strategy_class(name))


def _spec():
    from fedlora.strategies.api import LoraSpec

    return LoraSpec(4, 8.0, ("q", "v"))


def _failed(cls):
    return {r.name for r in check_strategy(cls) if not r.passed}


class ClaimsExact(FedAvg):
    exact = True


class Mutates(FedAvg):
    def aggregate(self, server_round, updates, weights, current):
        out = super().aggregate(server_round, updates, weights, current)
        for u in updates:
            next(iter(u.state.factors.values())).b[...] += 1.0
        return out


class Random(FedAvg):
    def aggregate(self, server_round, updates, weights, current):
        out = super().aggregate(server_round, updates, weights, current)
        m, f = next(iter(out.factors.items()))
        noisy = {
            **out.factors,
            m: LoraFactors(f.a, f.b + np.random.normal(size=f.b.shape).astype(np.float32)),
        }
        return AdapterState(noisy, out.dense, out.scaling)


class WrongShape(FedAvg):
    def aggregate(self, server_round, updates, weights, current):
        out = super().aggregate(server_round, updates, weights, current)
        return AdapterState(
            {m: LoraFactors(f.a[:, :-1], f.b) for m, f in out.factors.items()},
            out.dense,
            out.scaling,
        )


class ProducesNan(FedAvg):
    def aggregate(self, server_round, updates, weights, current):
        out = super().aggregate(server_round, updates, weights, current)
        return AdapterState(out.factors, {k: v * np.nan for k, v in out.dense.items()}, out.scaling)


def test_fedrot_lora_alternating_its_alignment_passes_the_kit():
    from dataclasses import dataclass

    base = load_strategy_class("fedrot_lora")

    class Alternating(base):
        @dataclass(frozen=True)
        class Settings(base.Settings):
            alignment: str = "alternate"

    assert Alternating(_spec()).client_plan(3, 0, 4).align_factor == "b"
    assert_conforms(Alternating)  # the kit plays rounds 1-2 (none, then A)
    # round 3 aligns B, at mixed ranks: each node's reply keeps its B_k A_k and brings its
    # B_k at least as close to the B it received (at its own rank) as it trained it
    strategy, states, _ = _play(Alternating, [2, 4, 8], [10, 20, 30], rounds=2)
    rng = np.random.default_rng(3)
    moved = 0.0
    for node, rank in enumerate([2, 4, 8]):
        plan = strategy.client_plan(3, node, rank)
        received = strategy.payload(3, node, plan, states[2])
        trained = {
            k: (v + 0.3 * rng.standard_normal(v.shape)).astype(np.float32)
            for k, v in received.items()
        }
        reply = plan.reply(trained, received)
        for key in (k for k in trained if k.endswith(A_SUFFIX)):
            b_key = key.removesuffix(A_SUFFIX) + B_SUFFIX
            assert reply[b_key].shape == (received[b_key].shape[0], rank)
            np.testing.assert_allclose(
                reply[b_key] @ reply[key], trained[b_key] @ trained[key], atol=1e-4
            )
            before = np.linalg.norm(trained[b_key] - received[b_key])
            after = np.linalg.norm(reply[b_key] - received[b_key])
            assert after <= before + 1e-5
            moved += before - after
    assert moved > 1e-3  # the rotation did bring B closer somewhere (it ran)


def test_kit_catches_a_false_exactness_claim():
    assert "aggregation error vs exact average" in _failed(ClaimsExact)


def test_kit_catches_mutation():
    assert "inputs not mutated" in _failed(Mutates)


def test_kit_catches_nondeterminism():
    assert "deterministic for a seed" in _failed(Random)


@pytest.mark.parametrize(
    "base, modes",
    [
        ("flora", {"client"}),
        ("lora_fair", {"client"}),
        ("ffa_lora", {"client", "server"}),
        ("rolora", {"client"}),
    ],
)
def test_kit_catches_a_false_central_dp_claim(base, modes):
    """FLoRA stacks and LoRA-FAIR corrects (neither is a mean); FFA-LoRA sends no A;
    RoLoRA's mean is plain, but its replies leave out the frozen factor it was sent, which
    Flower's fixedclipping_mod fails (its key check, not the mean, is what breaks)."""
    cls = type(f"Claims{base}", (load_strategy_class(base),), {"central_dp": frozenset(modes)})
    assert "central DP claim" in _failed(cls)


def test_kit_catches_a_restore_that_never_catches_up_restarted_nodes():
    """Fed-SB with data-aware bases sends its bases again after a resume; a version that
    trusts the nodes' stores for good never sends them to restarted SuperNodes."""
    base = load_strategy_class("fed_sb_data")

    class TrustsStores(base):
        restored = False

        def load_state_dict(self, state):
            super().load_state_dict(state)
            self.restored = True

        def payload(self, server_round, node_id, plan, current):
            out = super().payload(server_round, node_id, plan, current)
            if self.restored:  # "every node still holds the bases"
                out = {k: v for k, v in out.items() if not k.endswith((A_SUFFIX, B_SUFFIX))}
            return out

    failed = {r.name: r.detail for r in check_strategy(TrustsStores) if not r.passed}
    assert "never caught up" in failed["checkpoint and restore"]
    passed = {r.name: r.detail for r in check_strategy(base) if r.passed}
    assert passed["checkpoint and restore"] == "restarted nodes: the same round"


@pytest.mark.parametrize(("name", "restarted"), [("flora", "left out once"), ("fedavg", "same")])
def test_the_restore_check_sees_restarted_nodes_caught_up_or_served_alike(name, restarted):
    """FLoRA refuses a node whose merged base differs and sends it every stack next time;
    FedAvg keeps nothing on a node."""
    results = {r.name: r for r in check_strategy(load_strategy_class(name))}
    assert results["checkpoint and restore"].passed
    assert restarted in results["checkpoint and restore"].detail


def test_kit_catches_settings_that_are_not_a_frozen_dataclass():
    from dataclasses import dataclass

    class Mutable(FedAvg):
        @dataclass
        class Settings:
            knob: int = 1

    class NotADataclass(FedAvg):
        class Settings:
            pass

    assert "settings" in _failed(Mutable) and "settings" in _failed(NotADataclass)


def test_the_public_api_imports_neither_flower_nor_torch():
    """A strategy can be written and tested with numpy alone (a fresh interpreter checks)."""
    import subprocess
    import sys

    code = (
        "import sys, fedlora.strategies.api, fedlora.strategies.conformance;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('flwr', 'torch'));"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_public_api_stays_small():
    import importlib.util

    path = Path(importlib.util.find_spec("fedlora.strategies.api").origin)
    assert len(path.read_text().splitlines()) <= 332  # 331 with `calibrates` (fed_sb_data)


def test_kit_catches_wrong_shapes_and_nan():
    assert "output shapes and dtypes" in _failed(WrongShape)
    assert "output shapes and dtypes" in _failed(ProducesNan)


ALLOWED_TOP = {
    "__future__",
    "collections",
    "dataclasses",
    "logging",
    "typing",
    "math",
    "abc",
    "numpy",
    "torch",
}
PUBLIC_API = "fedlora.strategies.api"


@pytest.mark.parametrize("target", sorted(BUILTINS.values()))
def test_builtins_use_only_the_public_api(target):
    """A built-in imports nothing a plugin cannot: the public API (and sibling built-ins)."""
    import importlib.util

    module = target.split(":")[0]
    tree = ast.parse(Path(importlib.util.find_spec(module).origin).read_text())
    siblings = {t.split(":")[0] for t in BUILTINS.values()}
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        for name in names:
            top = name.split(".")[0]
            assert top in ALLOWED_TOP or name.startswith("fedlora."), f"{module} imports {name}"
            if name.startswith("fedlora."):
                assert name in {PUBLIC_API, *siblings}, f"{module} imports {name}"
