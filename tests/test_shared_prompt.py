"""Every new layout path is exact against the padded layout (fp32, rel <= 1e-4): per-response log-probs, loss and every
gradient, for the shared-prompt layout (unpacked and packed) and the padded layout packed (`padding_free=True`).

Also: the collator's O(L) metadata (nothing quadratic on the host), the FlexAttention `BlockMask` against the dense mask,
the mask built once per step, and the layout choice (`resolve_layout`) with its fallbacks. The MoE (Mixtral, router aux
loss on) side of the matrix and its independent aux-loss oracle are in `test_moe_aux.py`, which uses the helpers here.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass

import pytest
import torch
from conftest import cpu_args
from datasets import Dataset
from test_trainer import reward_rows

import trl_nca.trainer as trainer_module
from trl_nca import DataCollatorForKWayReward, NCATrainer
from trl_nca.attention import attention_windows, block_mask, dense_mask

RTOL = 1e-4  # the bound, fp32
WINDOW = 5  # shorter than every padded row (17 tokens at most), so the sliding window cuts attention
TRUNCATE = 16  # max_length: cuts the responses of the two longest prompts (12 and 15 tokens), keeps every prompt

# name -> (architecture, config overrides)
MODELS = {
    "llama": ("llama", {}),
    "mistral-window": ("mistral", {"sliding_window": WINDOW}),
    "qwen2": ("qwen2", {}),
    # layers 0 full attention, layer 1 sliding: the trainer builds a {layer_type: mask} dict
    "qwen2-mixed": ("qwen2", {"use_sliding_window": True, "max_window_layers": 1, "sliding_window": WINDOW}),
    "mixtral-aux": ("mixtral", {}),  # router aux loss on (coef MOE_COEF), see test_moe_aux.py
    "mixtral-aux-output": ("mixtral", {"output_router_logits": True}),  # the model itself asks for router logits
}
MOE_COEF = 0.02


def kway_rows() -> list[dict]:
    """`reward_rows(n=4, k=4, ragged=True)` (K = 2, 3, 4, 2) with prompts of 6, 9, 12 and 15 tokens (responses 2-5
    tokens with EOS): ragged K, ragged prompts, ragged responses."""
    rows = reward_rows(n=4, k=4, ragged=True)
    for i, row in enumerate(rows):
        row["prompt"] = "please tell me " * i + row["prompt"]
    return rows


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def make_trainer(
    tmp_path,
    tokenizer,
    make_model,
    model_name="llama",
    attn="sdpa",
    layout="shared_prompt",
    padding_free=False,
    variant="plain",
    peft_config=None,
    trainer_cls=NCATrainer,
    **overrides,
):
    """A `trainer_cls` (default NCATrainer) on `kway_rows()`: policy seed 0, reference seed 1 (LoRA: the
    adapter-disabled policy; variant "lora" uses `peft_config`, by default `lora_config()`)."""
    architecture, config = MODELS[model_name]
    if architecture == "mixtral":
        overrides.setdefault("router_aux_loss_coef", MOE_COEF)
    if variant == "truncated":
        overrides["max_length"] = TRUNCATE
    peft_config = (peft_config or lora_config()) if variant == "lora" else None
    model = make_model(architecture, seed=0, attn_implementation=attn, initializer_range=0.1, **config)
    ref = None if peft_config else make_model(architecture, seed=1, attn_implementation=attn, **config)
    args = cpu_args(
        trainer_cls._config_class,
        tmp_path / f"{layout}-{padding_free}-{attn}",
        kway_layout=layout,
        padding_free=padding_free,
        beta=0.5,
        **overrides,
    )
    trainer = trainer_cls(
        model,
        ref_model=ref,
        args=args,
        train_dataset=Dataset.from_list(kway_rows()),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    if peft_config is not None:  # move LoRA off its zero init so the adapter contributes
        with torch.no_grad():
            for name, param in trainer.model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    return trainer


@contextlib.contextmanager
def record_routers(model):
    """The router logits of every Mixtral router run inside the block (our own hooks, not `trl_nca.moe`)."""
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    logits, handles = [], []
    for module in model.modules():
        if isinstance(module, MixtralTopKRouter):
            handles.append(module.register_forward_hook(lambda _, __, output: logits.append(output[0])))
    try:
        yield logits, len(handles)
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class Step:
    """One `compute_loss` on the whole dataset as one batch (graph kept when `grad`)."""

    batch: dict
    logps: torch.Tensor  # policy per-response log-probs (B, K_max)
    loss: torch.Tensor
    aux: torch.Tensor | None  # the aux loss the trainer added (None when off)
    router_logits: list  # policy forward's router logits, one (tokens, experts) tensor per layer
    params: dict  # trainable parameters by name
    coef: float


def checked(trainer, batch: dict) -> dict:
    """The batch after the trainer's first-batch layout check (its own forwards run here, not in the step)."""
    live_reference = trainer.ref_model is not None and not trainer.precompute_ref_logps
    return trainer._exact_layout([trainer.model, trainer.ref_model] if live_reference else [trainer.model], batch)


def run_step(trainer, grad: bool = True) -> Step:
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    batch = checked(trainer, trainer._prepare_inputs(trainer.data_collator(rows)))
    calls = []
    original = trainer._forward_logps

    def spy(model, inputs, aux_loss=False):
        outputs, logps = original(model, inputs, aux_loss=aux_loss)
        calls.append((outputs, logps))
        return outputs, logps

    trainer._forward_logps = spy
    try:
        with torch.set_grad_enabled(grad), record_routers(trainer.model) as (router_logits, n_routers):
            trainer.model.zero_grad()
            loss = trainer.compute_loss(trainer.model, batch)
    finally:
        del trainer._forward_logps
    outputs, logps = calls[0]  # the policy forward comes first, then the reference one
    return Step(
        batch=batch,
        logps=logps,
        loss=loss,
        aux=outputs.aux_loss if trainer.aux_loss_enabled else None,
        router_logits=router_logits[:n_routers],
        params={name: p for name, p in trainer.model.named_parameters() if p.requires_grad},
        coef=trainer.router_aux_loss_coef,
    )


def gradients(loss: torch.Tensor, params: dict) -> dict:
    grads = torch.autograd.grad(loss, list(params.values()), retain_graph=True, allow_unused=True)
    return {name: grad for name, grad in zip(params, grads) if grad is not None}


# ------------------------------------------------------------------------------------------------ MoE aux oracle
def unique_token_mask(padded_batch: dict) -> torch.Tensor:
    """`(rows, L)` bool over a padded-layout batch (example-major rows): every token of the batch once, i.e. each
    prompt's tokens from its first row (its last token included, once), each response's tokens from its own row."""
    counts = padded_batch["response_mask"].sum(1)
    first_rows = torch.cumsum(counts, 0) - counts
    keep = padded_batch["completion_mask"].bool().clone()
    keep[first_rows] = padded_batch["attention_mask"].bool()[first_rows]
    return keep


def switch_aux_oracle(router_logits: list, token_mask: torch.Tensor, num_experts: int, top_k: int) -> torch.Tensor:
    """The Switch-Transformer load-balancing loss written out, over the tokens where `token_mask` is True.

    Per layer: p = softmax(router logits), the top-k experts of each token. Layers are pooled as transformers 5.x
    pools them (`load_balancing_loss_func` sums counts and probabilities over all layers, then divides by
    layers x tokens): f_e = top-k assignments to expert e / (layers x tokens), P_e = mean of p_e over layers x tokens,
    loss = num_experts x sum_e f_e P_e.
    """
    selected = token_mask.reshape(-1)
    probs = torch.cat([torch.softmax(layer.float(), dim=-1)[selected] for layer in router_logits])
    chosen = probs.topk(top_k, dim=-1).indices
    assignments = torch.zeros_like(probs).scatter_(1, chosen, 1.0)
    fraction = assignments.sum(0) / probs.size(0)
    mean_prob = probs.sum(0) / probs.size(0)
    return num_experts * (fraction * mean_prob).sum()


# ------------------------------------------------------------------------------------------------ the matrix
@dataclass
class Target:
    logps: torch.Tensor
    loss: torch.Tensor
    aux: torch.Tensor | None
    grads: dict | None


@dataclass
class Baseline:
    padded: Target  # what a packed padded layout must reproduce (the model's own aux: prompt once per row)
    shared: Target  # what the shared-prompt layout must reproduce (aux over the unique tokens: the oracle)
    step: Step


def padded_baseline(trainer, grad: bool = True) -> Baseline:
    """The padded, unpacked layout; for MoE with aux on, the shared-prompt target is its NCA loss + coef x oracle."""
    assert trainer.data_collator.layout == "padded" and not trainer.data_collator.padding_free
    step = run_step(trainer, grad)

    def grads_of(loss):
        return gradients(loss, step.params) if grad else None

    padded = Target(step.logps.detach(), step.loss.detach(), step.aux, grads_of(step.loss))
    if step.aux is None:
        return Baseline(padded, padded, step)
    text_config = trainer.model.config.get_text_config()
    experts, top_k = text_config.num_local_experts, text_config.num_experts_per_tok
    real = step.batch["attention_mask"].bool()
    # Our formula reproduces transformers' on the padded layout (same tokens: the prompt once per row) ...
    torch.testing.assert_close(switch_aux_oracle(step.router_logits, real, experts, top_k), step.aux)
    # ... and over each token once it is the aux the shared-prompt layout must compute.
    oracle = switch_aux_oracle(step.router_logits, unique_token_mask(step.batch), experts, top_k)
    nca_loss = step.loss - step.coef * step.aux
    shared_loss = nca_loss + step.coef * oracle
    shared = Target(step.logps.detach(), shared_loss.detach(), oracle.detach(), grads_of(shared_loss))
    return Baseline(padded, shared, step)


def assert_step_matches(step: Step, target: Target, label: str):
    torch.testing.assert_close(step.logps.detach(), target.logps, rtol=RTOL, atol=1e-5, msg=f"{label}: log-probs")
    torch.testing.assert_close(step.loss.detach(), target.loss, rtol=RTOL, atol=1e-6, msg=f"{label}: loss")
    if target.aux is not None:
        torch.testing.assert_close(step.aux.detach(), target.aux, rtol=RTOL, atol=1e-6, msg=f"{label}: aux")
    if target.grads is None:
        return
    grads = gradients(step.loss, step.params)
    assert grads and grads.keys() == target.grads.keys(), label
    for name, grad in target.grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=RTOL, atol=1e-6, msg=f"{label}: grad of {name}")
        assert (grads[name] - grad).norm() <= RTOL * grad.norm() + 1e-7, f"{label}: grad of {name}"


PACKINGS = (("shared_prompt", False), ("shared_prompt", True), ("padded", True))


def check_layouts(tmp_path, tokenizer, make_model, model_name, attn, variant, packings=PACKINGS):
    """Every layout of `packings` against the padded, unpacked layout: log-probs, loss, aux, gradients."""
    baseline = padded_baseline(
        make_trainer(tmp_path, tokenizer, make_model, model_name, attn, "padded", False, variant)
    )
    if variant == "truncated":  # the cut really happens
        assert baseline.step.batch["input_ids"].size(1) == TRUNCATE
    steps = {}
    for layout, packed in packings:
        trainer = make_trainer(tmp_path, tokenizer, make_model, model_name, attn, layout, packed, variant)
        assert (trainer.data_collator.layout, trainer.data_collator.padding_free) == (layout, packed)
        step = steps[layout, packed] = run_step(trainer)
        assert (step.batch["input_ids"].size(0) == 1) == packed
        if layout == "shared_prompt":  # the trainer built a mask (a dict of them for mixed layer types)
            mask = trainer._attention_mask(trainer.model, step.batch)
            assert isinstance(mask, dict if model_name == "qwen2-mixed" else torch.Tensor), type(mask)
        target = baseline.shared if layout == "shared_prompt" else baseline.padded
        assert_step_matches(step, target, f"{model_name}-{attn}-{variant}-{layout}-{'packed' if packed else 'rows'}")
    return baseline, steps


ATTNS = ("sdpa", "eager")
VARIANTS = ("plain", "truncated", "lora")
CASES = [
    (name, attn, variant)
    for name in ("llama", "mistral-window", "qwen2", "qwen2-mixed")
    for attn in ATTNS
    for variant in VARIANTS
]


@pytest.mark.parametrize("model_name,attn,variant", CASES, ids=["-".join(case) for case in CASES])
def test_every_layout_equals_the_padded_layout(tmp_path, tokenizer, make_model, model_name, attn, variant):
    check_layouts(tmp_path, tokenizer, make_model, model_name, attn, variant)


@pytest.mark.parametrize("model_name", ["mistral-window", "qwen2-mixed"])
def test_the_mask_applies_the_sliding_window(tmp_path, tokenizer, make_model, monkeypatch, model_name):
    """The window is applied by the trainer's mask (the collator knows nothing of it), and the exactness above depends
    on it: without the window the shared-prompt log-probs differ from the padded layout's."""
    padded = padded_baseline(make_trainer(tmp_path, tokenizer, make_model, model_name, layout="padded"), grad=False)
    trainer = make_trainer(tmp_path, tokenizer, make_model, model_name)
    assert not hasattr(trainer.data_collator, "sliding_window")
    step = run_step(trainer, grad=False)
    batch = step.batch
    mask = trainer._attention_mask(trainer.model, batch)
    metadata = (batch["sequence_ids"], batch["branch_ids"], batch["position_ids"])
    windows = attention_windows(trainer.model.config.get_text_config())
    if model_name == "mistral-window":
        assert windows == WINDOW
        assert torch.equal(mask, dense_mask(*metadata, sliding_window=WINDOW))
    else:
        assert windows == {"full_attention": None, "sliding_attention": WINDOW}
        assert torch.equal(mask["full_attention"], dense_mask(*metadata))
        assert torch.equal(mask["sliding_attention"], dense_mask(*metadata, sliding_window=WINDOW))
    assert mask_count(mask) < mask_count(dense_mask(*metadata)) * (2 if isinstance(mask, dict) else 1)
    torch.testing.assert_close(step.logps, padded.shared.logps, rtol=RTOL, atol=1e-5)

    monkeypatch.setattr(trainer_module, "attention_windows", lambda config: None)
    no_window = make_trainer(tmp_path, tokenizer, make_model, model_name, kway_layout_check=False)
    assert (run_step(no_window, grad=False).logps - padded.shared.logps).abs().max() > 1e-3
    # A mask without the window is what the first-batch check exists for: with it on, the trainer falls back.
    no_window = make_trainer(tmp_path, tokenizer, make_model, model_name, layout="auto")
    torch.testing.assert_close(run_step(no_window, grad=False).logps, padded.shared.logps, rtol=RTOL, atol=1e-5)
    assert no_window.data_collator.layout == "padded"


def mask_count(mask) -> int:
    return sum(mask_count(m) for m in mask.values()) if isinstance(mask, dict) else int(mask.sum())


def test_training_steps_give_the_same_losses(tmp_path, tokenizer, make_model):
    losses = {}
    for layout, packed in (("padded", False), *PACKINGS):
        trainer = make_trainer(tmp_path, tokenizer, make_model, "mistral-window", layout=layout, padding_free=packed)
        trainer.args.max_steps = 3
        trainer.train()
        key = f"{layout}-{packed}"
        losses[key] = [log["loss"] for log in trainer.state.log_history if "loss" in log]
        losses[f"{key}-tokens"] = trainer.state.log_history[-2]["num_tokens"]
    assert len(losses["padded-False"]) == 3
    for layout, packed in PACKINGS:
        assert losses[f"{layout}-{packed}"] == pytest.approx(losses["padded-False"], rel=1e-5)
    assert losses["shared_prompt-False-tokens"] < losses["padded-False-tokens"]  # the prompt is counted once


# ------------------------------------------------------------------------------------------------ the mask, once
def test_the_mask_is_built_once_per_step_for_policy_and_reference(tmp_path, tokenizer, make_model, monkeypatch):
    built = []
    original = trainer_module.layout_attention_mask

    def counting(*args, **kwargs):
        built.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "layout_attention_mask", counting)
    for model_name, variant in (("llama", "plain"), ("qwen2-mixed", "lora"), ("mixtral-aux", "plain")):
        built.clear()
        trainer = make_trainer(tmp_path, tokenizer, make_model, model_name, variant=variant)
        rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
        checked(trainer, trainer._prepare_inputs(trainer.data_collator(rows[:1])))  # the first-batch check
        built.clear()
        batch = trainer._prepare_inputs(trainer.data_collator(rows))
        trainer.compute_loss(trainer.model, batch)  # policy forward + reference forward (other model, or adapter off)
        assert len(built) == 1, (model_name, variant)
        trainer.compute_loss(trainer.model, batch)  # the same batch again: still cached
        assert len(built) == 1
        trainer.compute_loss(trainer.model, trainer._prepare_inputs(trainer.data_collator(rows)))  # a new batch
        assert len(built) == 2


# ------------------------------------------------------------------------------------------------ collator
def random_examples(rng: random.Random, n_prompts: int = 8, scale: int = 1, max_prompt: int = 60) -> list[dict]:
    """Token rows with 1 to 4 responses, prompts of 1 to `max_prompt` x `scale` tokens, responses of 0 to 40 x `scale`."""
    examples = []
    for _ in range(n_prompts):
        k = rng.randint(1, 4)
        examples.append(
            {
                "prompt_ids": [rng.randint(3, 99) for _ in range(rng.randint(1, max_prompt * scale))],
                "completion_ids": [[rng.randint(3, 99) for _ in range(rng.randint(0, 40 * scale))] for _ in range(k)],
                "rewards": [rng.random() for _ in range(k)],
            }
        )
    return examples


@pytest.mark.parametrize("layout", ["padded", "shared_prompt"])
@pytest.mark.parametrize("padding_free", [False, True], ids=["rows", "packed"])
@pytest.mark.parametrize("multiple", [None, 128])
def test_the_collator_builds_nothing_quadratic(layout, padding_free, multiple):
    rng = random.Random(f"{layout}-{padding_free}-{multiple}")
    collator = DataCollatorForKWayReward(
        pad_token_id=0, layout=layout, padding_free=padding_free, pad_to_multiple_of=multiple
    )
    for scale in (1, 8):  # long rows: still nothing grows as L^2
        examples = random_examples(rng, scale=scale)
        batch = collator(examples)
        rows, length = batch["input_ids"].shape
        for key, tensor in batch.items():
            if key in ("max_length_q", "max_length_k"):  # host ints (see `collator.varlen_kwargs`)
                continue
            assert tensor.dim() <= 2 and tensor.numel() <= rows * length, (key, tuple(tensor.shape))
        if "attention_mask" in batch:
            assert layout == "padded" and not padding_free and batch["attention_mask"].shape == (rows, length)
        assert rows == 1 if padding_free else rows == (len(batch["response_index"]) if layout == "padded" else 8)
        if multiple:
            assert length % multiple == 0
        if layout == "shared_prompt":
            assert {"sequence_ids", "branch_ids", "position_ids", "padding_mask", "response_ids"} <= batch.keys()
        if padding_free:
            unpacked = DataCollatorForKWayReward(pad_token_id=0, layout=layout)(examples)
            check_packed_row(batch, unpacked, layout)


def check_packed_row(packed, unpacked, layout):
    """The packed row is the unpacked rows' real tokens one after the other (positions restarting with each), then
    padding only; the shared layout's sequence ids count the prompts 0, 1, ... in order."""
    real = unpacked.get("attention_mask", unpacked.get("padding_mask")).bool()
    n_real = int(real.sum())
    assert packed["padding_mask"][0].tolist() == [1] * n_real + [0] * (packed["input_ids"].size(1) - n_real)
    for key in ("input_ids", "position_ids", "completion_mask", "branch_ids", "response_ids"):
        if key not in unpacked:  # the padded layout's unpacked rows: positions 0.. per row, response = row
            rows = torch.arange(real.size(0)).unsqueeze(1).expand_as(real)
            columns = torch.arange(real.size(1)).expand_as(real)
            values = {
                "position_ids": columns,
                "response_ids": torch.where(unpacked["completion_mask"].bool(), rows, -1),
            }
            if key not in values:
                continue
            expected = values[key][real]
        else:
            expected = unpacked[key][real]
        assert torch.equal(packed[key][0, :n_real], expected), key
    if layout == "shared_prompt":
        lengths = real.sum(1)
        expected_ids = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
        assert torch.equal(packed["sequence_ids"][0, :n_real], expected_ids)
        assert (packed["sequence_ids"][0, n_real:] == -1).all() and (packed["branch_ids"][0, n_real:] == -1).all()


def test_shared_prompt_collator_tensors():
    collator = DataCollatorForKWayReward(pad_token_id=0, layout="shared_prompt")
    batch = collator(
        [
            {"prompt_ids": [5, 6, 7], "completion_ids": [[8, 9], [10]], "rewards": [1.0, 0.0]},
            {"prompt_ids": [3], "completion_ids": [[4], [4, 4]], "rewards": [0.0, 1.0]},
        ]
    )
    # prompt[:-1] | prompt[-1] R1 | prompt[-1] R2
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 7, 10], [3, 4, 3, 4, 4, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 2, 3], [0, 1, 0, 1, 2, 0, 0]]
    assert batch["sequence_ids"].tolist() == [[0] * 7, [0] * 5 + [-1] * 2]
    assert batch["branch_ids"].tolist() == [[0, 0, 1, 1, 1, 2, 2], [1, 1, 2, 2, 2, -1, -1]]
    assert batch["completion_mask"].tolist() == [[0, 0, 0, 1, 1, 0, 1], [0, 1, 0, 1, 1, 0, 0]]
    assert batch["response_ids"].tolist() == [[-1, -1, -1, 0, 0, -1, 1], [-1, 2, -1, 3, 3, -1, -1]]
    assert batch["padding_mask"].tolist() == [[1] * 7, [1, 1, 1, 1, 1, 0, 0]]
    assert "attention_mask" not in batch
    mask = dense_mask(batch["sequence_ids"], batch["branch_ids"], batch["position_ids"])
    assert mask.shape == (2, 1, 7, 7) and mask.dtype == torch.bool
    rows = mask[0, 0].int().tolist()
    assert rows[5] == [1, 1, 0, 0, 0, 1, 0]  # branch 2's head sees the prompt prefix and itself, not branch 1
    assert rows[6] == [1, 1, 0, 0, 0, 1, 1]
    assert rows[4] == [1, 1, 1, 1, 1, 0, 0]
    assert mask[1, 0, 6].tolist() == [False] * 6 + [True]  # padding sees itself only
    assert mask[1, 0, 3].tolist() == [False, False, True, True, False, False, False]  # prompt of 1 token: the heads
    additive = dense_mask(batch["sequence_ids"], batch["branch_ids"], batch["position_ids"], dtype=torch.float32)
    assert torch.equal(additive == 0, mask) and (additive[~mask] == torch.finfo(torch.float32).min).all()
    windowed = dense_mask(batch["sequence_ids"], batch["branch_ids"], batch["position_ids"], sliding_window=2)
    assert windowed[0, 0, 4].int().tolist() == [0, 0, 0, 1, 1, 0, 0]  # positions 3 and 4 of branch 1 only


def test_packed_collator_tensors():
    examples = [
        {"prompt_ids": [5, 6, 7], "completion_ids": [[8, 9], [10]], "rewards": [1.0, 0.0]},
        {"prompt_ids": [3], "completion_ids": [[4], [4, 4]], "rewards": [0.0, 1.0]},
    ]
    shared = DataCollatorForKWayReward(pad_token_id=0, layout="shared_prompt", padding_free=True, pad_to_multiple_of=8)
    batch = shared(examples)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 7, 10, 3, 4, 3, 4, 4, 0, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 2, 3, 0, 1, 0, 1, 2, 0, 0, 0, 0]]
    assert batch["sequence_ids"].tolist() == [[0] * 7 + [1] * 5 + [-1] * 4]
    assert batch["branch_ids"].tolist() == [[0, 0, 1, 1, 1, 2, 2, 1, 1, 2, 2, 2] + [-1] * 4]
    assert batch["completion_mask"].tolist() == [[0, 0, 0, 1, 1, 0, 1, 0, 1, 0, 1, 1, 0, 0, 0, 0]]
    assert batch["response_ids"].tolist() == [[-1, -1, -1, 0, 0, -1, 1, -1, 2, -1, 3, 3] + [-1] * 4]
    assert batch["padding_mask"].tolist() == [[1] * 12 + [0] * 4]
    assert "attention_mask" not in batch
    mask = dense_mask(batch["sequence_ids"], batch["branch_ids"], batch["position_ids"])[0, 0]
    assert not mask[7:12, :7].any() and not mask[:7, 7:].any()  # prompts do not see each other
    assert mask[11].int().tolist() == [0] * 7 + [0, 0, 1, 1, 1] + [0] * 4

    padded = DataCollatorForKWayReward(pad_token_id=0, padding_free=True, pad_to_multiple_of=8)
    batch = padded(examples)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 5, 6, 7, 10, 3, 4, 3, 4, 4, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 0, 1, 2, 0, 1]]
    assert batch["completion_mask"].tolist() == [[0, 0, 0, 1, 1, 0, 0, 0, 1, 0, 1, 0, 1, 1, 0, 0]]
    assert batch["response_ids"].tolist() == [[-1, -1, -1, 0, 0, -1, -1, -1, 1, -1, 2, -1, 3, 3, -1, -1]]
    assert batch["padding_mask"].tolist() == [[1] * 14 + [0] * 2]
    assert "attention_mask" not in batch


@pytest.mark.parametrize("pad_to_multiple_of,expected", [(None, 128), (48, 384)])
@pytest.mark.parametrize("padding_free", [False, True], ids=["rows", "packed"])
def test_flex_attention_pads_rows_to_its_block_size(
    tmp_path, tokenizer, make_model, pad_to_multiple_of, expected, padding_free
):
    trainer = make_trainer(
        tmp_path,
        tokenizer,
        make_model,
        attn="flex_attention",
        layout="auto",
        padding_free=padding_free,
        pad_to_multiple_of=pad_to_multiple_of,
    )
    assert trainer.data_collator.layout == "shared_prompt" and trainer.data_collator.pad_to_multiple_of == expected
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    assert batch["input_ids"].size(1) == expected  # every row fits in one block here
    assert make_trainer(tmp_path, tokenizer, make_model).data_collator.pad_to_multiple_of == 8  # sdpa: mask alignment


# ------------------------------------------------------------------------------------------------ FlexAttention
@pytest.mark.parametrize("padding_free", [False, True], ids=["rows", "packed"])
@pytest.mark.parametrize("window", [None, 3, 50])
def test_block_mask_equals_the_dense_mask(padding_free, window):
    from torch.nn.attention.flex_attention import create_mask

    rng = random.Random(f"{padding_free}-{window}")
    collator = DataCollatorForKWayReward(
        pad_token_id=0, layout="shared_prompt", padding_free=padding_free, pad_to_multiple_of=128
    )
    batch = collator(random_examples(rng, n_prompts=4))
    metadata = (batch["sequence_ids"], batch["branch_ids"], batch["position_ids"])
    rows, length = batch["input_ids"].shape
    dense = dense_mask(*metadata, sliding_window=window)
    blocks = block_mask(*metadata, sliding_window=window)
    assert torch.equal(create_mask(blocks.mask_mod, rows, 1, length, length), dense)
    # Block sparsity: a block is computed exactly when some query of it attends some key of it.
    n = length // 128
    dense_blocks = dense.view(rows, 1, n, 128, n, 128).any(dim=(3, 5))
    assert torch.equal(blocks.to_dense().bool(), dense_blocks)
    if padding_free:  # the other prompts' blocks are skipped
        assert blocks.to_dense().sum() < rows * n * (n + 1) // 2


@pytest.fixture
def eager_flex(monkeypatch):
    """Run transformers' flex_attention path with torch's *eager* flex_attention (exact on CPU; torch 2.13's compiled
    CPU kernel is not usable here). Yields a list that counts the eager calls, so a test can check they happened."""
    import transformers.integrations.flex_attention as flex_integration

    calls = []

    def eager(*args, **kwargs):
        calls.append(1)
        return torch.nn.attention.flex_attention.flex_attention(*args, **kwargs)

    # transformers calls plain `flex_attention` (not its torch.compile wrapper) when it believes it is compiling
    monkeypatch.setattr(flex_integration, "is_torchdynamo_compiling", lambda: True)
    monkeypatch.setattr(flex_integration, "flex_attention", eager)
    return calls


FLEX_MODELS = ["mistral-window", "qwen2-mixed", "mixtral-aux"]


@pytest.mark.parametrize("model_name", FLEX_MODELS)
def test_flex_attention_forward_equals_padded_sdpa(tmp_path, tokenizer, make_model, eager_flex, model_name):
    """Forward only (no grad): torch 2.13 has no FlexAttention backward on CPU; see the CUDA test below."""
    from torch.nn.attention.flex_attention import BlockMask

    baseline = padded_baseline(make_trainer(tmp_path, tokenizer, make_model, model_name, layout="padded"), grad=False)
    for packed in (False, True):
        trainer = make_trainer(tmp_path, tokenizer, make_model, model_name, "flex_attention", "auto", packed)
        assert trainer.data_collator.layout == "shared_prompt" and trainer.data_collator.padding_free == packed
        eager_flex.clear()
        step = run_step(trainer, grad=False)
        assert eager_flex, "the eager flex_attention was not called"
        assert step.batch["input_ids"].size(1) % 128 == 0
        mask = trainer._attention_mask(trainer.model, step.batch)
        for value in mask.values() if isinstance(mask, dict) else [mask]:
            assert isinstance(value, BlockMask)
        assert_step_matches(step, baseline.shared, f"{model_name}-flex-{'packed' if packed else 'rows'}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention has no backward pass on CPU (torch 2.13)")
@pytest.mark.parametrize("model_name", ["mistral-window", "qwen2-mixed", "mixtral-aux"])
def test_flex_attention_gradients_equal_padded_sdpa_on_cuda(tmp_path, tokenizer, make_model, model_name):
    """Compiled FlexAttention (what transformers runs) on a GPU: log-probs, loss and every gradient of the
    shared-prompt layout, unpacked and packed, against the padded sdpa layout, all in fp32."""

    def on_cuda(*args, **kwargs):
        trainer = make_trainer(*args, use_cpu=False, **kwargs)
        assert trainer.model.device.type == "cuda"
        return trainer

    baseline = padded_baseline(on_cuda(tmp_path, tokenizer, make_model, model_name, layout="padded"))
    for packed in (False, True):
        trainer = on_cuda(tmp_path, tokenizer, make_model, model_name, "flex_attention", "auto", packed)
        assert trainer.data_collator.layout == "shared_prompt"
        assert_step_matches(run_step(trainer), baseline.shared, f"{model_name}-flex-cuda-{packed}")


def test_flex_attention_cannot_train_on_cpu(tmp_path, tokenizer, make_model):
    trainer = make_trainer(tmp_path, tokenizer, make_model, attn="flex_attention", layout="auto")
    assert trainer.data_collator.layout == "shared_prompt"
    with pytest.raises(ValueError) as error:
        trainer.train()
    message = str(error.value)
    assert "\n" not in message and "flex_attention" in message and "sdpa" in message


# ------------------------------------------------------------------------------------------------ layout choice
def test_auto_layout_and_fallback_reasons(tmp_path, tokenizer, make_model):
    assert make_trainer(tmp_path, tokenizer, make_model, layout="auto").data_collator.layout == "shared_prompt"
    for attn in ("eager", "flex_attention"):
        trainer = make_trainer(tmp_path, tokenizer, make_model, attn=attn, layout="auto")
        assert trainer.data_collator.layout == "shared_prompt", attn
    with pytest.raises(ValueError, match="keep_end"):
        make_trainer(tmp_path, tokenizer, make_model, max_length=32, truncation_mode="keep_end")
    trainer = make_trainer(tmp_path, tokenizer, make_model, layout="auto", max_length=32, truncation_mode="keep_end")
    assert trainer.data_collator.layout == "padded"


@pytest.fixture
def warnings_of(monkeypatch):
    """`warnings_of(logger, method)`: the messages a logger's method is called with from now on (it still logs)."""

    def spy(logger, method):
        messages = []
        original = getattr(logger, method)

        def record(message, *args, **kwargs):
            messages.append(str(message))
            return original(message, *args, **kwargs)

        monkeypatch.setattr(logger, method, record)
        return messages

    return spy


def test_flash_attention_falls_back_to_the_packed_padded_layout(tmp_path, tokenizer, make_model, warnings_of):
    """flash_attn is not installed here; the layout is chosen from the config's attention implementation alone."""
    messages = warnings_of(trainer_module.logger, "warning_once")

    def flash_model(architecture, **kwargs):
        model = make_model(architecture, **kwargs)
        model.config._attn_implementation = "flash_attention_2"
        return model

    trainer = make_trainer(tmp_path, tokenizer, flash_model, layout="auto")
    assert (trainer.data_collator.layout, trainer.data_collator.padding_free) == ("padded", True)
    assert any("flash_attention_2" in message and "packed" in message for message in messages), messages
    with pytest.raises(ValueError, match="flash_attention_2"):
        make_trainer(tmp_path, tokenizer, flash_model, layout="shared_prompt")
    trainer = make_trainer(tmp_path, tokenizer, flash_model, layout="padded")  # explicit padded: as asked
    assert (trainer.data_collator.layout, trainer.data_collator.padding_free) == ("padded", False)


@pytest.mark.parametrize("layout", ["auto", "padded"])
def test_padding_free_is_honoured_not_disabled(tmp_path, tokenizer, make_model, warnings_of, layout):
    import trl.trainer.dpo_trainer as dpo_module

    messages = warnings_of(dpo_module.logger, "warning")
    trainer = make_trainer(tmp_path, tokenizer, make_model, layout=layout, padding_free=True)
    assert not any("padding_free" in message for message in messages), messages
    dpo_module.logger.warning("`padding_free=True` (spy check)")  # the spy does see this logger's warnings
    assert messages[-1] == "`padding_free=True` (spy check)"
    assert trainer.padding_free is True and trainer.args.padding_free is True
    assert trainer.data_collator.padding_free is True
    assert trainer.data_collator.layout == ("shared_prompt" if layout == "auto" else "padded")
