"""Secure aggregation on Flower's Message API: the coordinator learns the sum of the nodes'
updates, never one node's update.

The protocol is SecAgg (Bonawitz et al. 2017, "Practical Secure Aggregation for
Privacy-Preserving Machine Learning", CCS; arXiv:1611.04482) over the complete graph of the
round's nodes up to ``COMPLETE_UP_TO`` (40) nodes, and above that SecAgg+ (Bell et al. 2020,
arXiv:2006.04747) over a random regular graph of ``neighbourhood_size(n)`` neighbours per node
(:func:`neighbours`), built from Flower's own secure-aggregation primitives:

* key agreement: ``generate_key_pairs`` (ECDH on SECP384R1) and ``generate_shared_key``
  (ECDH + HKDF-SHA256), ``flwr.supercore.primitives.asymmetric`` and
  ``flwr.common.secure_aggregation.crypto.symmetric_encryption``;
* authenticated encryption of the routed shares: ``encrypt``/``decrypt`` (Fernet);
* Shamir secret sharing: Flower's ``create_shares``/``combine_shares`` layout and polynomial
  (pycryptodome's), computed by :mod:`fedgov.privacy.shamir`, byte-identical and faster;
* the share plaintext layout: ``share_keys_plaintext_concat``/``_separate``;
* stochastic quantisation: ``quantize`` (clipping range, target range).

Flower's ``SecAggPlusWorkflow`` and ``secaggplus_mod`` are not used: with Message-API
ClientApps they halt silently (``../shared/FLOWER-NOTES.md``). One primitive is replaced:
Flower's mask generator ``pseudo_rand_gen`` folds its seed into 32 bits for numpy's
``RandomState``, so a mask could be found by trying 2^32 seeds; fedgov expands each 256-bit
seed with AES-256 in counter mode (``cryptography``, which Flower's primitives already use).

Per round, four exchanges (the third is the training message itself):

1. **keys**: each sampled node makes two key pairs, ``c`` (to encrypt shares) and ``s`` (to
   agree pairwise masks), and sends the public halves.
2. **shares**: given everyone's public keys, each node draws a self-mask seed ``b``, splits
   ``b`` and its secret key ``s_sk`` into Shamir shares (threshold ``t``), and encrypts each
   other node's pair of shares under the key it shares with that node. The coordinator routes
   the ciphertexts and cannot read them.
3. **masked input**: each node decrypts the shares addressed to it, trains, quantises its
   (weighted, clipped) update ``y`` and sends ``y + PRG(b) + sum_v +-PRG(s_uv) mod 2^32``.
4. **unmask**: the coordinator names the nodes whose masked input arrived (survivors) and
   those that dropped. Each survivor sends its shares of ``b`` for survivors and of ``s_sk``
   for dropped nodes, never both for the same node. With ``t`` shares the coordinator
   rebuilds the seeds, removes the masks, and holds ``sum y`` over the survivors, only.

Against a coordinator that deviates (the paper's active model, §4), the node's side
(:mod:`fedgov.node.secure`) adds: round keys signed with each node's long-term identity key and
checked against a federation roster signed by a roster authority (:mod:`fedgov.privacy.roster`); a
consistency stage between 3 and 4 (each survivor signs the sorted survivor list once per
round; unmasking needs ``t`` signatures over exactly the list it signed); a record, in the
node's SQLite state, of which share of each peer it revealed (never both, across messages and
restarts); and a SecAgg+ graph seeded by the roster's digest, the task key and the round
(:func:`roster_graph_seed`), not by anything the coordinator relays. See
``docs/threat-model.md``.

Everything here is pure: bytes and arrays in, bytes and arrays out; no Flower messages.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import math
import os
from dataclasses import dataclass, field

import numpy as np
from fedgov.errors import SecAggError

__all__ = [
    "MODULUS_BITS",
    "SecAggParams",
    "NodeSecAgg",
    "threshold_for",
    "neighbourhood_size",
    "neighbours",
    "RoundKeys",
    "roster_graph_seed",
    "prg",
    "encode_update",
    "decode_sum",
    "unmask_sum",
    "SecAggError",
]

MODULUS_BITS = 32
MODULUS = 1 << MODULUS_BITS


@dataclass(frozen=True)
class SecAggParams:
    """``clip``: each coordinate of a (weighted) update is clipped to ``[-clip, clip]``;
    ``quant_bits``: it is quantised to ``2**quant_bits`` levels; the sum of at most
    ``2**(32 - quant_bits)`` nodes fits the modulus ``2**32``."""

    clip: float = 8.0
    quant_bits: int = 22

    @property
    def levels(self) -> int:
        return 1 << self.quant_bits

    @property
    def max_nodes(self) -> int:
        return MODULUS // self.levels


def threshold_for(n: int) -> int:
    """Shares needed to rebuild a secret held by ``n`` holders: more than two thirds of them
    (``floor(2n/3) + 1``), at least 2.

    Against a coordinator that tells some holders a node survived and others that it dropped,
    each honest holder reveals one kind of share only, so getting both of a node's secrets
    needs ``t`` holders on each side: ``2t - c <= n - 1`` with ``c`` colluding holders (who
    reveal both). With a strict majority one colluder sufficed (the consistency round does not
    stop it: colluders sign both lists); with ``t > 2n/3`` it takes ``c > n/3 - 1``: the bound of
    Bonawitz et al. 2017 for the active model. The price: at most a third of a group may drop."""
    return max(2, (2 * n) // 3 + 1)


COMPLETE_UP_TO = 40
"""Rounds of up to this many nodes use the complete graph (SecAgg); larger ones SecAgg+."""


def neighbourhood_size(n: int) -> int:
    """How many other nodes each node shares with: all of them up to :data:`COMPLETE_UP_TO`
    nodes; beyond, ``2 * ceil(2 * log2 n)`` (SecAgg+, Bell et al. 2020: 34 at 342 nodes)."""
    if n <= COMPLETE_UP_TO:
        return n - 1
    return min(n - 1, 2 * math.ceil(2 * math.log2(n)))


def graph_seed(pks: dict[int, tuple[bytes, bytes]]) -> bytes:
    """The round's public randomness for the graph: a hash of every node's public keys, which the
    nodes made; the coordinator cannot pick it without picking the keys."""
    h = hashlib.sha256(b"fedgov-secagg-graph")
    for n in sorted(pks):
        c, s_ = pks[n]
        h.update(str(n).encode() + b"|" + c + b"|" + s_)
    return h.digest()


def roster_graph_seed(roster_digest: bytes, key: str, round: int) -> bytes:
    """The SecAgg+ graph's seed: the signed roster's digest, the task or query key and the
    round; nothing the coordinator relays or orders (a round's graph cannot be re-rolled)."""
    return hashlib.sha256(b"fedgov-secagg-graph-v2|" + roster_digest + b"|" + key.encode() + b"|" + str(round).encode()).digest()


class RoundKeys(dict[int, tuple[bytes, bytes]]):
    """A round's public keys (node id -> (c, s)) with the roster names they were signed under
    and the graph seed (:func:`roster_graph_seed`): :func:`neighbours` orders its ring by
    ``H(seed || name)``, so the graph depends on the roster's members, never on the keys."""

    def __init__(self, pks: dict[int, tuple[bytes, bytes]], names: dict[int, str], seed: bytes) -> None:
        super().__init__(pks)
        self.names = dict(names)
        self.seed = seed


def neighbours(pks: dict[int, tuple[bytes, bytes]]) -> dict[int, list[int]]:
    """Each node's neighbours: the nodes in a random ring, each joined to the ``k/2`` before and
    after it (``k`` from :func:`neighbourhood_size`): a random ``k``-regular Harary graph,
    symmetric. The complete graph for small rounds. The ring's order is ``H(seed || roster
    name)`` for :class:`RoundKeys`; for a bare dict (tests of the pure protocol) it is
    :func:`graph_seed` of the keys."""
    nodes = sorted(pks)
    n = len(nodes)
    k = neighbourhood_size(n)
    if k >= n - 1:
        return {v: [u for u in nodes if u != v] for v in nodes}
    if isinstance(pks, RoundKeys):
        return _ring_graph(pks.seed, tuple((v, pks.names[v]) for v in nodes), k)
    seed = graph_seed(pks)
    ring = sorted(nodes, key=lambda v: hashlib.sha256(seed + str(v).encode()).digest())
    return _harary(ring, k)


@functools.lru_cache(maxsize=64)
def _ring_graph(seed: bytes, named: tuple[tuple[int, str], ...], k: int) -> dict[int, list[int]]:
    """The graph of :func:`neighbours` for roster-named nodes: computed once per round and
    process (every node of a round that a process serves asks for the same graph). Callers
    only read it."""
    ring = [v for _, v in sorted((hashlib.sha256(seed + b"|" + name.encode()).digest(), v) for v, name in named)]
    return _harary(ring, k)


def _harary(ring: list[int], k: int) -> dict[int, list[int]]:
    n, half = len(ring), k // 2
    out: dict[int, list[int]] = {}
    for i, v in enumerate(ring):
        out[v] = sorted({ring[(i + j) % n] for j in range(-half, half + 1) if j != 0})
    return out


def prg(seed: bytes, n: int, *, domain: bytes = b"") -> np.ndarray:
    """``n`` uniform values in ``[0, 2^32)`` from a 256-bit ``seed`` (AES-256-CTR), as int64."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    key = hashlib.sha256(b"fedgov-secagg-prg|" + domain + b"|" + seed).digest()
    enc = Cipher(algorithms.AES(key), modes.CTR(b"\x00" * 16)).encryptor()
    raw = enc.update(b"\x00" * (4 * n)) + enc.finalize()
    return np.frombuffer(raw, dtype="<u4").astype(np.int64)


def encode_update(update: list[np.ndarray], weight: float, params: SecAggParams) -> np.ndarray:
    """The vector a node masks: ``weight * update`` (flattened) and ``weight`` itself, clipped
    and stochastically quantised with Flower's ``quantize`` into ``[0, 2^quant_bits]``."""
    from flwr.common.secure_aggregation.quantization import quantize

    flat = np.concatenate([np.asarray(a, dtype=np.float64).ravel() * weight for a in update] + [np.array([weight])])
    (q,) = quantize([flat], params.clip, params.levels)
    return np.asarray(q, dtype=np.int64)


def decode_sum(total: np.ndarray, n: int, shapes: list[tuple[int, ...]], params: SecAggParams) -> tuple[list[np.ndarray], float]:
    """Undo :func:`encode_update` for the sum of ``n`` nodes: ``(sum of weight*update, sum of weights)``."""
    values = np.asarray(total, dtype=np.float64) * (2 * params.clip / params.levels) - n * params.clip
    out, i = [], 0
    for shape in shapes:
        size = int(np.prod(shape)) if shape else 1
        out.append(values[i : i + size].reshape(shape))
        i += size
    return out, float(values[i])


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _unb64(s: str) -> bytes:
    return base64.b64decode(s.encode())


def _pair_seed(shared_key: bytes) -> bytes:
    return hashlib.sha256(b"fedgov-secagg-pair|" + shared_key).digest()


@dataclass
class NodeSecAgg:
    """One node's state for one round of secure aggregation (kept in its Flower state)."""

    node_id: int
    round: int
    c_sk: bytes = b""
    s_sk: bytes = b""
    b: bytes = b""
    nodes: list[int] = field(default_factory=list)  # the round's nodes after "keys", sorted
    pks: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    group: list[int] = field(default_factory=list)  # this node and its neighbours, sorted (the share holders)
    threshold: int = 0
    received: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # src -> (b share, sk share)
    masked: bool = False
    names: dict[int, str] = field(default_factory=dict)  # node id -> roster name (verified at "shares")
    seed: bytes = b""  # the graph seed (roster_graph_seed)
    mask_nodes: list[int] = field(default_factory=list)  # the nodes this node masked against, sorted
    min_survivors: int = 0  # under distributed DP: the contributors its noise share was sized for
    share_keys: dict[int, bytes] = field(default_factory=dict)  # neighbour -> the key its shares travel under (ECDH of c keys)

    def round_keys(self) -> dict[int, tuple[bytes, bytes]]:
        """The round's keys, as :class:`RoundKeys` when they came with roster names."""
        return RoundKeys(self.pks, self.names, self.seed) if self.names else dict(self.pks)

    # ---- persistence in the node's Flower state --------------------------------------
    def to_json(self) -> str:
        return json.dumps({
            "node_id": self.node_id, "round": self.round, "c_sk": _b64(self.c_sk), "s_sk": _b64(self.s_sk), "b": _b64(self.b),
            "nodes": self.nodes, "pks": {str(k): [_b64(c), _b64(s)] for k, (c, s) in self.pks.items()},
            "group": self.group, "threshold": self.threshold, "received": {str(k): [_b64(x), _b64(y)] for k, (x, y) in self.received.items()},
            "masked": self.masked, "names": {str(k): v for k, v in self.names.items()}, "seed": _b64(self.seed),
            "mask_nodes": self.mask_nodes, "min_survivors": self.min_survivors,
            "share_keys": {str(k): _b64(v) for k, v in self.share_keys.items()},
        })

    @classmethod
    def from_json(cls, text: str) -> NodeSecAgg:
        d = json.loads(text)
        return cls(
            node_id=int(d["node_id"]), round=int(d["round"]), c_sk=_unb64(d["c_sk"]), s_sk=_unb64(d["s_sk"]), b=_unb64(d["b"]),
            nodes=[int(n) for n in d["nodes"]], pks={int(k): (_unb64(c), _unb64(s)) for k, (c, s) in d["pks"].items()},
            group=[int(n) for n in d.get("group", [])], threshold=int(d["threshold"]), received={int(k): (_unb64(x), _unb64(y)) for k, (x, y) in d["received"].items()},
            masked=bool(d["masked"]), names={int(k): str(v) for k, v in d.get("names", {}).items()},
            seed=_unb64(d.get("seed", "")), mask_nodes=[int(n) for n in d.get("mask_nodes", [])],
            min_survivors=int(d.get("min_survivors", 0)),
            share_keys={int(k): _unb64(v) for k, v in d.get("share_keys", {}).items()},
        )

    # ---- stage 1: keys ---------------------------------------------------------------
    @classmethod
    def keys(cls, node_id: int, round: int) -> tuple[NodeSecAgg, bytes, bytes]:
        """Fresh key pairs for this round; returns the state and the public keys (c, s)."""
        from flwr.supercore.primitives.asymmetric import generate_key_pairs, private_key_to_bytes, public_key_to_bytes

        c_sk, c_pk = generate_key_pairs()
        s_sk, s_pk = generate_key_pairs()
        st = cls(node_id=node_id, round=round, c_sk=private_key_to_bytes(c_sk), s_sk=private_key_to_bytes(s_sk))
        return st, public_key_to_bytes(c_pk), public_key_to_bytes(s_pk)

    # ---- stage 2: shares -------------------------------------------------------------
    def shares(self, pks: dict[int, tuple[bytes, bytes]], params: SecAggParams) -> dict[int, bytes]:
        """Split ``b`` and ``s_sk`` among the round's nodes; one ciphertext per other node."""
        from flwr.common.secure_aggregation.crypto.symmetric_encryption import encrypt, generate_shared_key
        from flwr.common.secure_aggregation.secaggplus_utils import share_keys_plaintext_concat
        from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

        from fedgov.privacy.shamir import create_shares

        if self.node_id not in pks:
            raise SecAggError("this node is not among the round's nodes")
        if len(pks) < 2:
            raise SecAggError(f"secure aggregation needs at least 2 nodes, the round has {len(pks)}")
        if len(pks) > params.max_nodes:
            raise SecAggError(f"{len(pks)} nodes exceed the {params.max_nodes} whose sum fits the modulus")
        if len({c for c, _ in pks.values()} | {s for _, s in pks.values()}) != 2 * len(pks):
            raise SecAggError("two nodes were given the same public key")
        self.nodes = sorted(pks)
        self.pks = dict(pks)
        if isinstance(pks, RoundKeys):
            self.names, self.seed = dict(pks.names), pks.seed
        self.group = sorted([self.node_id, *neighbours(self.round_keys())[self.node_id]])
        # Only the group's keys are used from here on (its shares and masks): the others are not
        # kept, so that the node's state stays small at national scale (34 of 342 nodes' keys).
        self.pks = {v: pks[v] for v in self.group}
        self.threshold = threshold_for(len(self.group))
        self.b = os.urandom(32)
        b_shares = create_shares(self.b, self.threshold, len(self.group))
        sk_shares = create_shares(self.s_sk, self.threshold, len(self.group))
        c_sk = bytes_to_private_key(self.c_sk)
        out: dict[int, bytes] = {}
        for i, dst in enumerate(self.group):
            if dst == self.node_id:
                self.received[dst] = (b_shares[i], sk_shares[i])
                continue
            key = generate_shared_key(c_sk, bytes_to_public_key(pks[dst][0]))
            self.share_keys[dst] = key  # the same key opens what dst sends back (receive): agreed once
            out[dst] = encrypt(key, share_keys_plaintext_concat(self.node_id, dst, b_shares[i], sk_shares[i]))
        return out

    # ---- stage 3: masked input --------------------------------------------------------
    def receive(self, ciphertexts: dict[int, bytes]) -> None:
        """Decrypt the shares the other nodes sent this node; a ciphertext that does not open,
        or names other nodes than it should, stops the round."""
        from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, generate_shared_key
        from flwr.common.secure_aggregation.secaggplus_utils import share_keys_plaintext_separate
        from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

        c_sk = bytes_to_private_key(self.c_sk)
        for src, ct in ciphertexts.items():
            if src not in self.group or src == self.node_id:
                raise SecAggError(f"shares from node {src}, which is not among this node's neighbours this round")
            key = self.share_keys.get(src) or generate_shared_key(c_sk, bytes_to_public_key(self.pks[src][0]))
            try:
                s, d, b_share, sk_share = share_keys_plaintext_separate(decrypt(key, ct))
            except Exception as exc:  # noqa: BLE001 - InvalidToken and malformed plaintexts alike
                raise SecAggError(f"the shares from node {src} do not decrypt ({type(exc).__name__})") from None
            if (s, d) != (src, self.node_id):
                raise SecAggError(f"the shares from node {src} are addressed from {s} to {d}")
            self.received[src] = (b_share, sk_share)

    def mask(self, y: np.ndarray, survivors: list[int]) -> np.ndarray:
        """``y + PRG(b) + sum_v +-PRG(s_uv) mod 2^32`` over the nodes that sent shares (``survivors``)."""
        from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
        from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

        if self.masked:
            raise SecAggError("this node already sent its masked input for this round")
        round_nodes = set(self.nodes)
        stray = [v for v in survivors if v not in round_nodes]
        if stray:
            raise SecAggError(f"nodes {stray[:5]} are not among the round's nodes this node shared with")
        group = set(self.group)
        missing = [v for v in survivors if v != self.node_id and v in group and v not in self.received]
        if missing:
            raise SecAggError(f"no shares received from nodes {missing[:5]}")
        n = len(y)
        out: np.ndarray = (np.asarray(y, dtype=np.int64) + prg(self.b, n, domain=b"self")) % MODULUS
        s_sk = bytes_to_private_key(self.s_sk)
        for v in survivors:
            if v == self.node_id or v not in group:
                continue
            m = prg(_pair_seed(generate_shared_key(s_sk, bytes_to_public_key(self.pks[v][1]))), n, domain=b"pair")
            out = (out + m) % MODULUS if self.node_id < v else (out - m) % MODULUS
        self.masked = True
        self.mask_nodes = sorted(set(survivors) | {self.node_id})
        return out

    # ---- stage 4: unmask ------------------------------------------------------------
    def reveal(self, survivors: list[int], dropped: list[int]) -> dict[int, bytes]:
        """Shares of ``b`` for survivors, of ``s_sk`` for dropped nodes; refuses to reveal both
        for one node, or anything when fewer than the threshold survived."""
        if set(survivors) & set(dropped):
            raise SecAggError("a node cannot have both survived and dropped: refusing to reveal")
        if self.node_id not in survivors:
            raise SecAggError("this node is not listed as a survivor")
        if not self.masked:
            raise SecAggError("this node sent no masked input this round: nothing to unmask")
        group = set(self.group)
        alive = [v for v in survivors if v in group]
        if len(alive) < self.threshold:
            raise SecAggError(f"only {len(alive)} of this node's group survived; revealing needs {self.threshold}")
        gone = [v for v in dropped if v in group]
        unknown = [v for v in [*alive, *gone] if v not in self.received]
        if unknown:
            raise SecAggError(f"nodes {unknown[:5]} sent this node no shares")
        out = {v: self.received[v][0] for v in alive}
        out.update({v: self.received[v][1] for v in gone})
        return out


def unmask_sum(
    masked: dict[int, np.ndarray],
    revealed: dict[int, dict[int, bytes]],
    *,
    pks: dict[int, tuple[bytes, bytes]],
    dropped: list[int],
    threshold: int = 0,
) -> np.ndarray:
    """The coordinator's last step: from the survivors' masked inputs and the shares they
    revealed (``revealed[holder][owner]``), the sum of the survivors' vectors mod ``2^32``.

    Each secret is rebuilt from the shares of its owner's group (:func:`neighbours`), which
    needs :func:`threshold_for` of the group's size; ``threshold`` is the least number of nodes
    that must have revealed at all (a quick refusal)."""
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
    from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

    from fedgov.privacy.shamir import combine_shares_many
    from fedgov.errors import ShareError

    survivors = sorted(masked)
    if len(revealed) < threshold:
        raise SecAggError(f"only {len(revealed)} nodes revealed shares; unmasking needs {threshold}")
    graph = neighbours(pks)
    n = len(next(iter(masked.values())))
    total = np.zeros(n, dtype=np.int64)
    for v in survivors:
        total += np.asarray(masked[v], dtype=np.int64) % MODULUS  # < 2^32 each: no overflow below 2^31 nodes

    # every secret at once: survivors' self-mask seeds, then dropped nodes' secret keys
    owners = [*survivors, *dropped]
    share_lists: list[list[bytes]] = []
    for owner in owners:
        need = threshold_for(len(graph[owner]) + 1)
        # in group order, which is share-index order (Flower's index i went to the i-th member):
        # the first ``need`` have the lowest indices, one index set for most secrets
        held = [r[owner] for r in (revealed.get(h) for h in sorted((owner, *graph[owner]))) if r is not None and owner in r]
        if len(held) < need:
            raise SecAggError(f"{len(held)} shares of node {owner}'s secret; {need} are needed")
        share_lists.append(held[:need])
    try:
        secrets = combine_shares_many(share_lists)
    except ShareError as exc:
        raise SecAggError(f"the shares of node {owners[exc.position]}'s secret do not combine: {exc}") from None

    total -= _prg_sum(secrets[: len(survivors)], n, domain=b"self")
    alive = set(survivors)
    added: list[bytes] = []  # pair seeds of masks a survivor subtracted (u > d): add them back
    subtracted: list[bytes] = []  # and of those it added (u < d): subtract them
    for d, sk in zip(dropped, secrets[len(survivors) :], strict=True):
        s_sk_d = bytes_to_private_key(sk)
        for u in graph[d]:
            if u in alive:
                seed = _pair_seed(generate_shared_key(s_sk_d, bytes_to_public_key(pks[u][1])))
                (subtracted if u < d else added).append(seed)
    total += _prg_sum(added, n, domain=b"pair") - _prg_sum(subtracted, n, domain=b"pair")
    return total % MODULUS


def _prg_sum(seeds: list[bytes], n: int, *, domain: bytes) -> np.ndarray:
    """``sum(prg(s, n, domain=domain) for s in seeds) mod 2^32`` as int64, accumulated in place
    with one reduction at the end (each term is below ``2^32``: no overflow below ``2^31`` seeds)."""
    total = np.zeros(n, dtype=np.int64)
    for seed in seeds:
        total += prg(seed, n, domain=domain)
    return total % MODULUS
