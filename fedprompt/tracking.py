"""Experiment trackers: a run's metrics rows, resolved config and results, sent where people
watch and compare runs. `output.trackers` picks any of TRACKERS:

- `tensorboard`: event files in <run>/tensorboard (tensorboardX writes them: no torch, no
  TensorFlow); watch with `tensorboard --logdir <run>/tensorboard`.
- `mlflow`: a run in experiment `output.experiment` of MLFLOW_TRACKING_URI when set, else of a
  local file store in <run>/mlruns (fedprompt installs the MLflow client, mlflow-skinny; to
  browse, `pip install mlflow` and `mlflow ui --backend-store-uri <run>/mlruns`).

Each metrics row is logged at its step (a federated round's number, a training step) with its
numeric fields; the resolved config as parameters; at the end, summary.json, metrics.jsonl,
curves.png and the adapter as artifacts. A tracker that cannot start or log is one warning
line, then it is off: the run itself never fails for it.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Protocol

from fedprompt.config import Config


def numbers(row: dict) -> dict[str, float]:
    """The row's finite scalar numbers (bools as 0/1); dicts, strings and None are left out."""
    return {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def flat_config(cfg: Config) -> dict[str, str]:
    """`section.key` -> value text, as MLflow params and a TensorBoard text want them."""
    return {f"{s}.{k}": str(v) for s, d in cfg.to_dict().items() for k, v in d.items()}


class Tracker(Protocol):
    def row(self, step: int, metrics: dict[str, float]) -> None: ...
    def finish(self, out: Path, ok: bool) -> None: ...


class TensorBoard:
    def __init__(self, cfg: Config, out: Path, name: str):
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(logdir=str(out / "tensorboard"), flush_secs=5)
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in flat_config(cfg).items()), 0)

    def row(self, step: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()  # so that a live TensorBoard shows the round now

    def finish(self, out: Path, ok: bool) -> None:
        self.writer.close()


class MLflow:
    ARTIFACTS = ("summary.json", "metrics.jsonl", "curves.png", "config.yaml")

    def __init__(self, cfg: Config, out: Path, name: str):
        # An unreachable server is one warning, not minutes of retries (MLflow's defaults).
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        # The local store is MLflow's file store (no database needed; MLflow 3 keeps it working
        # in "maintenance mode" behind this switch). Point MLFLOW_TRACKING_URI at a tracking
        # server or a database for MLflow's newest features.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or (out / "mlruns").resolve().as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(cfg.output.experiment)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(cfg.output.experiment)
        self.run_id = self.client.create_run(exp_id, run_name=name).info.run_id
        from mlflow.entities import Param

        params = [Param(k, v[:6000]) for k, v in flat_config(cfg).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def row(self, step: int, metrics: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def finish(self, out: Path, ok: bool) -> None:
        for name in self.ARTIFACTS:
            if (out / name).is_file():
                self.client.log_artifact(self.run_id, str(out / name))
        if (out / "adapter").is_dir():
            self.client.log_artifacts(self.run_id, str(out / "adapter"), artifact_path="adapter")
        self.client.set_terminated(self.run_id, status="FINISHED" if ok else "FAILED")


TRACKERS: dict[str, type] = {"tensorboard": TensorBoard, "mlflow": MLflow}


class Trackers:
    """The run's trackers; each failure is one warning line and turns that tracker off."""

    def __init__(self, cfg: Config, out: Path, name: str):
        self.out, self.live = Path(out), {}
        for key in cfg.output.trackers:
            self._try(key, lambda k=key: self.live.__setitem__(k, TRACKERS[k](cfg, self.out, name)), "cannot start")

    def _try(self, key: str, action, what: str) -> None:
        try:
            action()
        except Exception as e:  # noqa: BLE001  (a tracker must never fail the run)
            self.live.pop(key, None)
            reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            print(f"fedprompt: warning: tracker {key} {what} ({type(e).__name__}: {reason}); the run goes on without it", file=sys.stderr, flush=True)

    def row(self, row: dict, step_key: str) -> None:
        """Log one metrics row at row[step_key]."""
        metrics = numbers({k: v for k, v in row.items() if k != step_key})
        for key, tracker in list(self.live.items()):
            self._try(key, lambda t=tracker: t.row(int(row[step_key]), metrics), "failed to log")

    def finish(self, ok: bool = True) -> None:
        for key, tracker in list(self.live.items()):
            self._try(key, lambda t=tracker: t.finish(self.out, ok), "failed to finish")
        self.live = {}
