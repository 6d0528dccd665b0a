"""A node's data: reading exports, validating them against a contract, encoding, splitting.

* :func:`read_table` reads a CSV or Parquet file as text cells;
* :func:`validate_frame` checks it against a data contract and returns a typed frame;
* :class:`Encoder` turns a typed frame into model inputs with parameters from the contract only;
* :func:`split_federation` and :func:`materialize` build simulated federations of
  municipalities from one data set (or one file per member).

The synthetic iWmo (social support) data set is a module of its own, used as one
(``from fedgov.data import iwmo``; ``iwmo.generate``, ``iwmo.write``): its names are too
general to stand in this package.
"""

from fedgov.data.io import ACCEPTED_KINDS, atomic_write_bytes, read_table, write_csv
from fedgov.data.partition import (
    NodeData,
    materialize,
    population_sizes,
    problem_classes,
    read_manifest,
    split_federation,
    train_test_split,
    write_manifest,
)
from fedgov.data.preprocess import Encoder
from fedgov.data.validate import FALSE_VALUES, TRUE_VALUES, validate_frame

__all__ = [
    "ACCEPTED_KINDS",
    "Encoder",
    "FALSE_VALUES",
    "NodeData",
    "TRUE_VALUES",
    "atomic_write_bytes",
    "materialize",
    "population_sizes",
    "problem_classes",
    "read_manifest",
    "read_table",
    "split_federation",
    "train_test_split",
    "validate_frame",
    "write_csv",
    "write_manifest",
]
