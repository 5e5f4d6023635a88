"""Trainer callbacks shared by the trainers, the CLI and the demo."""

from __future__ import annotations

from transformers import ProgressCallback, Trainer


class LabelledProgressCallback(ProgressCallback):
    """transformers' progress bars with a label: ``NCA training: 25%|...| 1/4`` instead of a bare ``1/4``, and
    ``Evaluating`` on the evaluation bar."""

    def __init__(self, label: str, max_str_len: int = 100):
        super().__init__(max_str_len=max_str_len)
        self.label = label

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        if self.training_bar is not None:
            self.training_bar.set_description(self.label)

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        new_bar = self.prediction_bar is None
        super().on_prediction_step(args, state, control, eval_dataloader=eval_dataloader, **kwargs)
        if new_bar and self.prediction_bar is not None:
            self.prediction_bar.set_description("Evaluating")


def label_progress_bars(trainer: Trainer, label: str) -> None:
    """Replace `trainer`'s progress bars (when it shows them) with labelled ones."""
    if any(isinstance(callback, ProgressCallback) for callback in trainer.callback_handler.callbacks):
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(LabelledProgressCallback(label))
