"""What rank 0 tells the person watching a run: a tqdm bar on a terminal, plain lines otherwise (Slurm logs).
Every other rank says nothing, so the loop prints through one Progress on every rank without rank checks."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


class Progress:
    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None

    def start(self, total: int, initial: int) -> None:
        """The bar from step `initial` to step `total` (on a terminal only)."""
        if self.enabled and sys.stderr.isatty():
            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def log(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def step_done(self) -> None:
        if self.bar:
            self.bar.update(1)

    def show_training(self, epoch: int, step: int, total: int, values: dict) -> None:
        """At a log point: the loss and accuracy next to the bar, or one log line."""
        loss, acc = values["train/loss"], values["train/acc"]
        if self.bar:
            self.bar.set_postfix(loss=f"{loss:.4f}", acc=f"{acc:.3f}", refresh=False)
        else:
            self.log(f"epoch {epoch + 1} step {step}/{total} | loss {loss:.4f} acc {acc:.4f} | "
                     f"{values['perf/images_per_sec']:.0f} images/s")

    def close(self) -> None:
        if self.bar:
            self.bar.close()
            self.bar = None
