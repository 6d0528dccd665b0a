"""Reading and writing a node's data files (CSV or Parquet).

Every file is read as *text*: each cell becomes a string and an empty cell is the empty
string. Nothing is converted or guessed here, so that :func:`fedgov.data.validate_frame` can
report exactly what a municipality's export holds ("found '3,5' in row 17") and behaves the
same for CSV and Parquet. A file that cannot be read at all raises
:class:`~fedgov.errors.DataFileError` with the path and the reason; a file that reads but does
not conform to its contract is the validator's business, not this module's.

Log messages name files, row and column counts only, never cell values: a node's data stays on
the node and out of log files.
"""

from __future__ import annotations

import csv
import gzip
import io
import logging
import os
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from fedgov.config.contract import ColumnType, Contract
from fedgov.errors import DataFileError

__all__ = ["ACCEPTED_KINDS", "read_table", "write_csv", "atomic_write_bytes"]

log = logging.getLogger(__name__)

ACCEPTED_KINDS = "CSV (.csv, .csv.gz) or Parquet (.parquet, .pq)"
"""What :func:`read_table` accepts, as it is said in error messages."""

_CSV_SUFFIXES = (".csv", ".csv.gz")
_PARQUET_SUFFIXES = (".parquet", ".pq")


def _kind(path: Path) -> str:
    """``"csv"`` or ``"parquet"`` from the file name; DataFileError for anything else."""
    name = path.name.lower()
    if name.endswith(_CSV_SUFFIXES):
        return "csv"
    if name.endswith(_PARQUET_SUFFIXES):
        return "parquet"
    found = "".join(path.suffixes) or "no suffix"
    raise DataFileError(f"{path}: unsupported file type ({found}); accepted: {ACCEPTED_KINDS}")


def read_table(path: Path | str) -> pd.DataFrame:
    """Read a CSV or Parquet data file with every cell as a string (``""`` = missing).

    The kind is taken from the suffix: ``.csv`` and ``.csv.gz`` are CSV (comma-separated,
    UTF-8, first line the header), ``.parquet`` and ``.pq`` are Parquet. Parquet values are
    turned into the strings a CSV export would hold (null and NaN become ``""``), so that one
    validator serves both formats.

    Raises :class:`~fedgov.errors.DataFileError`, with the path in the message, when the file
    is missing, empty, holds a header but no rows, is not UTF-8 (the message gives the byte
    offset), cannot be parsed (bad quoting, a row with more or fewer fields than the header),
    repeats a column name, or seems to use another delimiter than ``,``.

    Blank lines are skipped, so data row *r* of the result (1-based) is line *r + 1* of a CSV
    file without blank lines or line breaks inside quoted cells.
    """
    p = Path(path)
    kind = _kind(p)
    if not p.exists():
        raise DataFileError(f"{p}: data file not found")
    if not p.is_file():
        raise DataFileError(f"{p}: not a regular file")
    if p.stat().st_size == 0:
        raise DataFileError(f"{p}: empty file (0 bytes)")
    df = _read_csv(p) if kind == "csv" else _read_parquet(p)
    log.debug("read %s: %d rows, %d columns", p, len(df), df.shape[1])
    return df


def _read_csv(p: Path) -> pd.DataFrame:
    raw = p.read_bytes()
    if p.name.lower().endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataFileError(f"{p}: not a valid gzip file ({exc})") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataFileError(
            f"{p}: not UTF-8 text (invalid byte 0x{raw[exc.start]:02x} at byte offset {exc.start}); "
            "export the file as UTF-8 CSV"
        ) from exc
    text = text.removeprefix("\ufeff")  # a byte-order mark, as Excel writes it, is not data
    if not text.strip():
        raise DataFileError(f"{p}: empty file (no header, no data rows)")

    try:
        records = list(csv.reader(io.StringIO(text, newline=""), strict=True))
    except csv.Error as exc:
        raise DataFileError(f"{p}: cannot be parsed as CSV: {exc}") from exc
    # Blank lines (a trailing newline too many) carry no data; every other record must have
    # as many fields as the header, or the export is broken and guessing would hide it.
    records = [r for r in records if r]
    header, rows = records[0], records[1:]
    if len(header) == 1:
        for delim, shown in ((";", "';'"), ("\t", "tab ('\\t')")):
            if delim in header[0]:
                raise DataFileError(
                    f"{p}: found one column; the file seems to use {shown} as delimiter, expected ','"
                )
    seen: set[str] = set()
    for name in header:
        if name in seen:
            raise DataFileError(f"{p}: column '{name}' appears twice in the header")
        seen.add(name)
    if not rows:
        raise DataFileError(f"{p}: header only, no data rows")
    width = len(header)
    for i, row in enumerate(rows, start=1):
        if len(row) != width:
            raise DataFileError(
                f"{p}: cannot be parsed as CSV: data row {i} has {len(row)} field(s), the header has {width}"
            )
    return pd.DataFrame(rows, columns=header, dtype=str)


def _read_parquet(p: Path) -> pd.DataFrame:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(p)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DataFileError(f"{p}: cannot be read as Parquet: {_first_line(exc)}") from exc
    names = table.column_names
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DataFileError(f"{p}: column '{dupes[0]}' appears twice")
    if table.num_rows == 0:
        raise DataFileError(f"{p}: header only, no data rows (the Parquet file holds a schema but no rows)")
    columns: dict[str, pd.Series] = {}
    for name in names:
        arr = table.column(name)
        try:
            if pa.types.is_floating(arr.type):
                # NaN is how pandas writes a missing number; it means "missing", not a value.
                arr = pc.if_else(pc.is_nan(arr), pa.scalar(None, arr.type), arr)
            if pa.types.is_dictionary(arr.type):
                arr = arr.cast(arr.type.value_type)
            text = pc.fill_null(pc.cast(arr, pa.string()), "").to_numpy(zero_copy_only=False)
        except (pa.ArrowException, TypeError) as exc:
            raise DataFileError(
                f"{p}: column '{name}' has Parquet type {arr.type}, which cannot be read as text"
            ) from exc
        columns[name] = pd.Series(text, dtype=str, name=name)
    return pd.DataFrame(columns)


def _first_line(exc: BaseException) -> str:
    msg = str(exc).strip()
    return msg.splitlines()[0] if msg else type(exc).__name__


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and :func:`os.replace`.

    A reader (a node process starting up) sees either the old file or the complete new one,
    never a half-written file, even if the writer is killed; the file and then its directory
    are synced, so a power loss keeps the new file once this returns.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (its entry, not only the file's bytes)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # a file system that cannot sync a directory: the rename stands, only not forced out
    finally:
        os.close(fd)


def write_csv(df: pd.DataFrame, path: Path | str, contract: Contract | None = None) -> None:
    """Write ``df`` as a UTF-8 CSV with a header, missing values as empty cells, atomically.

    With a ``contract``, a typed frame (as :func:`~fedgov.data.validate_frame` returns it) is
    written back as the text a municipality would export: integer columns without a decimal
    point (``39``, not ``39.0``), boolean columns as ``true``/``false``. Reading the file
    back and validating it gives the same typed frame. The index is not written.
    """
    out = df.copy()
    if contract is not None:
        known = set(contract.names())
        for name in out.columns:
            if name not in known:
                continue
            ctype = contract.column(name).type
            if ctype == ColumnType.INTEGER:
                out[name] = pd.to_numeric(out[name]).astype("Int64")
            elif ctype == ColumnType.BOOLEAN:
                x = pd.to_numeric(out[name]).to_numpy(dtype=np.float64, na_value=np.nan)
                text = np.where(x == 1.0, "true", "false").astype(object)
                text[np.isnan(x)] = None
                out[name] = pd.Series(text, index=out.index, dtype="object")
    buf = io.StringIO()
    out.to_csv(buf, index=False, na_rep="", lineterminator="\n")
    atomic_write_bytes(Path(path), buf.getvalue().encode("utf-8"))
    log.debug("wrote %s: %d rows", path, len(df))
