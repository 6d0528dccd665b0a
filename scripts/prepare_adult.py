"""Convert the shipped UCI Adult files into headered CSV files fedgov's contracts describe.

The original files (``adult.data``, ``adult.test``) stay unchanged beside the output, as
their licence (CC BY 4.0) and ``data/README.md`` ask. The conversion: a header row, the
leading blanks stripped, ``?`` turned into an empty (missing) cell, and the trailing dot of
the test labels removed. Run ``python scripts/prepare_adult.py`` to regenerate.
"""

from __future__ import annotations

import csv
from pathlib import Path

COLUMNS = [
    "age", "workclass", "fnlwgt", "education", "education_num", "marital_status",
    "occupation", "relationship", "race", "sex", "capital_gain", "capital_loss",
    "hours_per_week", "native_country", "income",
]
HERE = Path(__file__).resolve().parent.parent / "data" / "adult"


def convert(src: Path, dst: Path) -> int:
    rows = 0
    with src.open(encoding="utf-8") as fin, dst.open("w", encoding="utf-8", newline="") as fout:
        writer = csv.writer(fout)
        writer.writerow(COLUMNS)
        for line in fin:
            line = line.strip()
            if not line or line.startswith("|"):
                continue
            cells = [c.strip() for c in line.split(",")]
            if len(cells) != len(COLUMNS):
                continue
            cells = ["" if c == "?" else c for c in cells]
            cells[-1] = cells[-1].rstrip(".")
            writer.writerow(cells)
            rows += 1
    return rows


if __name__ == "__main__":
    print("adult.csv", convert(HERE / "adult.data", HERE / "adult.csv"))
    print("adult_test.csv", convert(HERE / "adult.test", HERE / "adult_test.csv"))
