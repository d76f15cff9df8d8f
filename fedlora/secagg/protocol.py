"""SecAgg+ (Bell et al., CCS 2020) as pure functions and one node's state: no messaging.

The server learns the sum of the nodes' quantised inputs and nothing else about any one
of them. Each node masks its input y_k (an integer vector in Z_M) twice:

    masked_k = y_k + PRG(b_k) - sum_{j in N(k), j < k} PRG(s_kj) + sum_{j in N(k), j > k} PRG(s_kj)

with b_k a fresh private seed and s_kj the Diffie-Hellman key of k and its neighbour j
(so the pairwise masks cancel in the sum). b_k and k's first secret key are Shamir-shared
among N(k), t of them needed to rebuild either. After the masked inputs are in, each
surviving neighbour reveals, per node, either its share of b_k (k sent a masked input:
its private mask is removed) or of k's secret key (k dropped: its pairwise masks with
its neighbours are rebuilt and removed), never both, so with t > |N(k)| / 2 the server
never holds both secrets of one node. The node enforces that itself: it shares among at
most ``num_shares`` neighbours with a majority threshold, and reveals only for nodes it
shared with, only while it is itself named a survivor among at least t of them, so a
server that lies about who dropped cannot collect both secrets of anyone.

The cryptography is Flower's (``flwr.common.secure_aggregation``: ECDH key agreement,
Shamir sharing, Fernet encryption of the shares, the stochastic quantisation into
[0, T]) and the stages follow its legacy SecAgg+ workflow and client mod. One primitive
is replaced: Flower's ``pseudo_rand_gen`` seeds NumPy's Mersenne Twister with the XOR of
the seed's 32-bit words, so a mask has 2^32 possible values and a server could search
them; fedlora expands a mask from the full 32-byte seed with ChaCha20 (``cryptography``).

Inputs are pre-scaled by the node's weight p_k, and p_k travels masked as the last
entry, so the server divides the unmasked sum by the unmasked sum of the weights of the
nodes that actually took part (dropouts renormalise).
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
    decrypt,
    encrypt,
    generate_shared_key,
)
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

STAGES = ("setup", "share-keys", "collect-masked", "unmask")
"""The protocol's stages, in order (one message each way per node and stage)."""


class SecAggError(ValueError):
    """The protocol cannot go on: a bad setting, a stage out of order, too few neighbours.

    ``key``: the run-config key of the bad setting, when one is to blame.
    """

    def __init__(self, message: str, key: str = "") -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class SecAggParams:
    """The protocol's settings for one round.

    ``num_shares``: the size of each node's neighbourhood, itself included (its secrets
    are split into that many shares). ``threshold``: shares needed to rebuild a secret;
    more than half of ``num_shares``, so no server learns both of one node's secrets.
    Inputs are clipped to [-clipping_range, clipping_range], quantised to [0, T] with
    T = ``quantization_range``, and summed in Z_M with M = ``modulus`` (a power of two,
    at most 2^32, above num_nodes x T so that the sum does not wrap).
    """

    num_shares: int
    threshold: int
    clipping_range: float = 8.0
    quantization_range: int = 1 << 22
    modulus: int = 1 << 32

    def check(self, num_nodes: int) -> None:
        """Raise :class:`SecAggError` naming the first setting unusable for ``num_nodes``."""
        if num_nodes < 2:
            raise SecAggError(
                f"secure aggregation needs at least 2 nodes, got {num_nodes}", "clients-per-round"
            )
        if self.num_shares != num_nodes and not (
            3 <= self.num_shares < num_nodes and self.num_shares % 2 == 1
        ):
            raise SecAggError(
                f"secagg-num-shares={self.num_shares} must be {num_nodes} (the nodes of the "
                f"round: everyone neighbours everyone) or odd in [3, {num_nodes}) (a ring "
                "neighbourhood: the node and (shares - 1) / 2 on each side)",
                "secagg-num-shares",
            )
        self.check_node_side(self.num_shares)
        if num_nodes * self.quantization_range >= self.modulus:
            raise SecAggError(
                f"secagg-quantization-range={self.quantization_range}: {num_nodes} nodes x "
                f"it must stay below secagg-modulus={self.modulus} (else the sum wraps)",
                "secagg-quantization-range",
            )

    def check_node_side(self, num_shares: int) -> None:
        """What a node checks itself: a majority threshold of ``num_shares`` shares, a field."""
        if not num_shares // 2 < self.threshold <= num_shares or self.threshold < 2:
            raise SecAggError(
                f"secagg-threshold={self.threshold} must be in "
                f"[{max(2, num_shares // 2 + 1)}, {num_shares}]: more than half of "
                "the shares, so the server can never rebuild both secrets of one node",
                "secagg-threshold",
            )
        if not self.clipping_range > 0:
            raise SecAggError(
                f"secagg-clipping-range={self.clipping_range} must be > 0", "secagg-clipping-range"
            )
        if self.modulus & (self.modulus - 1) or not 2 <= self.modulus <= 1 << 32:
            raise SecAggError(
                f"secagg-modulus={self.modulus} must be a power of 2 <= 2^32", "secagg-modulus"
            )
        if not 2 <= self.quantization_range < self.modulus:
            raise SecAggError(
                f"secagg-quantization-range={self.quantization_range} must be in [2, "
                f"secagg-modulus={self.modulus})",
                "secagg-quantization-range",
            )

    @property
    def step(self) -> float:
        """The quantisation step 2c / T: one node's rounding error is below it."""
        return 2.0 * self.clipping_range / self.quantization_range

    def to_dict(self) -> dict[str, int | float]:
        """As ConfigRecord values."""
        return asdict(self)


# --------------------------------------------------------------------------- #
# Pure functions                                                               #
# --------------------------------------------------------------------------- #
def neighbourhoods(nodes: Sequence[int], num_shares: int, seed: int) -> dict[int, set[int]]:
    """Each node's neighbours (itself included) on a shuffled ring, as in Flower's workflow.

    With ``num_shares`` equal to the number of nodes, everyone neighbours everyone.
    """
    order = list(nodes)
    np.random.default_rng(seed).shuffle(order)
    n, half = len(order), num_shares // 2
    if num_shares >= n:
        return {k: set(order) for k in order}
    return {k: {order[(i + d) % n] for d in range(-half, half + 1)} for i, k in enumerate(order)}


def prg(seed: bytes, size: int, modulus: int) -> np.ndarray:
    """``size`` uniform integers in [0, modulus) (a power of 2): ``seed`` expanded by ChaCha20."""
    key = hashlib.sha256(seed).digest()
    stream = Cipher(algorithms.ChaCha20(key, b"\0" * 16), mode=None).encryptor()
    words = np.frombuffer(stream.update(bytes(4 * size)), dtype="<u4").astype(np.int64)
    return words & (modulus - 1)


def flatten(tensors: Mapping[str, np.ndarray], weight: float) -> np.ndarray:
    """The input vector of a node: weight x its tensors (sorted by key), then the weight."""
    parts = [np.ravel(np.asarray(tensors[k], np.float64)) * weight for k in sorted(tensors)]
    return np.concatenate([*parts, [weight]])


def unflatten(vector: np.ndarray, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Inverse of :func:`flatten` without the trailing weight (float32 tensors)."""
    out, at = {}, 0
    for key in sorted(shapes):
        size = int(np.prod(shapes[key], dtype=np.int64))
        out[key] = vector[at : at + size].reshape(shapes[key]).astype(np.float32)
        at += size
    if at != vector.size:
        raise SecAggError(f"the sum holds {vector.size} values, the layout {at}")
    return out


def vector_size(shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Length of the masked vector of a reply of these shapes (the weight included)."""
    return sum(int(np.prod(s, dtype=np.int64)) for s in shapes.values()) + 1


def masked_sum(vectors: Sequence[np.ndarray], modulus: int) -> np.ndarray:
    """The sum of masked inputs in Z_M (what the server adds up; each one alone is uniform)."""
    total = np.zeros_like(np.asarray(vectors[0], np.int64))
    for v in vectors:
        total = (total + np.asarray(v, np.int64)) & (modulus - 1)
    return total


def pairwise_sign(own: int, other: int) -> int:
    """+1 when ``own`` adds the mask it shares with ``other``, -1 when it subtracts it."""
    return 1 if own > other else -1


def unmask(
    total: np.ndarray,
    params: SecAggParams,
    *,
    survivors: Sequence[int],
    dropped: Sequence[int],
    shares: Mapping[int, Sequence[bytes]],
    neighbours: Mapping[int, set[int]],
    public_keys: Mapping[int, tuple[bytes, bytes]],
) -> tuple[np.ndarray, float]:
    """Remove the masks from ``total``: the sum of the survivors' inputs and of their weights.

    ``survivors`` sent a masked input (their private masks go, rebuilt from the shares of
    b_k); ``dropped`` shared keys but sent none (their pairwise masks with the survivors
    stay in ``total`` and are rebuilt from the shares of their secret key). ``shares``:
    per owner, the shares the neighbours revealed. Returns (sum of y_k, sum of w_k).
    """
    m = params.modulus
    out = np.asarray(total, np.int64).copy()
    for owner in [*survivors, *dropped]:
        got = list(shares.get(owner, ()))
        if len(got) < params.threshold:
            raise SecAggError(
                f"node {owner}: {len(got)} shares revealed, the threshold is {params.threshold}"
            )
        secret = combine_shares(got[: params.threshold])
        if owner in survivors:
            out = (out - prg(secret, out.size, m)) & (m - 1)
            continue
        sk1 = bytes_to_private_key(secret)
        for other in neighbours[owner]:
            if other == owner or other not in survivors:
                continue
            key = generate_shared_key(sk1, bytes_to_public_key(public_keys[other][0]))
            # the survivor added -sign(other, owner) = sign(owner, other) times the mask
            out = (out - pairwise_sign(owner, other) * prg(key, out.size, m)) & (m - 1)
    (summed,) = dequantize([out], params.clipping_range, params.quantization_range)
    summed = summed - (len(survivors) - 1) * params.clipping_range  # each input was shifted by c
    return summed[:-1], float(summed[-1])


# --------------------------------------------------------------------------- #
# One node's side                                                              #
# --------------------------------------------------------------------------- #
def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode())


@dataclass
class NodeSecAgg:
    """One node's protocol state across the four stages of a round (JSON-able).

    It lives in the node's Flower context between messages (never on disk): its secret
    keys and seed are worth nothing after the round.
    """

    node_id: int
    server_round: int
    params: dict[str, int | float]
    stage: str = "setup"
    sk1: str = ""
    pk1: str = ""
    sk2: str = ""
    pk2: str = ""
    seed: str = ""
    public_keys: dict[str, list[str]] | None = None
    seed_shares: dict[str, str] | None = None  # owner -> my share of its b
    key_shares: dict[str, str] | None = None  # owner -> my share of its sk1

    @property
    def settings(self) -> SecAggParams:
        """The round's settings."""
        return SecAggParams(**self.params)  # type: ignore[arg-type]

    @classmethod
    def setup(
        cls, node_id: int, server_round: int, params: SecAggParams
    ) -> tuple[NodeSecAgg, bytes, bytes]:
        """Stage 0: fresh key pairs; returns the state and the two public keys."""
        params.check_node_side(params.num_shares)
        sk1, pk1 = generate_key_pairs()
        sk2, pk2 = generate_key_pairs()
        state = cls(
            node_id,
            server_round,
            params.to_dict(),
            sk1=_b64(private_key_to_bytes(sk1)),
            pk1=_b64(public_key_to_bytes(pk1)),
            sk2=_b64(private_key_to_bytes(sk2)),
            pk2=_b64(public_key_to_bytes(pk2)),
        )
        return state, public_key_to_bytes(pk1), public_key_to_bytes(pk2)

    def _expect(self, stage: str, server_round: int) -> None:
        if server_round != self.server_round:
            raise SecAggError(
                f"secure-aggregation message of round {server_round}; this node set up round "
                f"{self.server_round}"
            )
        before = STAGES[STAGES.index(stage) - 1]
        if self.stage != before:
            raise SecAggError(f"stage {stage!r} after {self.stage!r}; expected after {before!r}")
        self.stage = stage

    def share_keys(
        self, server_round: int, public_keys: Mapping[int, tuple[bytes, bytes]]
    ) -> dict[int, bytes]:
        """Stage 1: split b and sk1 among the neighbours; one ciphertext per other neighbour.

        ``public_keys``: every neighbour's (pk1, pk2), this node's own included.
        """
        self._expect("share-keys", server_round)
        p = self.settings
        own = public_keys.get(self.node_id)
        if own is None or own != (_unb64(self.pk1), _unb64(self.pk2)):
            raise SecAggError(f"node {self.node_id}: its own public keys are missing or altered")
        if not p.threshold <= len(public_keys) <= p.num_shares:
            raise SecAggError(
                f"node {self.node_id}: {len(public_keys)} neighbours (itself included), outside "
                f"[threshold {p.threshold}, secagg-num-shares {p.num_shares}]"
            )
        p.check_node_side(len(public_keys))  # a majority of the shares actually made
        keys = [k for pair in public_keys.values() for k in pair]
        if len(set(keys)) != len(keys):
            raise SecAggError(f"node {self.node_id}: two neighbours sent the same public key")
        seed = os.urandom(32)
        sk1 = _unb64(self.sk1)
        seed_shares = create_shares(seed, p.threshold, len(public_keys))
        key_shares = create_shares(sk1, p.threshold, len(public_keys))
        sk2 = bytes_to_private_key(_unb64(self.sk2))
        out: dict[int, bytes] = {}
        self.seed_shares, self.key_shares = {}, {}
        for i, (other, (_, pk2)) in enumerate(sorted(public_keys.items())):
            if other == self.node_id:
                self.seed_shares[str(other)] = _b64(seed_shares[i])
                self.key_shares[str(other)] = _b64(key_shares[i])
                continue
            shared = generate_shared_key(sk2, bytes_to_public_key(pk2))
            text = share_keys_plaintext_concat(self.node_id, other, seed_shares[i], key_shares[i])
            out[other] = encrypt(shared, text)
        self.seed = _b64(seed)
        self.public_keys = {str(k): [_b64(a), _b64(b)] for k, (a, b) in public_keys.items()}
        return out

    def mask(
        self, server_round: int, ciphertexts: Mapping[int, bytes], vector: np.ndarray
    ) -> tuple[np.ndarray, int]:
        """Stage 2: read the neighbours' shares, then quantise and mask ``vector``.

        ``ciphertexts``: what each other neighbour encrypted for this node. Returns the
        masked vector (uint32 values in [0, M)) and how many entries were clipped.
        """
        self._expect("collect-masked", server_round)
        p = self.settings
        assert self.public_keys is not None and self.seed_shares is not None
        assert self.key_shares is not None
        if len(ciphertexts) + 1 < p.threshold:
            raise SecAggError(
                f"node {self.node_id}: shares from {len(ciphertexts)} neighbours, fewer than "
                f"the threshold {p.threshold} - 1"
            )
        sk2 = bytes_to_private_key(_unb64(self.sk2))
        for src, ciphertext in ciphertexts.items():
            if str(src) not in self.public_keys or src == self.node_id:
                raise SecAggError(f"node {self.node_id}: a share from non-neighbour {src}")
            pk2 = bytes_to_public_key(_unb64(self.public_keys[str(src)][1]))
            text = decrypt(generate_shared_key(sk2, pk2), ciphertext)
            actual, dst, seed_share, key_share = share_keys_plaintext_separate(text)
            if actual != src or dst != self.node_id:
                raise SecAggError(f"node {self.node_id}: share from {actual} to {dst} via {src}")
            self.seed_shares[str(src)] = _b64(seed_share)
            self.key_shares[str(src)] = _b64(key_share)
        vector = np.asarray(vector, np.float64)
        clipped = int(np.count_nonzero(np.abs(vector) > p.clipping_range))
        (y,) = quantize([vector], p.clipping_range, p.quantization_range)
        m = p.modulus
        out = (np.asarray(y, np.int64) + prg(_unb64(self.seed), y.size, m)) & (m - 1)
        sk1 = bytes_to_private_key(_unb64(self.sk1))
        for other, (pk1, _) in sorted(self.public_keys.items()):
            other_id = int(other)
            if other_id == self.node_id or other not in {str(s) for s in ciphertexts}:
                continue  # a neighbour whose shares never came took no part in the masks
            key = generate_shared_key(sk1, bytes_to_public_key(_unb64(pk1)))
            out = (out - pairwise_sign(self.node_id, other_id) * prg(key, y.size, m)) & (m - 1)
        self.seed = ""  # the private seed is needed no more; its shares are with the others
        return out.astype(np.uint32), clipped

    def reveal(
        self, server_round: int, survivors: Sequence[int], dropped: Sequence[int]
    ) -> dict[int, bytes]:
        """Stage 3: my share of b_k for each survivor, of sk1_k for each dropped node.

        A node asked to call the same neighbour both refuses: that would give the server
        both of its secrets.
        """
        self._expect("unmask", server_round)
        both = set(survivors) & set(dropped)
        if both:
            raise SecAggError(f"node {self.node_id}: asked for both secrets of {sorted(both)}")
        assert self.seed_shares is not None and self.key_shares is not None
        shared_with = set(self.seed_shares) & set(self.key_shares)  # itself and who sent shares
        named = {str(n) for n in [*survivors, *dropped]}
        if not named <= shared_with:
            raise SecAggError(f"node {self.node_id}: asked about nodes it shared nothing with")
        if self.node_id not in survivors:
            raise SecAggError(f"node {self.node_id}: it sent its masked input, yet not a survivor")
        if len(set(survivors)) < self.settings.threshold:
            raise SecAggError(
                f"node {self.node_id}: {len(set(survivors))} survivors named, fewer than the "
                f"threshold {self.settings.threshold}: the sum would cover too few nodes"
            )
        out: dict[int, bytes] = {}
        for owner in survivors:
            if str(owner) in self.seed_shares:
                out[owner] = _unb64(self.seed_shares[str(owner)])
        for owner in dropped:
            if str(owner) in self.key_shares:
                out[owner] = _unb64(self.key_shares[str(owner)])
        return out
