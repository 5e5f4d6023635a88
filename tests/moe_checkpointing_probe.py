"""Run under `accelerate launch` (2-process DeepSpeed ZeRO-3) by test_moe_checkpointing.py: one SGD step of a tiny
Mixtral with LoRA plus trainable routers and the router aux loss, with or without gradient checkpointing; each rank
writes what it ran under and the trained weights (gathered in full).

Usage: python tests/moe_checkpointing_probe.py OUT_DIR CHECKPOINTING(on|off) AUX_COEF
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from conftest import cpu_args
from datasets import Dataset
from distributed_probes import ShardProbe, _is_zero3, finish
from safetensors.torch import load_file
from test_moe_checkpointing import router_lora
from test_shared_prompt import kway_rows
from transformers import TrainerCallback

from trl_nca import NCAConfig, NCATrainer
from trl_nca.tiny import build_tiny_model, build_tokenizer


class Record(TrainerCallback):
    def __init__(self, out: Path) -> None:
        self.out = out
        self.aux_losses: list[float] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "aux_loss" in logs:
            self.aux_losses.append(logs["aux_loss"])


def main(out: Path, checkpointing: str, coef: float) -> None:
    torch.set_num_threads(1)
    tokenizer = build_tokenizer()
    args = cpu_args(
        NCAConfig,
        out / "run",
        beta=0.5,
        ddp_backend="gloo",
        use_cpu=False,  # DeepSpeed on CPU: accelerate must not be switched off it (see cpu_zero3.yaml)
        disable_tqdm=True,
        optim="sgd",  # the update is the gradient (Adam's first step would be its sign)
        learning_rate=1.0,
        lr_scheduler_type="constant",
        max_steps=1,
        logging_steps=1,
        router_aux_loss_coef=coef,
        gradient_checkpointing=checkpointing == "on",
        # asked for non-reentrant: TRL forces reentrant for PEFT + ZeRO-3 + checkpointing, the case under test
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    record = Record(out)
    os.environ.setdefault("TRL_NCA_PROBE_DIR", str(out / "shards"))
    trainer = NCATrainer(
        build_tiny_model(tokenizer, "mixtral", seed=0, initializer_range=0.1),
        ref_model=None,
        args=args,
        train_dataset=Dataset.from_list(kway_rows()),
        processing_class=tokenizer,
        peft_config=router_lora(),
        callbacks=[record, ShardProbe()],
    )
    trainer.train()
    rank = trainer.accelerator.process_index
    trained = load_file(str(Path(os.environ["TRL_NCA_PROBE_DIR"]) / f"rank{rank}.safetensors"))
    names = [name for name, param in trainer.model.named_parameters() if param.requires_grad]
    torch.save({name: trained[name] for name in names}, out / f"rank{rank}.pt")
    summary = {
        "world_size": trainer.accelerator.num_processes,
        "zero3": _is_zero3(),
        "use_reentrant": (args.gradient_checkpointing_kwargs or {}).get("use_reentrant"),
        "gradient_checkpointing": args.gradient_checkpointing,
        "aux_losses": record.aux_losses,
    }
    (out / f"rank{rank}.json").write_text(json.dumps(summary))
    finish()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], float(sys.argv[3]))
