"""The coordinator's fast unmasking (``fedgov.privacy.shamir``, ``fedgov.privacy.secagg.unmask_sum``): the same
secrets, byte for byte, as Flower's ``combine_shares`` on the shares Flower's ``create_shares``
makes, and the exact plain sum at SecAgg+ scale with dropped nodes. Timings are in
``benchmarks/bench_secagg.py``, never asserted here."""

from __future__ import annotations

import os
import random
from collections.abc import Callable

import numpy as np
import pytest
from Crypto.Protocol.SecretSharing import _Element
from flwr.common.secure_aggregation.crypto.shamir import combine_shares as flower_combine
from flwr.common.secure_aggregation.crypto import shamir as flower_shamir
from flwr.common.secure_aggregation.crypto.shamir import create_shares
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedgov.privacy import shamir
from fedgov.privacy.secagg import MODULUS, NodeSecAgg, SecAggParams, encode_update, neighbourhood_size, neighbours, threshold_for, unmask_sum
from fedgov.errors import SecAggError

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(a=st.integers(0, (1 << 128) - 1), b=st.integers(0, (1 << 128) - 1))
def test_field_arithmetic_is_pycryptodomes(a: int, b: int) -> None:
    assert shamir._gf_mul(a, b) == int(_Element(a) * _Element(b))
    if a:
        assert shamir._gf_inv(a) == int(_Element(a).inverse())
        assert shamir._gf_mul(a, shamir._gf_inv(a)) == 1


@SETTINGS
@given(
    secret=st.binary(min_size=0, max_size=64),
    n=st.integers(1, 20),
    data=st.data(),
)
def test_combine_is_flowers_on_any_threshold_subset(secret: bytes, n: int, data: st.DataObject) -> None:
    t = data.draw(st.integers(1, n), label="threshold")
    shares = create_shares(secret, t, n)
    subset = data.draw(st.permutations(shares), label="order")[:t]
    expected = flower_combine(subset)
    assert expected == secret
    assert shamir.combine_shares(subset) == expected
    # tampered bytes: both reject, or both give the same (wrong) secret
    pos = data.draw(st.integers(4, len(subset[0]) - 1), label="byte")
    bad = [bytearray(s) for s in subset]
    bad[0][pos] ^= 1 + data.draw(st.integers(0, 254), label="flip")
    bad_shares = [bytes(s) for s in bad]
    try:
        flower = flower_combine(bad_shares)
    except ValueError:
        with pytest.raises(ValueError):
            shamir.combine_shares(bad_shares)
    else:
        assert shamir.combine_shares(bad_shares) == flower != secret


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    secret=st.binary(min_size=0, max_size=200),
    n=st.integers(1, 40),
    data=st.data(),
    seed=st.integers(0, 2**32),
)
def test_create_is_flowers_given_the_same_random_bytes(secret: bytes, n: int, data: st.DataObject, seed: int) -> None:
    """fedgov's share maker is Flower's (pycryptodome's polynomial and Flower's layout), byte
    for byte, when both draw the same coefficients; and any threshold of its shares rebuild the
    secret with Flower's own combine."""
    import Crypto.Protocol.SecretSharing as pycryptodome

    t = data.draw(st.integers(1, n), label="threshold")
    stream = random.Random(seed).randbytes(16 * 40 * 14)  # enough coefficients for 13 chunks

    def source() -> Callable[[int], bytes]:
        at = [0]

        def take(k: int) -> bytes:
            at[0] += k
            return stream[at[0] - k : at[0]]

        return take

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pycryptodome, "rng", source())
        # Flower splits the chunks in a thread pool: one worker, so they draw in chunk order
        mp.setattr(flower_shamir.os, "cpu_count", lambda: 1)
        expected = create_shares(secret, t, n)
    ours = shamir.create_shares(secret, t, n, random_bytes=source())
    assert ours == expected
    fresh = shamir.create_shares(secret, t, n)  # the operating system's generator
    subset = data.draw(st.permutations(fresh), label="order")[:t]
    assert flower_combine(subset) == secret == shamir.combine_shares(subset)


def test_create_refuses_a_threshold_it_cannot_meet() -> None:
    with pytest.raises(ValueError, match="threshold"):
        shamir.create_shares(b"x", 4, 3)
    with pytest.raises(ValueError, match="threshold"):
        shamir.create_shares(b"x", 0, 3)


@pytest.mark.statistical
def test_many_secrets_at_once_with_mixed_index_sets_and_sizes() -> None:
    rng = random.Random(7)
    secrets, lists = [], []
    for _ in range(60):
        secret = os.urandom(rng.choice([0, 16, 32, 48, 167]))
        n = rng.randint(2, 12)
        t = rng.randint(1, n)
        shares = create_shares(secret, t, n)
        secrets.append(secret)
        lists.append(rng.sample(shares, t))
    assert shamir.combine_shares_many(lists) == secrets
    assert [flower_combine(s) for s in lists[:10]] == secrets[:10]


def test_malformed_shares_are_refused_with_their_position() -> None:
    good = create_shares(b"k" * 32, 3, 5)
    for bad in (
        [good[0], good[0], good[1]],  # duplicate index
        [good[0], good[1][:-1], good[2]],  # uneven length
        [good[0][:10], good[1][:10], good[2][:10]],  # not 4 + 16 c bytes
        [],
    ):
        with pytest.raises(shamir.ShareError) as info:
            shamir.combine_shares_many([good[:3], bad])
        assert info.value.position == 1
    with pytest.raises(ValueError, match="Duplicate"):
        flower_combine([good[0], good[0], good[1]])


P = SecAggParams()


def test_unmask_sum_is_the_exact_plain_sum_under_secagg_plus_with_dropouts() -> None:
    ids = list(range(500, 560))  # 60 nodes: SecAgg+ (above 40), 24 neighbours, threshold 13
    states, pks = {}, {}
    for i in ids:
        states[i], c, s = NodeSecAgg.keys(i, 1)
        pks[i] = (c, s)
    cts = {i: states[i].shares(pks, P) for i in ids}
    for i in ids:
        states[i].receive({src: cts[src][i] for src in ids if i in cts[src]})
    graph = neighbours(pks)
    k = neighbourhood_size(len(ids))
    assert k < len(ids) - 1
    rng = np.random.default_rng(11)
    ys = {i: encode_update([rng.normal(size=37) * 0.1], 1.0, P) for i in ids}
    dropped = [ids[0], ids[9], ids[31], ids[58]]
    masked = {i: states[i].mask(ys[i], ids) for i in ids if i not in dropped}
    survivors = sorted(masked)
    revealed = {i: states[i].reveal(survivors, dropped) for i in survivors}
    total = unmask_sum(masked, revealed, pks=pks, dropped=dropped, threshold=threshold_for(k + 1))
    assert total.dtype == np.int64
    np.testing.assert_array_equal(total, sum(ys[i] for i in survivors) % MODULUS)
    # the secrets it rebuilds are the nodes' own, byte for byte, from any threshold of shares
    for owner, want in [(survivors[0], states[survivors[0]].b), (dropped[1], states[dropped[1]].s_sk)]:
        held = [revealed[h][owner] for h in [owner, *graph[owner]] if h in revealed and owner in revealed[h]]
        need = threshold_for(k + 1)
        assert shamir.combine_shares_many([held[:need], held[-need:]]) == [want, want]
        assert flower_combine(held[-need:]) == want
    # shares that cannot combine name their owner
    owner = survivors[5]
    broken = {h: {o: (s[:-1] if o == owner else s) for o, s in r.items()} for h, r in revealed.items()}
    with pytest.raises(SecAggError, match=rf"node {owner}'s secret do not combine"):
        unmask_sum(masked, broken, pks=pks, dropped=dropped)
    with pytest.raises(SecAggError, match=rf"shares of node \d+'s secret; {threshold_for(k + 1)} are needed"):
        unmask_sum(masked, {h: r for h, r in revealed.items() if h not in graph[dropped[1]]}, pks=pks, dropped=dropped)
