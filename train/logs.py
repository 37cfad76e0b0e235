"""Run logging: tqdm progress bar (loss, lr, tokens/s), a JSONL log, optional TensorBoard.

Only the main process logs. ``train_log.jsonl`` has one object per logged step
(``{"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "epoch", ...}``) and
``{"event": ...}`` lines for evaluations, checkpoints and notes. On resume, lines
after the resumed step are dropped so the log matches the weights.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from fuse.errors import FuseError

LOG_NAME = "train_log.jsonl"


class RunLogger:
    def __init__(self, out_dir: Path, enabled: bool, total_steps: int, start_step: int = 0,
                 tensorboard: bool = False, progress: bool = True):
        self.enabled = enabled
        self.path = out_dir / LOG_NAME
        self.tb = None
        self.bar = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self._truncate(start_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise FuseError("tensorboard: true needs the tensorboard package "
                                "(pip install 'visionfuse-toolkit[tensorboard]')") from None
            self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step or None)
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def _truncate(self, start_step: int) -> None:
        if not self.path.exists():
            return
        if start_step == 0:
            self.path.unlink()
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("step", 0) <= start_step:
                kept.append(line)
        self.path.write_text("".join(k + "\n" for k in kept))

    def write(self, rec: dict[str, Any]) -> None:
        if not self.enabled:
            return
        rec = {**rec, "time": round(time.time(), 3)}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(rec) + "\n")

    def step(self, step: int, metrics: dict[str, Any], log: bool = True) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                                 tok_s=f"{metrics.get('tokens_per_s', 0):.0f}", refresh=False)
        if not log:
            return
        self.write({"step": step, **metrics})
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, step)

    def event(self, step: int, name: str, **data: Any) -> None:
        if not self.enabled:
            return
        self.write({"step": step, "event": name, **data})
        if self.tb is not None and name == "eval" and "loss" in data:
            self.tb.add_scalar("eval/loss", data["loss"], step)
        if self.bar is not None and name in ("eval", "note"):
            self.bar.write(f"step {step}: {name} " + " ".join(f"{k}={v}" for k, v in data.items()))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """All records of a ``train_log.jsonl``."""
    p = Path(path)
    p = p / LOG_NAME if p.is_dir() else p
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


__all__ = ["LOG_NAME", "RunLogger", "read_log"]
