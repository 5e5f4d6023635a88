"""Trainer callbacks shared by the trainers, the CLI and the demo."""

from __future__ import annotations

from tqdm.auto import tqdm
from transformers import ProgressCallback, Trainer
from transformers.trainer_utils import has_length


class LabelledProgressCallback(ProgressCallback):
    """transformers' progress bars with a label: ``NCA training: 25%|...| 1/4`` instead of a bare ``1/4``, and
    ``Evaluating`` on the evaluation bar."""

    def __init__(self, label: str, max_str_len: int = 100):
        super().__init__(max_str_len=max_str_len)
        self.label = label

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


def label_progress_bars(trainer: Trainer, label: str) -> None:
    """Replace `trainer`'s progress bars (when it shows them) with labelled ones."""
    if any(isinstance(callback, ProgressCallback) for callback in trainer.callback_handler.callbacks):
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(LabelledProgressCallback(label))
