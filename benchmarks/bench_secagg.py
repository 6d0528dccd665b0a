"""Secure aggregation (``fedgov.privacy.secagg``), measured at the protocol level (Flower's transport left
out): what one round costs each node and the coordinator, and what a node sends, for n nodes
and the models fedgov trains.

For each n: every node runs the keys, shares, mask (decrypting the shares it was sent, then
masking) and reveal steps, timed per node (median over the nodes); the coordinator's work per
stage is timed too: gathering the public keys (keys), routing the encrypted shares (shares),
collecting the masked vectors (mask) and unmasking the sum with ``--drop`` nodes dropped after
the shares stage (unmask: ``fedgov.privacy.secagg.unmask_sum``). The hardened protocol's
authentication (``fedgov.privacy.roster``, as the ClientApp's mods do it) is timed in the stages it
belongs to: signing the round keys (keys), checking every peer's signature (shares), signing
the survivor list (consistency) and checking the other survivors' signatures before revealing
(reveal). Bytes per node: public keys, encrypted
shares sent, masked vector (as sent: uint32), against the model's size in float32. The sum is
checked against the plain sum of the quantised vectors (exactly).

``--reference`` also unmasks the same inputs with the reconstruction fedgov used before
``fedgov.privacy.shamir`` (Flower's ``combine_shares``, one secret at a time, each expanded mask
reduced at once: :func:`reference_unmask_sum`), checks that both give the same vector, and
reports the ratio.

    .venv/bin/python benchmarks/bench_secagg.py [--nodes 12 100 342] [--drop 1] [--reference] [--models logreg mlp]

Up to 40 nodes every node shares with every other (SecAgg); above, with its neighbours in a
random regular graph only (SecAgg+, ``fedgov.privacy.secagg.neighbourhood_size``).

Prints a markdown table and writes ``benchmarks/results/secagg.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def model_sizes() -> dict[str, int]:
    """Parameters of the demo task's models on Adult (the demo task's contract and encoder)."""
    from fedgov.config import load_task
    from fedgov.data import Encoder
    from fedgov.models import build_model, get_state

    task, contract = load_task(ROOT / "configs" / "tasks" / "adult-income.toml")
    enc = Encoder.from_contract(contract, task.features)
    out = {}
    for name, spec in (("logreg", task.model), ("mlp 64-64", task.model.model_copy(update={"name": "mlp"}))):
        model = build_model(spec, n_features=enc.n_features, n_classes=enc.n_classes, seed=0)
        out[f"{name} (Adult)"] = sum(int(np.asarray(v).size) for v in get_state(model).values())
    return out


def reference_unmask_sum(
    masked: dict[int, np.ndarray], revealed: dict[int, dict[int, bytes]], *, pks: dict[int, tuple[bytes, bytes]], dropped: list[int], threshold: int = 0
) -> np.ndarray:
    """``fedgov.privacy.secagg.unmask_sum`` as it was before ``fedgov.privacy.shamir``: Flower's ``combine_shares``
    per secret (pycryptodome's pure-Python GF(2^128), a thread pool per call), one PRG expansion
    and one reduction mod 2^32 per mask, the shares of each owner found by scanning every holder."""
    from flwr.common.secure_aggregation.crypto.shamir import combine_shares
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
    from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

    from fedgov.privacy.secagg import MODULUS, _pair_seed, neighbours, prg, threshold_for
    from fedgov.errors import SecAggError

    survivors = sorted(masked)
    if len(revealed) < threshold:
        raise SecAggError(f"only {len(revealed)} nodes revealed shares; unmasking needs {threshold}")
    graph = neighbours(pks)
    n = len(next(iter(masked.values())))
    total = np.zeros(n, dtype=np.int64)
    for v in survivors:
        total = (total + masked[v]) % MODULUS

    def rebuild(owner: int) -> bytes:
        need = threshold_for(len(graph[owner]) + 1)
        shares = [r[owner] for h, r in revealed.items() if owner in r and (h == owner or h in graph[owner])]
        if len(shares) < need:
            raise SecAggError(f"{len(shares)} shares of node {owner}'s secret; {need} are needed")
        return combine_shares(shares[:need])

    for v in survivors:
        total = (total - prg(rebuild(v), n, domain=b"self")) % MODULUS
    alive = set(survivors)
    for d in dropped:
        s_sk_d = bytes_to_private_key(rebuild(d))
        for u in graph[d]:
            if u in alive:
                m = prg(_pair_seed(generate_shared_key(s_sk_d, bytes_to_public_key(pks[u][1]))), n, domain=b"pair")
                total = (total - m) % MODULUS if u < d else (total + m) % MODULUS
    return total


def one(n: int, size: int, drop: int, reference: bool = False) -> dict[str, Any]:
    from fedgov.privacy.secagg import MODULUS, NodeSecAgg, SecAggParams, decode_sum, encode_update, neighbourhood_size, threshold_for, unmask_sum

    p = SecAggParams()
    ids = list(range(1, n + 1))
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from fedgov.privacy.roster import consistency_message, keys_message, public_key_of, sign, verify

    # The hardened protocol's authentication (clients.mods, fedgov.privacy.roster): each node signs its
    # round keys with its Ed25519 identity key and checks every peer's signature (shares stage);
    # each survivor signs the survivor list (consistency stage) and checks the others' before it
    # reveals. Timed inside the stages they belong to.
    ident = {i: Ed25519PrivateKey.generate() for i in ids}
    ident_pub = {i: public_key_of(ident[i]) for i in ids}
    digest, key = b"\x00" * 32, "bench-task"
    stages = ["keys", "shares", "mask", "consistency", "reveal"]
    t: dict[str, list[float]] = {k: [] for k in stages}
    coord: dict[str, float] = {}
    states, keys = {}, {}
    sigs: dict[int, bytes] = {}
    for i in ids:
        t0 = time.perf_counter()
        states[i], c, s = NodeSecAgg.keys(i, 1)
        sigs[i] = sign(ident[i], keys_message(key, 1, i, f"GM{i:04d}", digest, c, s))
        t["keys"].append(time.perf_counter() - t0)
        keys[i] = (c, s)
    t0 = time.perf_counter()  # the coordinator gathers the keys, sorted, and the round's threshold
    pks = {i: keys[i] for i in sorted(keys)}
    threshold = threshold_for(neighbourhood_size(len(pks)) + 1)
    coord["keys"] = time.perf_counter() - t0
    cts = {}
    for i in ids:
        t0 = time.perf_counter()
        for j in ids:
            if j != i and not verify(ident_pub[j], sigs[j], keys_message(key, 1, j, f"GM{j:04d}", digest, *pks[j])):
                raise RuntimeError("a peer's signature does not verify")
        cts[i] = states[i].shares(pks, p)
        t["shares"].append(time.perf_counter() - t0)
    t0 = time.perf_counter()  # the coordinator routes each ciphertext to its addressee
    routed: dict[int, dict[int, bytes]] = {}
    for src, out in cts.items():
        for dst, ct in out.items():
            routed.setdefault(dst, {})[src] = ct
    coord["shares"] = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    ups = {i: [rng.normal(size=size) * 0.05] for i in ids}
    dropped = ids[:drop]
    masked, plain = {}, {}
    for i in ids:
        t0 = time.perf_counter()
        states[i].receive(routed.get(i, {}))
        if i not in dropped:
            plain[i] = encode_update(ups[i], 1.0, p)
            masked[i] = states[i].mask(plain[i], ids)
        t["mask"].append(time.perf_counter() - t0)
    t0 = time.perf_counter()  # the coordinator collects the masked vectors (as sent: uint32) and names the dropped
    received = {i: np.asarray(v, dtype=np.uint32).astype(np.int64) for i, v in masked.items()}
    survivors = sorted(received)
    gone = [i for i in ids if i not in received]
    coord["mask"] = time.perf_counter() - t0
    csig: dict[int, bytes] = {}
    cmsg = consistency_message(key, 1, survivors)
    for i in survivors:
        t0 = time.perf_counter()
        csig[i] = sign(ident[i], cmsg)
        t["consistency"].append(time.perf_counter() - t0)
    revealed = {}
    for i in survivors:
        t0 = time.perf_counter()
        if not all(verify(ident_pub[j], csig[j], cmsg) for j in survivors if j != i):
            raise RuntimeError("a survivor's consistency signature does not verify")
        revealed[i] = states[i].reveal(survivors, gone)
        t["reveal"].append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    total = unmask_sum(received, revealed, pks=pks, dropped=gone, threshold=threshold)
    coord["unmask"] = time.perf_counter() - t0
    exact = bool(np.array_equal(total, sum(plain[i] for i in survivors) % MODULUS))
    row_ref: dict[str, Any] = {}
    if reference:
        t0 = time.perf_counter()
        ref = reference_unmask_sum(received, revealed, pks=pks, dropped=gone, threshold=threshold)
        ref_s = time.perf_counter() - t0
        row_ref = {"coordinator_unmask_reference_s": ref_s, "unmask_speedup": ref_s / coord["unmask"],
                   "same_as_reference": bool(np.array_equal(ref, total))}
    (s,), w = decode_sum(total, len(survivors), [(size,)], p)
    err = float(np.abs(s - sum(ups[i][0] for i in survivors)).max())
    sent_bytes = {
        "keys": len(pks[1][0]) + len(pks[1][1]),
        "shares": sum(len(c) for c in cts[1].values()),
        "masked": 4 * (size + 1),
        "reveal": sum(len(x) for x in revealed[survivors[0]].values()),
    }
    return {
        "nodes": n, "params": size, "dropped": drop, "neighbours": neighbourhood_size(n), "threshold": threshold,
        "node_seconds": {k: statistics.median(v) for k, v in t.items()},
        "coordinator_seconds": coord,
        "coordinator_unmask_s": coord["unmask"],
        **row_ref,
        "sum_exact": exact,
        "bytes_per_node": sent_bytes,
        "model_float32_bytes": 4 * size,
        "bytes_ratio": sum(sent_bytes.values()) / (4 * size),
        "max_abs_error": err,
        "weight_sum": w,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, nargs="+", default=[12, 100, 342])
    ap.add_argument("--drop", type=int, default=1, help="nodes that drop after the shares stage (default 1)")
    ap.add_argument("--reference", action="store_true", help="also unmask with the reconstruction used before fedgov.privacy.shamir (Flower's combine_shares), for a before/after ratio")
    ap.add_argument("--models", nargs="+", choices=["logreg", "mlp"], default=["logreg", "mlp"], help="which of the demo task's models (default both)")
    args = ap.parse_args()
    import fedgov.privacy.shamir  # noqa: F401 - imports are not unmasking: load them before any timing
    from flwr.common.secure_aggregation.crypto import shamir, symmetric_encryption  # noqa: F401

    rows = []
    for name, size in model_sizes().items():
        if name.split()[0] not in args.models:
            continue
        for n in args.nodes:
            r = one(n, size, args.drop, args.reference)
            r["model"] = name
            rows.append(r)
            print(f"done: {name}, {n} nodes", flush=True)
    stages = [k for k in ("keys", "shares", "mask", "consistency", "reveal") if k in rows[0]["node_seconds"]]
    print(f"\n| model | nodes | neighbours | node: {' / '.join(stages)} (s) | coordinator: keys / shares / mask / unmask (s) |"
          + (" unmask before (s) | speed-up |" if args.reference else "") + " bytes sent per node | / model float32 | sum exact | max error |")
    print("|---|---|---|---|---|" + ("---|---|" if args.reference else "") + "---|---|---|---|")
    for r in rows:
        ns, cs = r["node_seconds"], r["coordinator_seconds"]
        ref = f" {r['coordinator_unmask_reference_s']:.2f} | {r['unmask_speedup']:.0f}x |" if args.reference else ""
        print(
            f"| {r['model']} | {r['nodes']} | {r['neighbours']} | {' / '.join(f'{ns[k]:.3g}' for k in stages)} | "
            f"{cs['keys']:.4f} / {cs['shares']:.4f} / {cs['mask']:.4f} / {cs['unmask']:.3f} |{ref} "
            f"{sum(r['bytes_per_node'].values()):,} | {r['bytes_ratio']:.2f} | {r['sum_exact']} | {r['max_abs_error']:.1e} |"
        )
    out = ROOT / "benchmarks" / "results" / "secagg.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.machine(),
            "consistency_stage": "timed" if "consistency" in stages else "none in fedgov.privacy.secagg: skipped"}
    command = "benchmarks/bench_secagg.py " + " ".join(sys.argv[1:])
    out.write_text(json.dumps({"command": command.strip(), "environment": meta, "rows": rows}, indent=2), encoding="utf-8")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
