"""Per-step metrics (JSONL, optionally TensorBoard / W&B) and the progress bar with tokens/s and ETA."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class MetricsLog:
    """`metrics.jsonl` in the stage directory. On resume, lines past the checkpoint are dropped, so the
    file of a resumed run has exactly one line per step, like an uninterrupted run's."""

    def __init__(self, stage_dir: Path, report_to: list[str], *, enabled: bool, start_step: int):
        self.enabled = enabled
        self.path = stage_dir / "metrics.jsonl"
        self._tb = self._wandb = None
        if not enabled:
            return
        kept = []
        if self.path.exists():
            kept = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln)["step"] <= start_step]
        self.path.write_text("".join(ln + "\n" for ln in kept))
        self._file = self.path.open("a")
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(stage_dir / "tensorboard"))
        if "wandb" in report_to:
            import wandb

            self._wandb = wandb.init(project="specialize", name=stage_dir.name, resume="allow", id=stage_dir.name)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        scalars = {k: v for k, v in record.items() if isinstance(v, int | float) and k != "step"}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(f"train/{k}", v, record["step"])
        if self._wandb is not None:
            self._wandb.log(scalars, step=record["step"])

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


class TrainProgress:
    """A rich progress bar: step M/N, loss, tokens/s, elapsed and ETA."""

    def __init__(self, name: str, total: int, start: int, *, enabled: bool):
        self.enabled = enabled
        self._progress = Progress(
            TextColumn(f"[bold]{name}[/bold]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[tps]} tok/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            disable=not enabled,
        )
        self._task = self._progress.add_task(name, total=total, completed=start, loss="-", tps="-")

    def __enter__(self) -> TrainProgress:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(*exc)

    def advance(self, record: dict[str, Any]) -> None:
        self._progress.update(self._task, advance=1, loss=f"{record['loss']:.4f}", tps=f"{record['tokens_per_s']:.0f}")
