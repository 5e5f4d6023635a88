"""Trainer callbacks shared by the trainers, the CLI and the demo."""

from __future__ import annotations

from tqdm.auto import tqdm
from transformers import PrinterCallback, ProgressCallback, Trainer
from transformers.trainer_utils import has_length


class LabelledProgressCallback(ProgressCallback):
    """transformers' progress bars with a label: ``NCA training: 25%|...| 1/4`` instead of a bare ``1/4``, and
    ``Evaluating`` on the evaluation bar. With `print_logs=False` the bar no longer writes each logged metrics dict
    under itself (the metrics stay in `trainer.state.log_history`)."""

    def __init__(self, label: str, max_str_len: int = 100, print_logs: bool = True):
        super().__init__(max_str_len=max_str_len)
        self.label = label
        self.print_logs = print_logs

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.training_bar = tqdm(total=state.max_steps, dynamic_ncols=True, desc=self.label)
        self.current_step = 0

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if state.is_world_process_zero and has_length(eval_dataloader):
            if self.prediction_bar is None:
                self.prediction_bar = tqdm(
                    total=len(eval_dataloader), leave=self.training_bar is None, dynamic_ncols=True, desc="Evaluating"
                )
            self.prediction_bar.update(1)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.print_logs:
            super().on_log(args, state, control, logs=logs, **kwargs)


def label_progress_bars(trainer: Trainer, label: str, print_logs: bool = True) -> None:
    """Replace `trainer`'s progress bars (when it shows them) with labelled ones. `print_logs=False` also stops the
    console dump of every logged metrics dict (under the bar, or by `PrinterCallback` when tqdm is disabled); the
    metrics stay in `trainer.state.log_history`."""
    if not print_logs:
        trainer.remove_callback(PrinterCallback)
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(LabelledProgressCallback(label, print_logs=print_logs))
