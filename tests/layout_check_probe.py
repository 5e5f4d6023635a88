"""Run under `accelerate launch` by test_layout_check.py: 2 training steps of a model that ignores `position_ids` on
the rank named by $TRL_NCA_BLIND_RANK only (policy and reference); each rank writes the layout it ended with.

Usage: python tests/layout_check_probe.py OUT_DIR
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from conftest import cpu_args
from datasets import Dataset
from distributed_probes import finish
from layout_models import position_blind_llama
from test_shared_prompt import kway_rows

from trl_nca import NCAConfig, NCATrainer
from trl_nca.tiny import build_tokenizer


def main(out: Path) -> None:
    torch.set_num_threads(1)
    tokenizer = build_tokenizer()
    args = cpu_args(
        NCAConfig, out, beta=0.5, ddp_backend="gloo" if "WORLD_SIZE" in os.environ else None, disable_tqdm=True
    )
    trainer = NCATrainer(
        position_blind_llama(len(tokenizer)),
        ref_model=position_blind_llama(len(tokenizer), seed=1),
        args=args,
        train_dataset=Dataset.from_list(kway_rows()),
        processing_class=tokenizer,
    )
    trainer.train()
    record = {
        "world_size": trainer.accelerator.num_processes,
        "layout": [trainer.data_collator.layout, trainer.data_collator.padding_free],
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{trainer.accelerator.process_index}.json").write_text(json.dumps(record))
    finish()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
