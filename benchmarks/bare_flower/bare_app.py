"""A minimal plain Flower app: FedAvg over nodes that train with Opacus' DP-SGD.

The baseline of ``benchmarks/bench_overhead.py``: the same task as fedgov's demo (model, data
split, encoding, DP-SGD with the same batch size, clip, epsilon and delta, FedAvg, evaluation on
the nodes and centrally) written as a team would with Flower's Message API and Opacus alone,
and nothing else: no contracts, policies, admission, ledger, audit log, screening, checkpoints
or report. Each node's data arrives pre-encoded as ``node-<partition-id>.npz`` in
``data-dir`` (written by the benchmark with fedgov's encoder, outside the timed rounds).

The ServerApp writes the wall-clock time at the end of every round, and the accuracies, to
``out-file``. Nothing here imports fedgov.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from torch import nn

client = ClientApp()
server = ServerApp()

_DATA: dict[tuple[str, int], dict[str, np.ndarray]] = {}


def _model(n_features: int, hidden: str, seed: int) -> nn.Module:
    widths = [int(h) for h in hidden.split(",") if h.strip()]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        width = n_features
        for h in widths:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, 2))
        return nn.Sequential(*layers).float()


class _Rows(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """In-memory rows fetched a batch at a time (``__getitems__``), as fedgov's trainer does: a
    ``TensorDataset`` fetches and stacks row by row, which would make this baseline slower for a
    reason that has nothing to do with the framework."""

    def __init__(self, X: torch.Tensor, y: torch.Tensor) -> None:
        self.X, self.y = X, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.X[i], self.y[i]

    def __getitems__(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.as_tensor(idx, dtype=torch.long)
        return self.X[t], self.y[t]


def _data(cfg: Any, pid: int) -> dict[str, np.ndarray]:
    key = (str(cfg["data-dir"]), pid)
    if key not in _DATA:
        with np.load(Path(key[0]) / f"node-{pid}.npz") as f:
            _DATA[key] = {k: f[k] for k in f.files}
    return _DATA[key]


@client.train()
def train(msg: Message, context: Context) -> Message:
    from opacus import PrivacyEngine
    from opacus.accountants.utils import get_noise_multiplier

    cfg = context.run_config
    pid = int(context.node_config["partition-id"])
    d = _data(cfg, pid)
    X, y = torch.as_tensor(d["X_train"]), torch.as_tensor(d["y_train"])
    model = _model(X.shape[1], str(cfg["hidden"]), int(cfg["seed"]))
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    loader = torch.utils.data.DataLoader(_Rows(X, y), batch_size=min(int(cfg["batch-size"]), len(y)), collate_fn=lambda b: b)
    rounds, delta = int(cfg["rounds"]), float(cfg["delta"])
    # The node's noise multiplier (calibrated once) and its accountant's history live in the
    # node's Flower state, which persists across rounds (a fresh accountant would report one
    # round's epsilon only).
    dp = json.loads(str(context.state["dp"]["json"])) if "dp" in context.state else None
    if dp is None:
        dp = {"sigma": get_noise_multiplier(
            target_epsilon=float(cfg["target-epsilon"]), target_delta=delta, sample_rate=1 / max(2, len(loader)),
            epochs=rounds, accountant="prv",
        ), "history": []}
    sigma = float(dp["sigma"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = PrivacyEngine(accountant="prv")
    engine.accountant.history = [tuple(h) for h in dp["history"]]
    dp_model, optimizer, dp_loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=float(cfg["learning-rate"])),
        data_loader=loader, noise_multiplier=sigma, max_grad_norm=float(cfg["max-grad-norm"]),
        grad_sample_mode=str(cfg["grad-sample-mode"]),
    )
    criterion = nn.CrossEntropyLoss()
    losses = []
    for xb, yb in dp_loader:
        optimizer.zero_grad()
        loss = criterion(dp_model(xb), yb)
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    dp["history"] = [list(h) for h in engine.accountant.history]
    context.state["dp"] = ConfigRecord({"json": json.dumps(dp)})
    # Flower's Opacus example reports epsilon every round; with report-epsilon = false the
    # baseline skips it (a lower bound: no accounting at all).
    epsilon = engine.accountant.get_epsilon(delta) if bool(cfg["report-epsilon"]) else float("nan")
    state = {k.removeprefix("_module."): v for k, v in dp_model.state_dict().items()}
    metrics = MetricRecord({"num-examples": len(y), "train-loss": float(np.mean(losses)) if losses else 0.0, "epsilon": epsilon})
    return Message(RecordDict({"arrays": ArrayRecord(state), "metrics": metrics}), reply_to=msg)


@client.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg = context.run_config
    d = _data(cfg, int(context.node_config["partition-id"]))
    X, y = torch.as_tensor(d["X_test"]), torch.as_tensor(d["y_test"])
    model = _model(X.shape[1], str(cfg["hidden"]), int(cfg["seed"]))
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    with torch.no_grad():
        acc = float((model(X).argmax(1) == y).float().mean()) if len(y) else 0.0
    return Message(RecordDict({"metrics": MetricRecord({"num-examples": len(y), "accuracy": acc})}), reply_to=msg)


@server.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    with np.load(Path(str(cfg["data-dir"])) / "central.npz") as f:
        Xc, yc = torch.as_tensor(f["X"]), torch.as_tensor(f["y"])
    model = _model(Xc.shape[1], str(cfg["hidden"]), int(cfg["seed"]))
    ends: list[float] = []
    accuracy: list[float] = []

    def central(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        with torch.no_grad():
            acc = float((model(Xc).argmax(1) == yc).float().mean())
        ends.append(time.time())
        accuracy.append(acc)
        return MetricRecord({"accuracy": acc})

    n = len(list(grid.get_node_ids()))
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_available_nodes=n, min_train_nodes=n, min_evaluate_nodes=n)
    strategy.start(
        grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=int(cfg["rounds"]), evaluate_fn=central,
    )
    # ends[0] is the initial model's evaluation; round r ends at ends[r].
    Path(str(cfg["out-file"])).write_text(json.dumps({
        "round_seconds": [b - a for a, b in zip(ends, ends[1:], strict=False)],
        "accuracy": accuracy,
    }))
