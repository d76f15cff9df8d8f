"""What a node is asked to do in one round, and what that means on both ends.

A :class:`ClientPlan` is the one home of a round's instructions: the strategy writes it
(``LoraStrategy.client_plan``), it crosses the wire as one versioned JSON entry, and the
client, the server's uplink decoder and the conformance kit's simulated client all read
its meaning from the methods below, so the three agree by construction.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

import numpy as np

from fedlora.lora.lowrank import procrustes_rotation
from fedlora.lora.seeded import seeded_a, seeded_orthonormal
from fedlora.lora.state import (
    A_SUFFIX,
    B_SUFFIX,
    CORE_SUFFIX,
    GRAD_SUFFIX,
    AdapterError,
    AdapterState,
)

PLAN_VERSION = 5
"""Bump when a field changes meaning; a node refuses a plan of another version."""


@dataclass(frozen=True)
class ClientPlan:
    """One node's instructions for one round.

    ``rank``: the LoRA rank it trains. ``freeze_a`` / ``freeze_b``: keep lora_A / lora_B
    fixed. ``send_b``: whether the reply carries lora_B. ``align_rotation``: before
    replying, rotate the trained factors (A_k <- R A_k, B_k <- B_k R^T, so B_k A_k is
    unchanged) with the orthogonal R that best maps A_k onto the received lora_A, or,
    with ``align_factor = "b"``, B_k onto the received lora_B
    (:func:`fedlora.lora.lowrank.procrustes_rotation`). ``reinit``: start
    a fresh adapter (A drawn from ``init_seed``, B = 0) instead of the received factors
    (received dense tensors still load). ``a_from_seed``: lora_A is :func:`seeded_a` of
    ``init_seed``, so it need not be sent. ``send_a``: whether the reply carries lora_A.
    ``merge_rounds``: base-merge stacks (payload keys ``merge/<round>/<key>``) the node
    merges into its base weights, in order, before training; ``reset_base``: drop the
    merged base first. ``train_core``: train only an r x r core R between seeded, frozen
    A and B (Fed-SB; see the field). ``local_b``: lora_B is the node's own, kept across
    rounds (FedSA-LoRA; see the field). Nothing else reaches a node: the client is
    fedlora's, and a plan field it did not act on would be a silent no-op.
    """

    rank: int
    freeze_a: bool = False
    reinit: bool = False
    init_seed: int = 0
    a_from_seed: bool = False
    send_a: bool = True
    merge_rounds: tuple[int, ...] = ()
    reset_base: bool = False
    freeze_b: bool = False
    send_b: bool = True
    align_rotation: bool = False
    align_factor: str = "a"
    train_core: bool = False
    """Fed-SB (LoRA-SB): the model has an r x r core R per module, dW = s B R A
    (:mod:`fedlora.model.lora_core`). lora_A and lora_B are :func:`core_basis` of
    ``init_seed`` (orthonormal rows of A, orthonormal columns of B), rebuilt by each end and
    frozen; R (key ``<module>.lora_R.weight``) starts from the payload and is trained with
    the dense tensors; the reply carries R and the dense tensors, never A or B. With
    ``core_bases`` set, A and B are not seeded but sent (see that field)."""
    core_bases: str = ""
    """With ``train_core``: the id of fixed bases the server computed (Fed-SB with LoRA-SB's
    data-aware initialisation) instead of the seeded ones. A payload that carries lora_A and
    lora_B gives them, and the node stores them under this id; a payload without them means
    "use the ones you stored", and a node that stored none (or another id) fails, so the
    server sends them again."""
    calibrate: int = 0
    """LoRA-SB's calibration: train nothing; the reply carries, for each adapted module, the
    mean loss gradient of its frozen base weight (``<module>.base_grad``, d_out x d_in) over
    ``calibrate`` examples drawn from the node's training data (some twice when it has
    fewer), and nothing else. The received
    dense tensors (the head) load first; the LoRA factors are the fresh ones (B = 0, so
    the adapter adds nothing)."""
    local_b: bool = False
    """FedSA-LoRA: lora_B is the node's own. The node starts it from the lora_B it stored
    after its last training (``local`` of :meth:`start`; zero the first time, peft's init),
    whatever the payload holds, trains A and B, and stores the trained lora_B again
    (:meth:`kept`); the reply never carries it (``send_b`` must be false). An evaluation
    plan with it evaluates the received lora_A with the node's own lora_B."""

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise AdapterError(f"plan rank {self.rank} must be > 0")
        if self.freeze_a and self.freeze_b:
            raise AdapterError("a plan that freezes both lora_A and lora_B trains no factor")
        if self.train_core and (self.send_a or self.send_b):
            raise AdapterError("a train_core plan rebuilds lora_A and lora_B: it sends neither")
        if self.align_factor not in ("a", "b"):
            raise AdapterError(f"plan align_factor {self.align_factor!r} must be 'a' or 'b'")
        if self.train_core and (self.reinit or self.a_from_seed or self.align_rotation):
            raise AdapterError(
                "train_core fixes lora_A and lora_B at the seeded bases: it cannot be combined "
                "with reinit, a_from_seed or align_rotation"
            )
        if self.core_bases and not self.train_core:
            raise AdapterError(
                f"core_bases {self.core_bases!r} names the fixed bases of a train_core plan, "
                "and this plan trains no core"
            )
        if self.calibrate < 0:
            raise AdapterError(f"plan calibrate {self.calibrate} must be >= 0")
        if self.calibrate and (
            self.send_a or self.send_b or self.train_core or self.local_b or self.merge_rounds
        ):
            raise AdapterError(
                "a calibrate plan trains nothing and replies only base-weight gradients: it "
                "sends no lora_A or lora_B and cannot train a core, keep a local lora_B or merge"
            )
        if self.local_b and (self.send_b or self.freeze_b or self.reinit or self.train_core):
            raise AdapterError(
                "a local_b plan trains the node's own lora_B and keeps it: it cannot send, "
                "freeze or re-initialise lora_B, nor train a core"
            )

    # -- the start of training --------------------------------------------------
    def start(
        self,
        fresh: Mapping[str, np.ndarray],
        received: Mapping[str, np.ndarray],
        local: Mapping[str, np.ndarray] | None = None,
    ) -> dict[str, np.ndarray]:
        """The tensors a node starts training from.

        ``fresh`` is the model's own initialisation. Received factors replace it unless
        ``reinit`` (then B = 0 and A stays fresh); lora_A is the shared seeded draw when
        ``a_from_seed``; received dense tensors (the head) always load. ``local``: what the
        node stored (:meth:`kept`) after its last training; with ``local_b`` each lora_B
        is its stored one, or zero when it has none (a stored lora_B of another shape fails).
        """
        start = {k: np.asarray(v) for k, v in fresh.items()}
        for key, value in received.items():
            if not is_factor(key) or not self.reinit:
                start[key] = np.asarray(value)
        for key, value in start.items():
            if self.reinit and key.endswith(B_SUFFIX):
                start[key] = np.zeros_like(value)
            if self.a_from_seed and key.endswith(A_SUFFIX):
                start[key] = self.seeded(key, value.shape[1])
        if self.train_core:
            start = self._core_start(start, local if self.core_bases else None)
        if self.local_b:
            start = self._local_start(start, local or {})
        return start

    def _local_start(
        self, start: dict[str, np.ndarray], local: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """``local_b``: each lora_B from the node's store, zero when it stored none."""
        for key in [k for k in start if k.endswith(B_SUFFIX)]:
            shape = np.shape(start[key])
            if key not in local:
                start[key] = np.zeros(shape, np.float32)
            elif np.shape(local[key]) == shape:
                start[key] = np.asarray(local[key], np.float32)
            else:
                raise AdapterError(
                    f"the node's own {key} has shape {np.shape(local[key])}, this round "
                    f"trains {shape}: its state-dir holds another run's lora_B"
                )
        return start

    def kept(self, trained: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """What of the trained tensors the node stores for its next round (``local_b``: B)."""
        if not self.local_b:
            return {}
        return {k: np.asarray(v, np.float32) for k, v in trained.items() if k.endswith(B_SUFFIX)}

    def reads(self, key: str) -> bool:
        """Whether a node following this plan uses the received tensor under ``key``.

        A ``local_b`` node uses its own lora_B, so a payload need not carry one.
        """
        return not (self.local_b and key.endswith(B_SUFFIX))

    def _core_start(
        self, start: dict[str, np.ndarray], bases: Mapping[str, np.ndarray] | None = None
    ) -> dict[str, np.ndarray]:
        """``train_core``: the fixed bases as lora_A / lora_B, R as received (or zero).

        The bases are the seeded ones, or with ``core_bases`` those in ``bases``.
        """
        for key in [k for k in start if k.endswith(A_SUFFIX)]:
            module = key[: -len(A_SUFFIX)]
            d_in, d_out = start[key].shape[1], start[module + B_SUFFIX].shape[0]
            if self.core_bases:
                a, b = bases_of(bases or {}, module, self.rank, d_in, d_out, self.core_bases)
            else:
                a, b = core_basis(module, self.rank, d_in, d_out, self.init_seed)
            start[key], start[module + B_SUFFIX] = a, b
            start.setdefault(module + CORE_SUFFIX, np.zeros((self.rank, self.rank), np.float32))
        return start

    def sent_bases(
        self, received: Mapping[str, np.ndarray], stored: dict[str, np.ndarray], stored_id: str
    ) -> dict[str, np.ndarray]:
        """``core_bases``: the payload's lora_A / lora_B, else the node's stored ones.

        Raises when the payload carries none and the node stored none under this id: the
        error reply tells the server to send them again.
        """
        sent = {k: np.asarray(v, np.float32) for k, v in received.items() if is_factor(k)}
        if sent:
            return sent
        if stored and stored_id == self.core_bases:
            return stored  # the same object: the node need not store it again
        raise AdapterError(
            f"this node holds no fixed bases '{self.core_bases}' (it stored "
            f"{repr(stored_id) if stored else 'none'}) and the payload carries none: its "
            "state was lost; the server sends them again the next time it samples this node"
        )

    def seeded(self, key: str, d_in: int) -> np.ndarray:
        """The shared seeded lora_A of the module of ``key`` at this plan's rank."""
        return seeded_a(key[: -len(A_SUFFIX)], self.rank, d_in, self.init_seed)

    def trains(self, key: str) -> bool:
        """Whether the tensor under ``key`` is trained (``freeze_a`` / ``freeze_b`` fix one)."""
        if self.train_core and ("lora_A" in key or "lora_B" in key):
            return False  # the seeded bases; R and the dense tensors train
        return not (self.freeze_a and "lora_A" in key) and not (self.freeze_b and "lora_B" in key)

    # -- the reply ----------------------------------------------------------------
    def reply(
        self, trained: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray] | None = None
    ) -> dict[str, np.ndarray]:
        """What of the trained tensors the reply carries (rotated first if ``align_rotation``).

        ``received``: the payload the node started from (its lora_A, or its lora_B, are
        the reference of the alignment).
        """
        if self.align_rotation:
            trained = align_to(trained, received or {}, self.align_factor)
        return {
            k: v
            for k, v in trained.items()
            if (self.send_a or not k.endswith(A_SUFFIX))
            and (self.send_b or not k.endswith(B_SUFFIX))
        }

    def reply_shapes(self, current: AdapterState) -> dict[str, tuple[int, ...]]:
        """The tensors a reply carries, at this plan's rank (what the server expects)."""
        if self.calibrate:
            factors = current.factors.items()
            return {m + GRAD_SUFFIX: (f.b.shape[0], f.a.shape[1]) for m, f in factors}
        shapes: dict[str, tuple[int, ...]] = {}
        for module, f in current.factors.items():
            if self.send_a:
                shapes[module + A_SUFFIX] = (self.rank, f.a.shape[1])
            if self.send_b:
                shapes[module + B_SUFFIX] = (f.b.shape[0], self.rank)
            if self.train_core:
                shapes[module + CORE_SUFFIX] = (self.rank, self.rank)
        shapes.update({k: tuple(v.shape) for k, v in current.dense.items()})
        return shapes

    def update_layout(self, current: AdapterState) -> AdapterState:
        """The shape a decoded reply of this plan takes (what the server checks it against).

        ``current``'s modules and dense tensors; for ``calibrate``, ``current``'s modules
        with each module's gradient, keyed by the module, as the dense tensors (zero-stride
        views of full shape: only the shapes are read).
        """
        if not self.calibrate:
            return current
        grads = {
            m: np.broadcast_to(np.float32(0), (f.b.shape[0], f.a.shape[1]))
            for m, f in current.factors.items()
        }
        return AdapterState(dict(current.factors), grads, current.scaling)

    def reference(
        self, shapes: Mapping[str, tuple[int, ...]], received: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """The start of each reply tensor that both ends can rebuild.

        A compressed uplink sends deltas from it: a seeded A, a re-initialised B (zero) or
        a received tensor. A fresh A from the model's own random init is known to the node
        only, so it is absent here and travels dense.
        """
        out: dict[str, np.ndarray] = {}
        for key, shape in shapes.items():
            if self.a_from_seed and key.endswith(A_SUFFIX):
                out[key] = self.seeded(key, shape[1])
            elif self.reinit and key.endswith(B_SUFFIX):
                out[key] = np.zeros(shape, dtype=np.float32)
            elif (self.reinit and is_factor(key)) or key not in received:
                continue
            elif received[key].shape == tuple(shape):
                out[key] = np.asarray(received[key], dtype=np.float32)
        return out

    # -- the wire -------------------------------------------------------------------
    def to_json(self) -> str:
        """The plan as one versioned JSON text (a ConfigRecord value)."""
        body = asdict(self) | {"merge_rounds": list(self.merge_rounds)}
        return json.dumps({"version": PLAN_VERSION, **body}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ClientPlan:
        """Inverse of :meth:`to_json`; a plan of another version or with unknown fields fails."""
        try:
            data = json.loads(text)
            version = data.pop("version", None)
        except (TypeError, ValueError, AttributeError) as err:
            raise AdapterError(f"the round's plan is not readable JSON ({err})") from None
        if version != PLAN_VERSION:
            raise AdapterError(
                f"plan version {version!r}, this node reads version {PLAN_VERSION}: server and "
                "node run different fedlora versions"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise AdapterError(f"plan has unknown fields {unknown}")
        data["merge_rounds"] = tuple(int(r) for r in data.get("merge_rounds", ()))
        return cls(**data)


def align_to(
    trained: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray], factor: str = "a"
) -> dict[str, np.ndarray]:
    """Each module's (A, B) rotated by the orthogonal R that best aligns it to ``received``.

    A <- R A, B <- B R^T: the product B A, and so the node's update, is unchanged. With
    ``factor = "a"`` R minimises ||R A - A_received||, with ``"b"`` ||B R^T - B_received||
    (FedRot-LoRA's two alignments, which its authors' code alternates between rounds).

    A module whose received factor is missing or of another shape is left as it is.
    """
    if factor not in ("a", "b"):
        raise ValueError(f"align factor {factor!r} must be 'a' or 'b'")
    out = dict(trained)
    for key, a in trained.items():
        if not key.endswith(A_SUFFIX):
            continue
        b_key = key[: -len(A_SUFFIX)] + B_SUFFIX
        if b_key not in trained:
            continue
        b = np.asarray(trained[b_key], np.float64)
        mine, ref_key = (a, key) if factor == "a" else (b.T, b_key)
        reference = received.get(ref_key)
        if reference is None or np.shape(reference) != np.shape(trained[ref_key]):
            continue
        if factor == "b":
            reference = np.asarray(reference).T  # ||B R^T - B_ref|| = ||R B^T - B_ref^T||
        rotation = procrustes_rotation(mine, reference)
        out[key] = (rotation @ np.asarray(a, np.float64)).astype(np.float32)
        out[b_key] = (b @ rotation.T).astype(np.float32)
    return out


def bases_of(
    bases: Mapping[str, np.ndarray], module: str, rank: int, d_in: int, d_out: int, bases_id: str
) -> tuple[np.ndarray, np.ndarray]:
    """``module``'s (A, B) from ``bases``, checked against the shapes the model needs."""
    a, b = bases.get(module + A_SUFFIX), bases.get(module + B_SUFFIX)
    if a is None or b is None or np.shape(a) != (rank, d_in) or np.shape(b) != (d_out, rank):
        raise AdapterError(
            f"the fixed bases '{bases_id}' lack a {rank} x {d_in} lora_A and a {d_out} x {rank} "
            f"lora_B for '{module}'"
        )
    return np.asarray(a, np.float32), np.asarray(b, np.float32)


def is_factor(key: str) -> bool:
    """Whether ``key`` names a LoRA factor (lora_A or lora_B), not a dense tensor."""
    return key.endswith((A_SUFFIX, B_SUFFIX))


def core_basis(
    module: str, rank: int, d_in: int, d_out: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Fed-SB's fixed (A, B) of ``module``, both drawn from ``seed``.

    A (rank x d_in) has orthonormal rows, B (d_out x rank) orthonormal columns
    (:func:`fedlora.lora.seeded.seeded_orthonormal`). Server and nodes rebuild them, so
    they never travel; B^T B = I makes R = B^T (B R).
    """
    a = seeded_orthonormal(module + ".lora_A", rank, d_in, seed)
    b = seeded_orthonormal(module + ".lora_B", rank, d_out, seed).T
    return a, np.ascontiguousarray(b)
