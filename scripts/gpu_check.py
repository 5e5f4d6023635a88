#!/usr/bin/env python
"""The first GPU session's checks: what a CPU cannot run, in one script of at most 8 minutes that writes one JSON.

Each check records `status` ("ok", "failed: <one line>" or "skipped: <why>"), its `numbers` (also when it failed), its
`seconds` and `process_s` (its process, start-up included); one check failing or crashing never stops the others. On
a CPU the CUDA-only checks are skipped and say why; `moe_aux` runs everywhere. The checks (`--only` picks some):

- `flex`: `NCATrainer`, shared-prompt layout under `attn_implementation="flex_attention"` (unpacked, and packed with
  `padding_free=True`), trained through `scripts/benchmark.py`'s `run_layout` (same rows, same init, bf16, the
  `cpu` benchmark model of 21M parameters): without gradient checkpointing and with it (`use_reentrant` True and
  False). Every step's loss must be finite and equal to the padded sdpa layout's on the same batch, its gradient norm
  too (bf16 tolerance: loss within 0.02 + 2%, gradient norm within 5%), and the layout must stay the shared prompt.
  Records the dynamo graphs each run compiled (`torch._dynamo` counters: 1 + recompiles of transformers' compiled
  flex_attention) and the step times.
- `fa2`: the FlashAttention-2 fallback. `kway_layout="auto"` under `flash_attention_2` must pick the padded layout
  packed (`padding_free=True`); its per-response log-probs must equal the padded sdpa layout's on the same batch and
  weights within the trainer's own bf16 tolerance (`trl_nca.layout.logps_tolerance`), then a few training steps must
  give finite losses in that layout. Skipped where transformers' `is_flash_attn_2_available()` is False.
- `qlora`: one bf16 QLoRA training step as `trl-nca train` runs it with `load_in_4bit`: a tiny Mistral built from a
  config and saved to a temporary folder, loaded by `NCATrainer` from that path with TRL's
  `get_quantization_config` / `get_peft_config` (nf4, nested quantization, LoRA on every linear layer, gradient
  checkpointing without reentrance). The loss must be finite, the layers 4-bit and every `lora_B` changed. Skipped on
  a CPU with AVX512-BF16: there bitsandbytes repacks a 4-bit layer for inference at its first eval-mode forward and no
  gradient flows through it afterwards (measured here with bitsandbytes 0.50.2: only the `lora_B` of `o_proj` and
  `down_proj` changed).
- `moe_aux`: a tiny Mixtral with PEFT LoRA as `recipes/mixtral-8x7b/nca_reward_lora.yaml` sets it (attention LoRA,
  LoRA on the expert parameters, the router (`gate`) trained in full), `NCATrainer` with `router_aux_loss_coef=0.02`:
  the gradient of one step's loss with respect to the router weights under gradient checkpointing (`use_reentrant`
  True and False) must equal the one without checkpointing (relative difference <= 1e-4; fp32).
- `vllm`: the vLLM pool path of `trl-nca generate` (`trl_nca.scripts.generate.main`, backend `vllm`): two tiny models
  sampled one after the other, then scored by a tiny reward model. The run must succeed and, on CUDA, the GPU memory
  the first model's engine took must be free again before the second loads (free memory before each load, within
  2 GiB). Skipped where `import vllm` fails.

Each check runs in its own process (so a crash, a hung kernel or the memory one leaves behind stays its own), with a
time limit (`TIME_LIMITS_S`, 450 s in all): asked to stop 15 s before it (it then records what it measured so far),
killed at it. `--in-process` runs them in this process, without limits (tests). The script exits 1 when a check
failed, after writing the JSON (default `gpu_check.json`).

    python scripts/gpu_check.py --json gpu_check.json
    python scripts/gpu_check.py --only moe_aux flex --json gpu_check.json
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple


def _load_benchmark():
    """scripts/benchmark.py (beside this file) as a module; it also sets the offline environment variables."""
    if "benchmark" in sys.modules and hasattr(sys.modules["benchmark"], "run_layout"):
        return sys.modules["benchmark"]
    spec = importlib.util.spec_from_file_location("benchmark", Path(__file__).resolve().with_name("benchmark.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["benchmark"] = module
    spec.loader.exec_module(module)
    return module


benchmark = _load_benchmark()

import torch  # noqa: E402
from accelerate.utils.memory import clear_device_cache  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import PrinterCallback, TrainerCallback  # noqa: E402

from trl_nca import DataCollatorForKWayReward, NCAConfig, NCATrainer  # noqa: E402
from trl_nca.layout import largest_excess  # noqa: E402
from trl_nca.tiny import build_tiny_model, build_tokenizer, save_tiny, save_tiny_assets  # noqa: E402

CHECKS = ("flex", "fa2", "qlora", "moe_aux", "vllm")
# Seconds each check's process may run, its start-up included: 450 s in all, so a run ends within 8 minutes.
TIME_LIMITS_S = {"flex": 160, "fa2": 45, "qlora": 55, "moe_aux": 40, "vllm": 150}
# Before its limit a check is asked to stop (SIGTERM: it records what it has measured so far), then killed.
STOP_GRACE_S = 15
# (absolute, relative) tolerance of a step's loss and relative tolerance of its gradient norm against the padded sdpa
# layout's, by training dtype.
LOSS_TOLERANCE = {"bf16": (0.02, 0.02), "fp32": (1e-5, 1e-4)}
GRAD_NORM_RTOL = {"bf16": 0.05, "fp32": 1e-4}
ROUTER_GRAD_RTOL = 1e-4
MEMORY_SLACK_GIB = 2.0


class Skip(Exception):
    """The check cannot run here (the reason is its message)."""


class CheckFailed(Exception):
    """The check ran and found a problem (one line)."""


class CheckTimeout(BaseException):
    """The check's time is up (raised by SIGTERM in a check's process; not caught by a check's `except Exception`)."""


def _stop(signum, frame):
    raise CheckTimeout("the check ran past its time limit; what it measured until then is in its numbers")


class Settings(NamedTuple):
    """What the checks run on. The command line sets the GPU values; tests run the checks' code on a CPU by naming
    CPU-capable layouts, attention and backend (sdpa / eager / transformers) instead of flex, FA2 and vLLM."""

    device: str = "cuda"
    dtype: str = "bf16"  # training dtype of flex and fa2 (moe_aux runs in fp32, qlora computes in bf16)
    model_size: str = "cpu"  # `benchmark.MODEL_SIZES` entry of the flex and fa2 models
    length_scale: float = 0.5  # of the benchmark's CPU-scale ultrafeedback mix (prompt median 50, response 125)
    prompts_per_step: int = 2
    steps: int = 3
    flex_layouts: tuple[str, str] = ("shared_prompt_flex", "shared_prompt_packed_flex")
    fa2_attn: str = "flash_attention_2"
    vllm_backend: str = "vllm"
    workdir: str = ""


def settings_for(device: str, workdir: str) -> Settings:
    """The command line's settings on `device`: bf16 and the benchmark's `cpu` model on CUDA, fp32 and `micro` on a
    CPU (where flex and fa2 are skipped anyway)."""
    if device == "cuda":
        return Settings(device=device, workdir=workdir)
    return Settings(device=device, dtype="fp32", model_size="micro", length_scale=0.06, workdir=workdir)


# ---------------------------------------------------------------------------------------------------------- helpers
def token_rows(settings: Settings, n_prompts: int, vocab_size: int, length_scale: float | None = None) -> list[dict]:
    """`n_prompts` K = 4 reward rows of random token ids with the benchmark's ultrafeedback length mix."""
    mix = benchmark.mix_settings("ultrafeedback", "cpu", length_scale or settings.length_scale)
    return benchmark.sample_rows(n_prompts, vocab_size=vocab_size, min_length=2, seed=0, **mix)


def trainer_args(settings: Settings, name: str, **overrides) -> NCAConfig:
    """An `NCAConfig` for a few logged steps on token rows, on the settings' device and dtype."""
    values = dict(
        output_dir=os.path.join(settings.workdir, name),
        bf16=settings.dtype == "bf16",
        use_cpu=settings.device == "cpu",
        report_to="none",
        save_strategy="no",
        per_device_train_batch_size=settings.prompts_per_step,
        max_steps=settings.steps,
        logging_steps=1,
        learning_rate=1e-6,
        beta=0.1,
        max_length=None,
        train_sampling_strategy="sequential",
        gradient_checkpointing=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    values.update(overrides)
    return NCAConfig(**values)


def quiet(trainer):
    """`trainer` without the per-step log dicts on stdout (they stay in `trainer.state.log_history`)."""
    trainer.remove_callback(PrinterCallback)
    return trainer


def logged(trainer) -> dict[str, list[float]]:
    """Every logged step's loss and gradient norm."""
    logs = [log for log in trainer.state.log_history if "loss" in log]
    return {"losses": [log["loss"] for log in logs], "grad_norms": [log.get("grad_norm") for log in logs]}


def all_finite(values: Sequence[float | None]) -> bool:
    return bool(values) and all(v is not None and math.isfinite(v) for v in values)


def dynamo_graphs() -> int:
    """Graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class GradCapture(TrainerCallback):
    """Copies the gradients of the trainable parameters whose name `select`s, right before each optimizer step."""

    def __init__(self, select: Callable[[str], bool]):
        self.select = select
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append(
            {
                name: param.grad.detach().float().cpu().clone()
                for name, param in model.named_parameters()
                if param.requires_grad and param.grad is not None and self.select(name)
            }
        )


def relative_difference(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """||grads - reference|| / ||reference|| over the parameters of `reference` (inf when one is missing)."""
    if not reference or grads.keys() != reference.keys():
        return math.inf
    difference = torch.cat([(grads[name] - ref).flatten() for name, ref in reference.items()]).norm()
    norm = torch.cat([ref.flatten() for ref in reference.values()]).norm()
    return float(difference / norm) if norm > 0 else float(difference)


# ---------------------------------------------------------------------------------------------------------- checks
def check_flex(settings: Settings, numbers: dict[str, Any]) -> None:
    """Shared prompt under flex_attention, with and without gradient checkpointing, against padded sdpa."""
    flex, packed = settings.flex_layouts
    for layout in settings.flex_layouts:
        reason = benchmark.unavailable_reason(layout, settings.device, settings.dtype)
        if reason:
            raise Skip(reason)
    size = benchmark.MODEL_SIZES[settings.model_size]
    rows = token_rows(settings, (1 + settings.steps) * settings.prompts_per_step, size["vocab_size"])
    base = dict(
        model_size=settings.model_size,
        attn="sdpa",
        dtype=settings.dtype,
        device=settings.device,
        prompts_per_step=settings.prompts_per_step,
        steps=settings.steps,
        warmup=1,
        threads=None,
        logging_steps=1,
    )
    reentrant = {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": True}}
    non_reentrant = {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}}
    variants = {
        "padded_sdpa": ("padded", {}),
        flex: (flex, {}),
        f"{flex}+gc_reentrant": (flex, reentrant),
        f"{flex}+gc_non_reentrant": (flex, non_reentrant),
        packed: (packed, {}),
    }
    numbers["model_size"], numbers["dtype"] = settings.model_size, settings.dtype
    runs: dict[str, dict[str, Any]] = {}
    numbers["runs"] = runs  # filled as the variants finish (a check stopped at its time limit keeps them)
    for name, (layout, extra) in variants.items():
        graphs, start = dynamo_graphs(), time.perf_counter()
        output_dir = os.path.join(settings.workdir, name)
        try:
            part = benchmark.run_layout(layout, rows, {**base, **extra, "output_dir": output_dir})
        except Exception as error:  # recorded; the other variants still run
            traceback.print_exc()
            runs[name] = {"error": benchmark.error_line(error)}
        else:
            runs[name] = {
                "losses": [log["loss"] for log in part["logged"]],
                "grad_norms": [log.get("grad_norm") for log in part["logged"]],
                "step_s": part["step_s"],
                "trained_layout": part["trained_layout"],
                "attn_implementation": part["attn_implementation"],
            }
        runs[name]["dynamo_graphs"] = dynamo_graphs() - graphs
        runs[name]["seconds"] = time.perf_counter() - start
        clear_device_cache(garbage_collection=True)
    baseline = runs["padded_sdpa"]
    if "error" in baseline:
        raise CheckFailed(f"the padded sdpa baseline failed: {baseline['error']}")
    if not (all_finite(baseline["losses"]) and all_finite(baseline["grad_norms"])):
        raise CheckFailed("the padded sdpa baseline's loss or gradient norm is not finite")
    atol, rtol = LOSS_TOLERANCE[settings.dtype]
    problems = []
    for name, (layout, _) in list(variants.items())[1:]:
        run = runs[name]
        if "error" in run:
            problems.append(f"{name}: {run['error']}")
            continue
        expected = ["shared_prompt", layout == packed]
        if not (all_finite(run["losses"]) and all_finite(run["grad_norms"])):
            problems.append(f"{name}: a loss or gradient norm is not finite")
            continue
        if len(run["losses"]) != len(baseline["losses"]):
            problems.append(f"{name}: {len(run['losses'])} logged steps, the baseline {len(baseline['losses'])}")
            continue
        pairs = list(zip(run["losses"], baseline["losses"]))
        loss_diff = max(abs(a - b) for a, b in pairs)
        loss_bound = max(atol + rtol * abs(b) for _, b in pairs)
        norm_diff = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(run["grad_norms"], baseline["grad_norms"]))
        run.update(max_loss_diff=loss_diff, max_grad_norm_rel_diff=norm_diff)
        if loss_diff > loss_bound:
            problems.append(f"{name}: loss differs from padded sdpa by {loss_diff:.3g} (tolerance {loss_bound:.3g})")
        elif norm_diff > GRAD_NORM_RTOL[settings.dtype]:
            problems.append(f"{name}: gradient norm differs from padded sdpa by {100 * norm_diff:.2f}%")
        elif run["trained_layout"] != expected:
            problems.append(f"{name}: trained in {run['trained_layout']}, not {expected}")
    if problems:
        raise CheckFailed("; ".join(problems))


def check_fa2(settings: Settings, numbers: dict[str, Any]) -> None:
    """The FlashAttention-2 fallback: padded + padding_free under FA2 against padded sdpa log-probs, then training."""
    attn = settings.fa2_attn
    if attn == "flash_attention_2":
        reason = benchmark.unavailable_reason("padded_padding_free_flash", settings.device, settings.dtype)
        if reason:
            raise Skip(reason)
    bf16 = settings.dtype == "bf16"
    tokenizer = build_tokenizer()
    size = benchmark.MODEL_SIZES[settings.model_size]
    rows = token_rows(settings, settings.steps * settings.prompts_per_step, size["vocab_size"])

    def model(attn_implementation: str):
        built = build_tiny_model(tokenizer, "mistral", attn_implementation=attn_implementation, seed=0, **size)
        return built.to(torch.bfloat16) if bf16 else built

    trainer = NCATrainer(
        model(attn),
        ref_model=model("sdpa"),  # the same weights under sdpa
        args=trainer_args(settings, "fa2"),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    quiet(trainer)
    collator = trainer.data_collator
    chosen = [collator.layout, collator.padding_free]
    numbers.update(model_size=settings.model_size, dtype=settings.dtype, attn_implementation=attn, layout=chosen)
    examples = rows[: settings.prompts_per_step]

    def response_logps(model, padding_free: bool) -> torch.Tensor:
        batch = DataCollatorForKWayReward(pad_token_id=collator.pad_token_id, padding_free=padding_free)(examples)
        return trainer.compute_ref_log_probs(model, trainer._prepare_inputs(batch)).float().cpu()

    candidate = response_logps(trainer.model, padding_free=True)  # padded layout packed, under `attn`
    reference = response_logps(trainer.ref_model, padding_free=False)  # padded rows, sdpa
    n_tokens = torch.tensor([[len(c) for c in row["completion_ids"]] for row in examples])
    difference, excess = largest_excess(candidate, reference, n_tokens, torch.ones_like(n_tokens, dtype=bool), bf16)
    numbers.update(logps_max_abs_diff=difference, logps_excess_over_tolerance=excess)
    start = time.perf_counter()
    trainer.train()
    numbers.update(logged(trainer), train_s=time.perf_counter() - start)
    numbers["trained_layout"] = [collator.layout, collator.padding_free]
    problems = []
    if attn == "flash_attention_2" and chosen != ["padded", True]:
        problems.append(f"kway_layout='auto' under flash_attention_2 chose {chosen}, not the packed padded layout")
    if excess > 0:
        problems.append(f"log-probs differ from padded sdpa by {difference:.3g} nats ({excess:.3g} over tolerance)")
    if not all_finite(numbers["losses"]):
        problems.append(f"losses not finite: {numbers['losses']}")
    if numbers["trained_layout"] != chosen:
        problems.append(f"the layout fell back to {numbers['trained_layout']} in training")
    if problems:
        raise CheckFailed("; ".join(problems))


def check_qlora(settings: Settings, numbers: dict[str, Any]) -> None:
    """One bf16 QLoRA step through `NCATrainer` with a 4-bit model loaded from a path, as `trl-nca train` does."""
    for package in ("bitsandbytes", "peft"):
        if importlib.util.find_spec(package) is None:
            raise Skip(f"{package} is not installed")
    if settings.device == "cpu":
        from bitsandbytes.nn import modules as bnb_modules

        if getattr(bnb_modules, "has_avx512bf16", lambda: False)():
            raise Skip(
                "on a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit layer for inference at its first eval-mode "
                "forward (the trainer's first-batch layout check) and no gradient flows through it afterwards; "
                "QLoRA is checked on CUDA"
            )
    import bitsandbytes as bnb
    from trl import ModelConfig, get_peft_config, get_quantization_config

    tokenizer = build_tokenizer()
    path = save_tiny(os.path.join(settings.workdir, "qlora-model"), "mistral")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model_args = ModelConfig(
        model_name_or_path=path,
        dtype="bfloat16",
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        use_bnb_nested_quant=True,
        use_peft=True,
        lora_r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        lora_target_modules=targets,
    )
    args = trainer_args(
        settings,
        "qlora",
        bf16=True,
        max_steps=1,
        learning_rate=1e-3,
        model_init_kwargs={"dtype": "bfloat16"},
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    trainer = NCATrainer(
        path,
        args=args,
        train_dataset=Dataset.from_list(token_rows(settings, 2, len(tokenizer), length_scale=0.1)),
        processing_class=tokenizer,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    quiet(trainer)
    model = trainer.model
    four_bit = sum(isinstance(module, bnb.nn.Linear4bit) for module in model.modules())
    before = {name: p.detach().float().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    after = {name: p.detach().float().cpu() for name, p in model.named_parameters() if p.requires_grad}
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    lora_b = [name for name in before if "lora_B" in name]
    numbers.update(
        logged(trainer),
        linear4bit_modules=four_bit,
        trainable_tensors=len(before),
        changed_tensors=len(changed),
        lora_b_changed=sum(name in changed for name in lora_b),
        lora_b_tensors=len(lora_b),
        max_abs_change=max((float((after[n] - before[n]).abs().max()) for n in changed), default=0.0),
        layout=[trainer.data_collator.layout, trainer.data_collator.padding_free],
    )
    problems = []
    if four_bit == 0:
        problems.append("no 4-bit (bitsandbytes Linear4bit) layer in the model")
    if not all_finite(numbers["losses"]):
        problems.append(f"loss not finite: {numbers['losses']}")
    if not lora_b or numbers["lora_b_changed"] != len(lora_b):
        problems.append(f"{numbers['lora_b_changed']} of {len(lora_b)} lora_B weights changed")
    if problems:
        raise CheckFailed("; ".join(problems))


def check_moe_aux(settings: Settings, numbers: dict[str, Any]) -> None:
    """Router gradient of the loss (router aux loss on) with gradient checkpointing equals the one without."""
    if importlib.util.find_spec("peft") is None:
        raise Skip("peft is not installed")
    from peft import LoraConfig

    tokenizer = build_tokenizer()
    rows = token_rows(settings, 2, len(tokenizer), length_scale=0.06)
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        modules_to_save=["gate"],
        task_type="CAUSAL_LM",
    )
    modes = {"no_checkpointing": None, "gc_reentrant": True, "gc_non_reentrant": False}
    grads: dict[str, dict[str, torch.Tensor]] = {}
    for name, reentrant in modes.items():
        args = trainer_args(
            settings,
            f"moe-{name}",
            bf16=False,
            max_steps=1,
            max_grad_norm=0.0,  # the gradients as computed, not clipped
            router_aux_loss_coef=0.02,
            gradient_checkpointing=reentrant is not None,
            gradient_checkpointing_kwargs=None if reentrant is None else {"use_reentrant": reentrant},
        )
        trainer = NCATrainer(
            build_tiny_model(tokenizer, "mixtral", seed=0),
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            peft_config=lora,
        )
        quiet(trainer)
        capture = GradCapture(lambda param: ".mlp.gate." in param)
        trainer.add_callback(capture)
        trainer.train()
        aux = [log["aux_loss"] for log in trainer.state.log_history if "aux_loss" in log]
        grads[name] = capture.grads[0] if capture.grads else {}
        norm = torch.cat([g.flatten() for g in grads[name].values()]).norm() if grads[name] else torch.tensor(0.0)
        numbers[name] = {
            "loss": logged(trainer)["losses"],
            "aux_loss": aux,
            "router_grad_norm": float(norm),
            "router_tensors": len(grads[name]),
            "layout": [trainer.data_collator.layout, trainer.data_collator.padding_free],
        }
        clear_device_cache(garbage_collection=True)
    problems = []
    if not grads["no_checkpointing"]:
        raise CheckFailed("no router (gate) parameter received a gradient without checkpointing")
    for name in ("gc_reentrant", "gc_non_reentrant"):
        difference = relative_difference(grads[name], grads["no_checkpointing"])
        numbers[name]["router_grad_rel_diff"] = difference
        if not difference <= ROUTER_GRAD_RTOL:
            problems.append(f"{name}: router gradient differs from the one without checkpointing by {difference:.3g}")
    if problems:
        raise CheckFailed("; ".join(problems) + " (relative)")


def check_vllm(settings: Settings, numbers: dict[str, Any]) -> None:
    """`trl-nca generate` with a pool of two models, backend vLLM, and the GPU memory between the two."""
    import trl_nca.reward_data as reward_data
    from trl_nca.scripts import generate

    if settings.vllm_backend == "vllm":
        try:
            import vllm
        except ImportError as error:
            raise Skip(f"vllm is not importable ({benchmark.error_line(error)})") from None
        numbers["vllm"] = getattr(vllm, "__version__", None)
    root = Path(settings.workdir) / "vllm"
    assets = save_tiny_assets(str(root / "assets"))
    # head_dim 64 (hidden 128, 2 heads): a size every vLLM attention backend takes
    shape = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    pool = [save_tiny(str(root / f"model_{i}"), "mistral", seed=i, **shape) for i in range(2)]
    cuda = settings.device == "cuda"
    free_gib: dict[str, float] = {}

    def free_now(label: str) -> None:
        if cuda:
            free_gib[label] = torch.cuda.mem_get_info()[0] / 2**30

    original = reward_data.load_sampler

    def load_sampler(config, model_index, name, state):
        free_now(f"before_model_{model_index}")
        return original(config, model_index, name, state)

    argv = ["--model_name_or_path", *pool, "--model_names", "model_0", "model_1"]
    argv += ["--backend", settings.vllm_backend, "--dataset_name", assets["prompts"]]
    argv += ["--reward_funcs", assets["reward_model"], "--num_completions", "4", "--max_new_tokens", "16"]
    argv += ["--dtype", "bfloat16" if cuda else "float32", "--vllm_gpu_memory_utilization", "0.3"]
    argv += ["--output_dir", str(root / "out")]
    free_now("start")
    reward_data.load_sampler = load_sampler
    try:
        status = generate.main(argv)
    finally:
        reward_data.load_sampler = original
    clear_device_cache(garbage_collection=True)
    free_now("end")
    numbers.update(exit_status=status, free_gib=free_gib, backend=settings.vllm_backend)
    stats_path = root / "out" / "stats.json"
    if status != 0 or not stats_path.is_file():
        raise CheckFailed(f"trl-nca generate exited with {status}")
    stats = json.loads(stats_path.read_text())
    numbers.update(
        prompts_kept=stats["prompts_kept"],
        completions_sampled=stats["completions_sampled"],
        timings=stats.get("timings"),
    )
    problems = []
    if stats["completions_sampled"] != 4 * stats["prompts"]:
        problems.append(f"{stats['completions_sampled']} completions sampled for {stats['prompts']} prompts, K = 4")
    if cuda:
        held = free_gib["before_model_0"] - free_gib["before_model_1"]
        numbers["first_model_gib_still_held"] = held
        if held > MEMORY_SLACK_GIB:
            problems.append(f"{held:.1f} GiB of GPU memory still held by the first model when the second loads")
    if problems:
        raise CheckFailed("; ".join(problems))


CHECK_FUNCTIONS: dict[str, Callable[[Settings, dict[str, Any]], None]] = {
    "flex": check_flex,
    "fa2": check_fa2,
    "qlora": check_qlora,
    "moe_aux": check_moe_aux,
    "vllm": check_vllm,
}


# ---------------------------------------------------------------------------------------------------------- runner
def run_check(name: str, settings: Settings) -> dict[str, Any]:
    """Run one check; never raises (an error is its status)."""
    numbers: dict[str, Any] = {}
    start = time.perf_counter()
    try:
        CHECK_FUNCTIONS[name](settings, numbers)
        status = "ok"
    except Skip as reason:
        status = f"skipped: {reason}"
    except CheckFailed as problem:
        status = f"failed: {problem}"
    except CheckTimeout as timeout:
        status = f"failed: TimeoutError: {timeout}"
    except Exception as error:
        traceback.print_exc()
        status = f"failed: {benchmark.error_line(error)}"
    clear_device_cache(garbage_collection=True)
    return {"status": status, "numbers": numbers, "seconds": time.perf_counter() - start}


def _in_subprocess(name: str, device: str, workdir: str, limit_s: float) -> dict[str, Any]:
    """`run_check` in a fresh process of its own session: asked to stop (SIGTERM) `STOP_GRACE_S` before `limit_s`,
    killed with everything it started at `limit_s`."""
    result_path = os.path.join(workdir, f"{name}.result.json")
    command = [sys.executable, os.path.abspath(__file__), "--_check", name, result_path, "--device", device]
    start = time.perf_counter()
    process = subprocess.Popen(command, start_new_session=True)

    def signal_group(signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signum)

    timed_out = False
    try:
        returncode = process.wait(timeout=max(1.0, limit_s - STOP_GRACE_S))
    except subprocess.TimeoutExpired:
        timed_out = True
        signal_group(signal.SIGTERM)
        try:
            returncode = process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            signal_group(signal.SIGKILL)
            returncode = process.wait()
    signal_group(signal.SIGKILL)  # anything it started and left running (an engine process, compile workers)
    process_s = time.perf_counter() - start  # the check's process, its start-up (imports) included
    try:
        with open(result_path) as f:
            return {**json.load(f), "process_s": process_s}
    except (OSError, ValueError):
        pass
    if timed_out:
        status = f"failed: TimeoutError: the check did not finish within its {limit_s:g} s limit"
    else:
        status = f"failed: {benchmark._worker_failure(result_path, returncode)}"
    return {"status": status, "numbers": {}, "seconds": process_s, "process_s": process_s}


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: str) -> dict[str, Any]:
    """Versions and the device the checks ran on."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "cuda": torch.version.cuda,
        "flash_attn_2_available": benchmark.is_flash_attn_2_available(),
    }
    for package in ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "vllm", "flash-attn"):
        env[package] = _version(package)
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    return env


def format_report(result: dict[str, Any]) -> str:
    """One line per check: name, status, seconds."""
    lines = [f"gpu_check on {result['environment']['device']}:"]
    for name, check in result["checks"].items():
        lines.append(f"  {name:8s} {check['seconds']:7.1f} s  {check['status']}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=CHECKS, default=None, help="run these checks (default: all)")
    parser.add_argument("--json", default="gpu_check.json", help="where to write the results (default: %(default)s)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument(
        "--in-process", action="store_true", help="run the checks in this process, without time limits (tests)"
    )
    parser.add_argument("--_check", nargs=2, metavar=("NAME", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the checks, print one line each, write the JSON; 1 when a check failed, else 0."""
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="trl-nca-gpu-check-") as workdir:
        if args._check:
            name, result_path = args._check
            signal.signal(signal.SIGTERM, _stop)
            result = run_check(name, settings_for(args.device, workdir))
            with open(result_path, "w") as f:
                json.dump(result, f)
            return 0
        names = [name for name in CHECKS if args.only is None or name in args.only]
        result: dict[str, Any] = {
            "environment": environment(args.device),
            "settings": settings_for(args.device, "")._asdict(),
            "time_limits_s": None if args.in_process else {name: TIME_LIMITS_S[name] for name in names},
            "checks": {},
        }
        for name in names:
            print(f"[gpu_check] {name} ...", flush=True)
            if args.in_process:
                check = run_check(name, settings_for(args.device, os.path.join(workdir, name)))
            else:
                check = _in_subprocess(name, args.device, workdir, TIME_LIMITS_S[name])
            result["checks"][name] = check
            print(f"[gpu_check] {name}: {check['status']} ({check['seconds']:.1f} s)", flush=True)
    statuses = [check["status"] for check in result["checks"].values()]
    result["summary"] = {
        kind: [name for name, check in result["checks"].items() if check["status"].startswith(kind)]
        for kind in ("ok", "failed", "skipped")
    }
    print(format_report(result))
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.json}")
    return 1 if any(status.startswith("failed") for status in statuses) else 0


if __name__ == "__main__":
    sys.exit(main())
