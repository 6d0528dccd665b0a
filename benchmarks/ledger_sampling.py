"""The ledger's epsilon with and without sampling municipalities (issue 14, part 5).

For a distributed-DP task of ROUNDS rounds at target epsilon EPS, planned with sampling rate q
(``training.fraction_train``): what a node's ledger ends at, and what the guarantee against the
coordinator is, under the old design (the coordinator samples, so it knows who took part; a
node records only the rounds it was asked, at rate q) and under fedgov's (every node is asked
every round and its own secret coin decides; each round is recorded at rate q).

    .venv/bin/python benchmarks/ledger_sampling.py [--rounds 100] [--q 0.1] [--epsilon 2]

Writes benchmarks/results/ledger_sampling.json. Pure accounting: no training.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from fedgov.privacy import epsilon_from_history
from fedgov.privacy.distributed import plan_distributed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--q", type=float, default=0.1)
    ap.add_argument("--epsilon", type=float, default=2.0)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--accountant", default="prv")
    args = ap.parse_args()
    r, q, d, acct = args.rounds, args.q, args.delta, args.accountant
    asked = max(1, math.ceil(q * r))  # rounds a node is asked in, in expectation
    sampled = plan_distributed(dimension=218, clip=1.0, rounds=r, sample_rate=q, target_epsilon=args.epsilon, delta=d, accountant=acct)
    full = plan_distributed(dimension=218, clip=1.0, rounds=r, sample_rate=1.0, target_epsilon=args.epsilon, delta=d, accountant=acct)
    z = sampled.noise_multiplier

    def eps(history: list[tuple[float, float, int]]) -> float:
        return epsilon_from_history(history=history, delta=d, accountant=acct)

    rows = {
        "no sampling (q = 1): ledger = guarantee": eps([(full.noise_multiplier, 1.0, r)]),
        "old: coordinator samples, ledger (asked rounds at rate q)": eps([(z, q, asked)]),
        "old: guarantee against the coordinator (asked rounds, it knows who)": eps([(z, 1.0, asked)]),
        "fedgov: node's secret coin, ledger (every round at rate q)": eps([(z, q, r)]),
        "fedgov: guarantee against the coordinator (it cannot see the coins)": eps([(z, q, r)]),
    }
    out = {"rounds": r, "q": q, "target_epsilon": args.epsilon, "delta": d, "accountant": acct,
           "z_sampled": z, "z_full": full.noise_multiplier, "epsilon": rows}
    print(f"distributed DP, {r} rounds, q = {q}, target epsilon {args.epsilon}, delta {d:g} ({acct}); z = {z:.3f} (q = 1: {full.noise_multiplier:.3f})")
    for k, v in rows.items():
        print(f"  {k:72s} {v:7.3f}")
    res = Path(__file__).resolve().parent / "results"
    res.mkdir(exist_ok=True)
    (res / "ledger_sampling.json").write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
