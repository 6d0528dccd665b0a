"""Synthetic social-domain data in the shape of the iWmo standard (release 3.2).

One row per assigned product (ToegewezenProduct) of a Wmo client, for any of the 342 Dutch
municipalities. Nothing here is real: the data are drawn from hand-set distributions that give
the data a plausible shape (old clients, long-tailed municipality sizes, per-municipality
differences in product mix and referrers, trajectories that end early depending on category,
age, referrer and municipality), so that fedgov has a realistic default for DP statistics
queries and a second training task: "will a support trajectory end early?" (``ended_early``).

Every municipality draws from its own random stream, seeded from ``(seed, CBS code)``: the same
arguments give an identical frame, and generating a subset of municipalities (``codes=``) gives
exactly those municipalities' rows of the full generation. Within a municipality the work is
vectorised with numpy; the whole country (about 1.4 million rows at ``scale=1.0``) takes a few
seconds.

Columns, with the iWmo element each one stands for:

============== ===========================================================================
person_id      client (Client), ``GM0363-000123``; 1 to 4 rows per client
municipality   Gemeente (CBS code)
province       from ``nl_gemeenten.csv``
gender         Client/Geslacht: 0 unknown, 1 male, 2 female
age            from Client/Geboortedatum, in whole years at the reference year 2026
age_group      0-17, 18-39, 40-64, 65-74, 75-84, 85+
product_category ToegewezenProduct/Product/Categorie, 01..18
referrer       Verwijzer/Type: 01, 02, 03, 04, 05, 06, 08
start_year     year of ToegewezenProduct/Ingangsdatum, 2015..2026
duration_days  Ingangsdatum to Einddatum, or to the reference date 2026-11-28 if ongoing
volume         Omvang/Volume, as hours of support per week (0 for aids and transport)
unit           Omvang/Eenheid: 01 minute, 04 hour, 14 day, 16 half-day, 83 euro
budget_eur     Budget, in euro, up to the end of the trajectory or the reference date
stop_reason    RedenWijziging at the end: 02, 19, 20, 21, 22, 23, 31, 36, 38, 39; 00 ongoing
ended_early    1 when stop_reason is 21, 22 or 23 (ended by client, by provider, by agreement)
ongoing        true when the trajectory had not ended at the reference date
============== ===========================================================================
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from fedgov.data.io import atomic_write_bytes
from fedgov.config.municipalities import all_municipalities

__all__ = [
    "AGE_GROUPS",
    "CATEGORIES",
    "COLUMNS",
    "DEFAULT_SEED",
    "EARLY_STOP_REASONS",
    "REFERENCE_DATE",
    "REFERRERS",
    "STOP_REASONS",
    "UNITS",
    "ensure",
    "generate",
    "write",
]

log = logging.getLogger(__name__)

DEFAULT_SEED = 2026
REFERENCE_DATE = np.datetime64("2026-11-28", "D")
"""The day the data are taken: trajectories that have not ended by then are ongoing."""
FIRST_DATE = np.datetime64("2015-01-01", "D")
"""The first possible start date (the Wmo 2015 came into force then)."""
REFERENCE_YEAR = 2026

CLIENT_RATE = 0.06
"""Clients (over 2015..2026) per inhabitant, before a municipal factor and ``scale``."""
MIN_CLIENTS = 20
"""Fewest clients of a municipality at ``scale=1.0`` (small or unmatched populations)."""
MAX_DURATION = 3650

COLUMNS = [
    "person_id",
    "municipality",
    "province",
    "gender",
    "age",
    "age_group",
    "product_category",
    "referrer",
    "start_year",
    "duration_days",
    "volume",
    "unit",
    "budget_eur",
    "stop_reason",
    "ended_early",
    "ongoing",
]

GENDERS = ["0", "1", "2"]
AGE_GROUPS = ["0-17", "18-39", "40-64", "65-74", "75-84", "85+"]
_AGE_EDGES = np.array([18, 40, 65, 75, 85])
CATEGORIES = [f"{i:02d}" for i in range(1, 19)]
REFERRERS = ["01", "02", "03", "04", "05", "06", "08"]
UNITS = ["01", "04", "14", "16", "83"]
STOP_REASONS = ["00", "02", "19", "20", "21", "22", "23", "31", "36", "38", "39"]
EARLY_STOP_REASONS = ("21", "22", "23")

# --- product categories -----------------------------------------------------------------------
# 01 household help, 02 support/guidance, 03 personal care, 04 short stay, 05 housing services,
# 06 other individual support, 07 day activities, 08 transport, 09 other group support,
# 10 other custom arrangements, 11 wheelchairs, 12 mobility aids, 13 home adaptations,
# 14 other aids, 15 sheltered housing, 16 shelter, 17 emergency shelter, 18 other sheltered housing.
_BASE_MIX = np.array(
    [0.20, 0.13, 0.03, 0.025, 0.025, 0.04, 0.06, 0.12, 0.03, 0.025, 0.05, 0.07, 0.06, 0.04, 0.035, 0.025, 0.02, 0.02]
)
_BASE_MIX = _BASE_MIX / _BASE_MIX.sum()
_MIX_CONCENTRATION = 150.0
# How strongly a category follows urbanisation (log scale): shelter and support/guidance in the
# big cities, household help, transport and home adaptations in the countryside.
_URBAN_TILT = np.array(
    [-0.45, 0.45, 0.0, 0.0, 0.2, 0.2, 0.0, -0.45, 0.0, 0.0, -0.1, -0.1, -0.45, -0.1, 0.9, 1.0, 1.1, 0.8]
)
# Clients of the "young" group (support, housing and shelter) are mostly under 65; the others
# (household help, care, aids, transport) mostly old. A client's products all come from its group.
_YOUNG = np.array([c in {2, 5, 6, 9, 10, 15, 16, 17, 18} for c in range(1, 19)])

# Unit per category: the usual one, an alternative and how often the alternative is used.
_UNIT_MAIN = np.array(["04", "04", "01", "14", "04", "04", "16", "83", "16", "83", "83", "83", "83", "83", "14", "14", "14", "14"])
_UNIT_ALT = np.array(["04", "01", "04", "14", "04", "01", "16", "83", "16", "83", "83", "83", "83", "83", "14", "14", "14", "14"])
_UNIT_ALT_P = np.array([0, 0.25, 0.4, 0, 0, 0.2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0.0])
_UNIT_INDEX = {u: i for i, u in enumerate(UNITS)}
_UNIT_MAIN_I = np.array([_UNIT_INDEX[u] for u in _UNIT_MAIN])
_UNIT_ALT_I = np.array([_UNIT_INDEX[u] for u in _UNIT_ALT])

# Hours of support per week (median; 0 for products counted in euro: aids, transport, custom).
_VOLUME_MEDIAN = np.array([3, 3, 4, 24, 4, 3, 8, 0, 6, 0, 0, 0, 0, 0, 12, 10, 14, 8], dtype=float)
# Planned duration in days (median of a log-normal), and the cost rates that give the budget.
_DURATION_MEDIAN = np.array(
    [900, 400, 500, 30, 500, 300, 700, 1200, 400, 300, 1800, 1500, 2500, 1000, 600, 150, 40, 400], dtype=float
)
_HOUR_RATE = np.array([32, 62, 55, 60, 60, 65, 50, 0, 45, 0, 0, 0, 0, 0, 60, 55, 55, 55], dtype=float)
_DAY_RATE = np.array([0, 0, 0, 150, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 120, 90, 100, 95], dtype=float)
_HALF_DAY_RATE = 45.0
# Products counted in euro: a one-off or yearly amount (median of a log-normal).
_EURO_MEDIAN = np.array([0, 0, 0, 0, 0, 0, 0, 600, 0, 2000, 3500, 1500, 7000, 700, 0, 0, 0, 0], dtype=float)
_EURO_YEARLY = np.array([c == 8 for c in range(1, 19)])

# Referrers 01 municipality, 02 GP, 03 youth doctor, 04 certified institution, 05 medical
# specialist, 06 self-referral, 08 judicial: a national mix, tilted per category.
_REF_BASE = np.array([0.55, 0.17, 0.01, 0.04, 0.11, 0.10, 0.02])
_REF_CONCENTRATION = 80.0
_REF_TILT = np.ones((18, 7))
for _c in (2, 6, 9, 10):
    _REF_TILT[_c - 1] = [1.0, 1.5, 1.0, 1.5, 0.6, 1.3, 1.5]
for _c in (15, 16, 17, 18):
    _REF_TILT[_c - 1] = [1.0, 0.8, 0.5, 3.0, 0.4, 2.0, 6.0]
for _c in (11, 12, 13, 14):
    _REF_TILT[_c - 1] = [1.0, 1.2, 1.0, 0.3, 2.5, 0.8, 0.1]
for _c in (1, 3, 4, 7, 8):
    _REF_TILT[_c - 1] = [1.2, 1.0, 1.0, 0.5, 1.3, 0.9, 0.2]
_YOUTH_DOCTOR_CHILD_TILT = 30.0

# Early ending (stop reasons 21, 22, 23): log-odds effects.
_EARLY_INTERCEPT = -1.3
_EARLY_CATEGORY = np.array(
    [-0.7, 0.9, -0.2, 0.3, 0.5, 0.6, 0.0, -1.0, 0.3, 0.2, -1.6, -1.4, -1.9, -1.3, 0.8, 1.3, 1.6, 1.0]
)
_EARLY_AGE_GROUP = np.array([0.3, 0.8, 0.4, 0.0, -0.4, -0.8])
_EARLY_REFERRER = np.array([0.0, -0.1, 0.2, 0.6, -0.4, 0.6, 1.1])
_EARLY_GENDER = np.array([0.3, 0.2, 0.0])
_EARLY_VOLUME = 0.04  # per hour per week above 4
_EARLY_MUNICIPAL_SD = 0.35
_EARLY_SPLIT = np.array([0.40, 0.25, 0.35])  # 21 by client, 22 by provider, 23 by agreement

# Other stop reasons of ended trajectories, for young and for old clients:
# 02 death, 19 as planned, 20 temporary, 31 moved, 36 municipality, 38 provider switch, 39 other regime.
_OTHER_STOPS = np.array([1, 2, 3, 7, 8, 9, 10])  # indices into STOP_REASONS
_OTHER_YOUNG = np.array([0.02, 0.55, 0.05, 0.10, 0.10, 0.12, 0.06])
_OTHER_OLD = np.array([0.35, 0.25, 0.03, 0.03, 0.05, 0.07, 0.22])
_EARLY_STOPS = np.array([4, 5, 6])

# Products per client (1..4), for young and old clients.
_PRODUCTS_YOUNG = np.array([0.81, 0.15, 0.03, 0.01])
_PRODUCTS_OLD = np.array([0.74, 0.19, 0.055, 0.015])


def _draw(cum: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Indices drawn with a cumulative distribution (its last entry 1) from uniforms ``u``."""
    return np.minimum(np.searchsorted(cum, u, side="right"), len(cum) - 1)


def _draw_rows(probs: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Per row an index drawn from that row's (unnormalised) probabilities."""
    cum = np.cumsum(probs, axis=1)
    cum /= cum[:, -1:]
    drawn: np.ndarray = np.minimum((u[:, None] >= cum).sum(axis=1), probs.shape[1] - 1)
    return drawn


def _urbanisation(population: int) -> float:
    """-1 (a village) to 1 (Amsterdam, Rotterdam), 0 at 30,000 inhabitants (log scale)."""
    return float(np.clip(math.log(max(population, 1000) / 30_000) / math.log(30), -1.0, 1.0))


def _municipality(code: str, population: int, seed: int, scale: float) -> dict[str, np.ndarray]:
    """One municipality's rows as numeric arrays (indices into the category lists)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, int(code[2:])]))
    urb = _urbanisation(population)

    # Municipal parameters: drawn first, in a fixed order, so that they do not depend on scale.
    mix = rng.dirichlet(_MIX_CONCENTRATION * _BASE_MIX * np.exp(_URBAN_TILT * urb))
    ref_mix = rng.dirichlet(_REF_CONCENTRATION * _REF_BASE)
    early_effect = rng.normal(0.0, _EARLY_MUNICIPAL_SD)
    rate = CLIENT_RATE * math.exp(rng.normal(0.0, 0.12) - 0.1 * urb)
    age_shift = rng.normal(0.0, 1.5) - 2.0 * urb

    n_clients = max(1, round(scale * max(float(MIN_CLIENTS), rate * population)))

    # Clients: group (young/old), products, gender, age.
    cu = rng.random((n_clients, 4))
    cz = rng.standard_normal(n_clients)
    p_young = float(mix[_YOUNG].sum())
    young = cu[:, 0] < p_young
    n_products = np.where(
        young, _draw(np.cumsum(_PRODUCTS_YOUNG), cu[:, 1]), _draw(np.cumsum(_PRODUCTS_OLD), cu[:, 1])
    ) + 1
    p_female = np.where(young, 0.42, 0.62)
    gender = np.where(cu[:, 2] < 0.005, 0, np.where(cu[:, 2] < 0.005 + p_female, 2, 1))
    # Old group: mostly 65+, a share of younger disabled adults and a few children.
    pick = cu[:, 3]
    age_old = np.where(pick < 0.84, 80.0 + 8.0 * cz, np.where(pick < 0.98, 57.0 + 11.0 * cz, 2.0 + 16.0 * (pick - 0.98) / 0.02))
    age_young = 18.0 + np.exp(math.log(26.0) + 0.55 * cz)
    age_f = np.where(young, age_young, age_old) + age_shift
    birth_year = REFERENCE_YEAR - np.clip(np.round(age_f), 0, 105).astype(np.int64)
    age = np.clip(REFERENCE_YEAR - birth_year, 0, 105)

    # Rows: one per assigned product.
    client = np.repeat(np.arange(n_clients), n_products)
    n_rows = len(client)
    ru = rng.random((n_rows, 8))
    rz = rng.standard_normal((n_rows, 3))
    r_young = young[client]
    r_age = age[client]
    r_gender = gender[client]

    cum_young = np.cumsum(np.where(_YOUNG, mix, 0.0))
    cum_old = np.cumsum(np.where(_YOUNG, 0.0, mix))
    cat = np.where(
        r_young,
        _draw(cum_young / cum_young[-1], ru[:, 0] * (1 - 1e-12)),
        _draw(cum_old / cum_old[-1], ru[:, 0] * (1 - 1e-12)),
    )
    # A zero-probability category is never drawn: searchsorted(side="right") skips repeated
    # cumulative values, and the largest uniform is kept below the last cumulative value.

    age_group = np.searchsorted(_AGE_EDGES, r_age, side="right")
    ref_probs = ref_mix[None, :] * _REF_TILT[cat]
    ref_probs[:, 2] *= np.where(r_age < 18, _YOUTH_DOCTOR_CHILD_TILT, 1.0)
    referrer = _draw_rows(ref_probs, ru[:, 1])

    is_euro = _VOLUME_MEDIAN[cat] == 0
    volume = np.where(is_euro, 0.0, _VOLUME_MEDIAN[cat] * np.exp(0.5 * rz[:, 0]))
    volume = np.round(np.clip(volume, 0.0, 40.0), 1)
    volume = np.where(is_euro, 0.0, np.maximum(volume, 0.5))
    unit = np.where(ru[:, 2] < _UNIT_ALT_P[cat], _UNIT_ALT_I[cat], _UNIT_MAIN_I[cat])

    logit = (
        _EARLY_INTERCEPT
        + _EARLY_CATEGORY[cat]
        + _EARLY_AGE_GROUP[age_group]
        + _EARLY_REFERRER[referrer]
        + _EARLY_GENDER[r_gender]
        + _EARLY_VOLUME * (volume - 4.0)
        + early_effect
    )
    early = ru[:, 3] < 1.0 / (1.0 + np.exp(-logit))

    # Dates: later starts are more common (the Wmo caseload grows); early endings are shorter.
    span = int((REFERENCE_DATE - FIRST_DATE).astype(np.int64))
    start_off = np.minimum((span * ru[:, 4] ** 0.75).astype(np.int64), span - 1)
    planned = _DURATION_MEDIAN[cat] * np.exp(0.8 * rz[:, 1])
    planned = np.where(early, planned * (0.1 + 0.5 * ru[:, 5]), planned)
    planned_days = np.clip(np.round(planned), 1, MAX_DURATION).astype(np.int64)
    ongoing = start_off + planned_days > span
    duration = np.where(ongoing, span - start_off, planned_days)
    start_year = (FIRST_DATE + start_off).astype("datetime64[Y]").astype(np.int64) + 1970

    old_weight = np.clip((r_age - 50.0) / 40.0, 0.0, 1.0)[:, None]
    other = _OTHER_STOPS[_draw_rows((1.0 - old_weight) * _OTHER_YOUNG + old_weight * _OTHER_OLD, ru[:, 6])]
    early_stop = _EARLY_STOPS[_draw(np.cumsum(_EARLY_SPLIT), ru[:, 7])]
    stop = np.where(ongoing, 0, np.where(early, early_stop, other))

    weeks = duration / 7.0
    cost = np.select(
        [unit == _UNIT_INDEX["14"], unit == _UNIT_INDEX["16"], is_euro],
        [
            _DAY_RATE[cat] * duration,
            volume / 4.0 * _HALF_DAY_RATE * weeks,
            _EURO_MEDIAN[cat] * np.exp(0.7 * rz[:, 2]) * np.where(_EURO_YEARLY[cat], duration / 365.0, 1.0),
        ],
        default=volume * _HOUR_RATE[cat] * weeks,
    )
    cost = np.where(is_euro, cost, cost * np.exp(0.15 * rz[:, 2]))
    budget = np.round(np.clip(cost, 0.0, 100_000.0), 2)

    return {
        "client": client,
        "gender": r_gender,
        "age": r_age,
        "age_group": age_group,
        "product_category": cat,
        "referrer": referrer,
        "start_year": start_year,
        "duration_days": duration,
        "volume": volume,
        "unit": unit,
        "budget_eur": budget,
        "stop_reason": stop,
        "ongoing": ongoing,
    }


def _categorical(index: np.ndarray, categories: list[str]) -> pd.Categorical:
    return pd.Categorical.from_codes(index.astype(np.int8), categories=categories)


def generate(seed: int = DEFAULT_SEED, *, scale: float = 1.0, codes: Sequence[str] | None = None) -> pd.DataFrame:
    """Synthetic iWmo assigned products for all municipalities, or for ``codes``.

    One row per assigned product, municipalities in the order of ``nl_gemeenten.csv``, each
    client's rows together. About ``6% * scale`` of a municipality's inhabitants are clients
    (at least ``20 * scale``, and at least 1), with 1 to 4 products each (mean about 1.3).
    The same ``seed`` and ``scale`` give the same rows for a municipality whether or not the
    others are generated too. Categorical columns are pandas categoricals holding every
    category of the contract ``configs/contracts/iwmo-wmo.toml``.

    Raises :class:`ValueError` for an unknown CBS code, an empty ``codes``, a negative seed
    or a scale that is not positive.
    """
    if seed < 0:
        raise ValueError(f"seed must be >= 0, not {seed}")
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"scale must be a positive number, not {scale}")
    known = all_municipalities()
    if codes is None:
        chosen = list(known)
    else:
        wanted = set(codes)
        unknown = sorted(wanted - set(known))
        if unknown:
            from fedgov.config.registry import default_registry

            raise ValueError(f"not CBS municipality codes in {default_registry().describe()}: {', '.join(unknown)}")
        chosen = [c for c in known if c in wanted]

    if not chosen:
        raise ValueError("codes is empty: name at least one municipality")

    parts = [_municipality(c, known[c].approx_population, seed, scale) for c in chosen]
    sizes = np.array([len(p["client"]) for p in parts], dtype=np.int64)
    cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    muni_index = np.repeat(np.arange(len(chosen)), sizes)
    munis = pd.Categorical.from_codes(muni_index, categories=chosen)
    provinces = [known[c].province for c in chosen]
    person = pd.Series(munis.astype(str), dtype=object) + "-" + pd.Series(cols["client"]).astype(str).str.zfill(6).astype(object)
    stop = cols["stop_reason"]
    early = np.isin(stop, [STOP_REASONS.index(s) for s in EARLY_STOP_REASONS])

    frame = pd.DataFrame(
        {
            "person_id": person.to_numpy(dtype=object),
            "municipality": munis.astype(object),
            "province": np.array(provinces, dtype=object)[muni_index],
            "gender": _categorical(cols["gender"], GENDERS),
            "age": cols["age"].astype(np.int64),
            "age_group": _categorical(cols["age_group"], AGE_GROUPS),
            "product_category": _categorical(cols["product_category"], CATEGORIES),
            "referrer": _categorical(cols["referrer"], REFERRERS),
            "start_year": cols["start_year"].astype(np.int64),
            "duration_days": cols["duration_days"].astype(np.int64),
            "volume": cols["volume"].astype(np.float64),
            "unit": _categorical(cols["unit"], UNITS),
            "budget_eur": cols["budget_eur"].astype(np.float64),
            "stop_reason": _categorical(stop, STOP_REASONS),
            "ended_early": _categorical(early.astype(np.int8), ["0", "1"]),
            "ongoing": cols["ongoing"].astype(bool),
        },
        columns=COLUMNS,
    )
    return frame


def write(path: Path, frame: pd.DataFrame) -> Path:
    """Write ``frame`` as a UTF-8 CSV (booleans as ``true``/``false``), atomically; returns ``path``."""
    out = frame.copy()
    for name in out.columns:
        if pd.api.types.is_bool_dtype(out[name].dtype):
            out[name] = np.where(out[name].to_numpy(dtype=bool), "true", "false")
    buf = io.StringIO()
    out.to_csv(buf, index=False, lineterminator="\n")
    p = Path(path)
    atomic_write_bytes(p, buf.getvalue().encode("utf-8"))
    log.info("wrote %s: %d rows", p, len(frame))
    return p


def ensure(path: Path, seed: int = DEFAULT_SEED, scale: float = 1.0) -> Path:
    """``path`` if it exists; otherwise generate the data with ``seed`` and ``scale`` and write it there.

    An existing file is returned as it is, whatever seed and scale it was made with.
    """
    p = Path(path)
    if p.exists():
        return p
    return write(p, generate(seed, scale=scale))
