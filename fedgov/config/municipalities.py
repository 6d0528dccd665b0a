"""The 342 Dutch municipalities (CBS codes, names, provinces, approximate populations).

Shipped in ``fedgov/resources/nl_gemeenten.csv``. Sources: GeoNames (CC BY 4.0,
https://www.geonames.org); see ``data/README.md``. Populations are approximate and serve
only to give simulated nodes a realistic, long-tailed spread of sizes.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import cache
from importlib import resources

__all__ = ["Municipality", "all_municipalities", "municipality", "display_name"]


@dataclass(frozen=True)
class Municipality:
    code: str
    name: str
    province: str
    approx_population: int


@cache
def all_municipalities() -> dict[str, Municipality]:
    """All municipalities keyed by CBS code (``GM0363``)."""
    text = resources.files("fedgov.resources").joinpath("nl_gemeenten.csv").read_text("utf-8")
    out: dict[str, Municipality] = {}
    for row in csv.DictReader(text.splitlines()):
        out[row["cbs_code"]] = Municipality(
            row["cbs_code"], row["name"], row["province"], int(row["approx_population"])
        )
    return out


def municipality(code: str) -> Municipality:
    """Look up one municipality by CBS code; KeyError if there is none."""
    return all_municipalities()[code]


def display_name(code: str) -> str:
    """The municipality's name for a CBS code; the code itself for a node that is not one."""
    m = all_municipalities().get(code)
    return m.name if m else code
