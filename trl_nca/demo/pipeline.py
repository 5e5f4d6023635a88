"""The demo pipeline, one function per stage: tokenizer and model in code, SFT warm start, K-response reward data,
alignment (NCA, InfoNCA, the listwise Plackett-Luce / LiPO-λ or TRL's DPO), evaluation against the ground-truth reward.

Every stage is deterministic under its seed (CPU, fixed batch sizes) and reuses TRL and trl-nca's library modules:
`trl.SFTTrainer` for the warm start, `trl_nca.reward_data.build_reward_dataset` (the `trl-nca generate` machinery) for
the reward data, `trl_nca.generation` for sampling, `trl.DPOTrainer` or trl-nca's trainers for alignment.
`trl_nca.demo.run` (`trl-nca demo`) and `scripts/reproduce_results.py` (the reproduction) call these.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback, set_seed

from trl_nca.callbacks import label_progress_bars
from trl_nca.demo.task import (
    demonstrate,
    format_prompt,
    ideal_answer,
    make_prompts,
    parse_prompt,
    sort_reward,
    sort_reward_func,
    tokenizer_corpus,
)

K = 4  # responses sampled per prompt
METHODS = (
    "nca", "infonca", "dpo", "dpo_all", "dpo_random", "nca_pair", "infonca_pair", "plackett_luce", "lipo_lambda",
)  # fmt: skip
METHOD_LABELS = {
    "sft": "SFT only",
    "nca": "NCA",
    "infonca": "InfoNCA",
    "dpo": "DPO (best vs worst)",
    "dpo_all": "DPO (best vs each other)",
    "dpo_random": "DPO (best vs random)",
    "nca_pair": "NCA (best-vs-random pairs)",
    "infonca_pair": "InfoNCA (best-vs-random pairs)",
    "plackett_luce": "Plackett-Luce DPO",
    "lipo_lambda": "LiPO-λ",
}
# Trained by `trl_nca.ListwiseTrainer` with loss_type [method] on all K responses (the others' baselines, issue #20).
LISTWISE_METHODS = ("plackett_luce", "lipo_lambda")
# The DPO baselines' pairs (`preference_pairs` modes) and the NCA/InfoNCA runs on dpo_random's pairs (K = 2).
PAIR_MODES = {"dpo": "best_worst", "dpo_all": "best_all", "dpo_random": "best_random", "nca_pair": "best_random",
              "infonca_pair": "best_random"}  # fmt: skip
# "self": the SFT model's own samples; "pool": one response from each of 4 other models; "offpolicy": the pool's
# responses with every exact answer rewritten one digit per line (`offpolicy_rows`), which the policy finds unlikely.
REGIMES = ("self", "pool", "offpolicy")
# The "pool" regime's response writers: SFT models trained like the policy on demonstrators of these accuracies.
POOL_P_CORRECT = (0.1, 0.4, 0.7, 0.95)


@dataclass(frozen=True)
class Preset:
    """Sizes of one demo configuration (model, data, budgets). See `PRESETS`."""

    name: str
    # model (Mistral architecture)
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    # task: lists of min_len..max_len digits
    min_len: int
    max_len: int
    # SFT warm start on imperfect demonstrations
    n_demos: int
    sft_epochs: int
    sft_lr: float
    sft_batch: int
    p_correct: float
    # reward data: prompts per split, K samples each
    n_train: int
    n_val: int
    n_test: int
    # alignment budget: optimizer steps, prompts per step, likelihood probe every n steps
    align_steps: int
    align_batch: int
    probe_every: int
    # evaluation: sampled responses per held-out prompt
    eval_samples: int = 4
    # the "pool" regime's response writers (see `prepare`): demonstrator accuracy of each
    pool_p_correct: tuple[float, ...] = POOL_P_CORRECT


# "small": the default demo and the reproduction. "tiny": the whole pipeline in well under a minute, for the tests.
# fmt: off
_SMALL = Preset(
    name="small", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, min_len=3,
    max_len=7, n_demos=6000, sft_epochs=3, sft_lr=3e-3, sft_batch=64, p_correct=0.4, n_train=1024, n_val=128,
    n_test=256, align_steps=64, align_batch=16, probe_every=8,
)
PRESETS: dict[str, Preset] = {
    "tiny": replace(
        _SMALL, name="tiny", hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        max_len=5, n_demos=512, sft_epochs=2, n_train=64, n_val=16, n_test=32, align_steps=8, align_batch=8,
        probe_every=4, eval_samples=2,
    ),
    "small": _SMALL,
}
# fmt: on


@dataclass(frozen=True)
class AlignHParams:
    """Alignment hyper-parameters. `alpha` (reward temperature) is used by NCA/InfoNCA only."""

    learning_rate: float = 1e-3
    beta: float = 0.1
    alpha: float = 0.1


# The demo's defaults per size and trainer. For "small" these are the grid points the reproduction selected on the
# validation splits of its tuning seeds (docs/results/self.json, a test checks it); "tiny" only exercises the code.
DEFAULT_HPARAMS: dict[str, dict[str, AlignHParams]] = {
    "tiny": {method: AlignHParams(learning_rate=1e-3, beta=0.1, alpha=0.1) for method in METHODS},
    "small": {
        "nca": AlignHParams(learning_rate=1e-3, beta=0.5, alpha=0.1),
        "infonca": AlignHParams(learning_rate=1e-3, beta=0.5, alpha=0.1),
        "dpo": AlignHParams(learning_rate=3e-4, beta=2.0, alpha=0.1),
        "dpo_all": AlignHParams(learning_rate=3e-4, beta=2.0, alpha=0.1),
        "plackett_luce": AlignHParams(learning_rate=1e-3, beta=0.5, alpha=0.1),
        "lipo_lambda": AlignHParams(learning_rate=3e-4, beta=2.0, alpha=0.1),
    },
}


# --- Stage 1-2: tokenizer, model, SFT warm start ---------------------------------------------------------------------


def build_demo_tokenizer() -> PreTrainedTokenizerBase:
    """A byte-level BPE trained on task text (each ``" d"`` digit is one token), with a Zephyr-style chat template."""
    from trl_nca.tiny import build_tokenizer

    return build_tokenizer(tokenizer_corpus(), vocab_size=320)


def user_message(digits: Sequence[int]) -> list[dict[str, str]]:
    """The conversational prompt for a digit list."""
    return [{"role": "user", "content": format_prompt(digits)}]


def assistant_message(text: str) -> list[dict[str, str]]:
    """A conversational completion."""
    return [{"role": "assistant", "content": text}]


def split_prompts(preset: Preset, seed: int) -> dict[str, list[list[int]]]:
    """Disjoint-by-construction random prompt sets for SFT demos, alignment training, validation and test.

    Each split has its own generator; a held-out prompt may coincide with a training one by chance (the space of short
    digit lists is small), which is also true of real prompt distributions and does not favour any method.
    """
    sizes = {"sft": preset.n_demos, "train": preset.n_train, "val": preset.n_val, "test": preset.n_test}
    return {
        name: make_prompts(n, random.Random(f"{seed}-{name}"), preset.min_len, preset.max_len)
        for name, n in sizes.items()
    }


def sft_dataset_rows(
    digit_lists: Sequence[Sequence[int]], p_correct: float, seed: int, name: str = "demonstrator"
) -> list[dict[str, Any]]:
    """Conversational prompt/completion rows from an imperfect demonstrator (`task.demonstrate`) that is right with
    probability `p_correct`; `name` keys its random stream."""
    rng = random.Random(f"{seed}-{name}")
    return [
        {"prompt": user_message(d), "completion": assistant_message(demonstrate(d, rng, p_correct))}
        for d in digit_lists
    ]


def train_sft(
    preset: Preset,
    tokenizer: PreTrainedTokenizerBase,
    demo_rows: list[dict[str, Any]],
    seed: int,
    output_dir: str | Path,
    show_progress: bool = True,
    label: str = "SFT warm start",
) -> PreTrainedModel:
    """Build a random-init Mistral-architecture model and fine-tune it with `trl.SFTTrainer` on `demo_rows`.

    The model and tokenizer are saved to `output_dir`; the reference model and the alignment runs load them from there.
    """
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from trl_nca.tiny import build_tiny_model

    set_seed(seed)
    model = build_tiny_model(
        tokenizer,
        "mistral",
        hidden_size=preset.hidden_size,
        num_hidden_layers=preset.num_hidden_layers,
        num_attention_heads=preset.num_attention_heads,
        num_key_value_heads=preset.num_key_value_heads,
        seed=seed,
    )
    args = SFTConfig(
        output_dir=str(Path(output_dir) / "sft-trainer"),
        bf16=False,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        num_train_epochs=preset.sft_epochs,
        per_device_train_batch_size=preset.sft_batch,
        learning_rate=preset.sft_lr,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        weight_decay=0.0,
        logging_steps=25,
        max_length=64,
        gradient_checkpointing=False,
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        disable_tqdm=not show_progress,
    )
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(demo_rows), processing_class=tokenizer
    )
    label_progress_bars(trainer, label, print_logs=False)
    trainer.train()
    model = trainer.model.eval()
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return model


def load_model(path: str | Path) -> PreTrainedModel:
    """Load a saved demo model (float32, sdpa attention) from a local folder."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


# --- Stage 3: sampling and the reward dataset ------------------------------------------------------------------------


def _prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], **kwargs: Any) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"])


SAMPLING_SEED_STRIDE = 100  # split i of seed s is sampled with seed s * 100 + i


def reward_dataset(
    model_dirs: Sequence[str | Path],
    prompts: Sequence[list[dict[str, str]]],
    seed: int,
    output_dir: str | Path,
    show_progress: bool = True,
    desc: str = "",
) -> list[dict[str, Any]]:
    """K = `K` responses per conversational prompt from the model(s) in `model_dirs` (one model: K samples; a pool:
    an equal share each), scored by `task.sort_reward_func`: `trl_nca.reward_data.build_reward_dataset` with the demo's
    sampling settings (temperature 1, no truncation, 24 new tokens). Every prompt keeps all K responses, empty ones
    excepted: a prompt with an empty response (trl-nca's trainers refuse empty assistant turns) is dropped. Returns the
    rows (`prompt`, `completions`, `rewards`, `models`, `rewards_sort_reward_func`); `output_dir` gets the library's
    outputs (`dataset/`, `data.jsonl`, `stats.json`, the dataset card)."""
    from datasets import Dataset

    from trl_nca.config import RewardDataConfig
    from trl_nca.reward_data import build_reward_dataset

    config = RewardDataConfig(
        output_dir=str(output_dir),
        model_name_or_path=[str(d) for d in model_dirs],
        num_completions=K,
        reward_funcs=[f"{sort_reward_func.__module__}:{sort_reward_func.__name__}"],
        dtype="float32",
        temperature=1.0,
        max_new_tokens=24,
        seed=seed,
        generation_batch_size=128,
        chunk_size=256,
        min_completions=K,
        deduplicate=False,
        overwrite=True,
    )
    dataset, _ = build_reward_dataset(
        config,
        Dataset.from_dict({"prompt": list(prompts)}),
        reward_funcs=[sort_reward_func],
        show_progress=show_progress,
    )
    return dataset.to_list()


def rank_order(rewards: Sequence[float]) -> list[int]:
    """Indices of the responses from best to worst reward (ties keep sampling order)."""
    return sorted(range(len(rewards)), key=lambda i: -rewards[i])


def preference_pairs(rows: Sequence[dict[str, Any]], mode: str = "best_worst", seed: int = 0) -> list[dict[str, Any]]:
    """Turn K-way reward rows into DPO pairs with `trl_nca.converters`: `best_worst` (one pair per prompt),
    `best_random` (the best against one strictly worse response drawn uniformly, seeded by `seed` and the prompt: the
    `ultrafeedback_binarized` recipe) or `best_all` (the best against each strictly worse one). Prompts whose responses
    all tie carry no preference and are skipped. Pairs keep their rewards (`score_chosen`, `score_rejected`)."""
    from trl_nca.converters import reward_to_preference, reward_to_preference_pairs

    modes = {"best_worst": "best_vs_worst", "best_random": "best_vs_random", "best_all": "best_vs_rest"}
    if mode not in modes:
        raise ValueError(f"Unknown pairing mode {mode!r}; choose from {sorted(modes)}.")
    rows = [r for r in rows if max(r["rewards"]) > min(r["rewards"])]
    if mode == "best_all":
        batch = {key: [r[key] for r in rows] for key in ("prompt", "completions", "rewards")}
        pairs = reward_to_preference_pairs(batch, modes[mode])
        return [dict(zip(pairs, values)) for values in zip(*pairs.values())]
    return [reward_to_preference(r, modes[mode], seed=seed) for r in rows]


def pair_rows(pairs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """DPO pairs as K = 2 reward rows (chosen first, with the pair's own rewards) for NCA/InfoNCA on the same pairs."""
    return [
        {
            "prompt": p["prompt"],
            "completions": [p["chosen"], p["rejected"]],
            "rewards": [p["score_chosen"], p["score_rejected"]],
        }
        for p in pairs
    ]


def offpolicy_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The "offpolicy" regime's rows: every response with reward 1.0 (the exact answer) rewritten one digit per line.
    `task.sort_reward` splits on whitespace, so the rewards do not change; the policy, which only ever saw
    space-separated answers, finds the rewritten form very unlikely."""
    out = []
    for row in rows:
        completions = [
            [{**c[0], "content": "\n".join(c[0]["content"].split())}] if reward == 1.0 else c
            for c, reward in zip(row["completions"], row["rewards"], strict=True)
        ]
        out.append({**row, "completions": completions})
    return out


# --- Log-likelihoods of given responses (evaluation and the likelihood probe) ----------------------------------------


@torch.no_grad()
def completion_logps(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[dict[str, Any]],
    batch_size: int = 256,
) -> torch.Tensor:
    """Summed log-probability of every completion of every row given its prompt (the quantity DPO/NCA use).

    Tokenisation follows TRL: prompt rendered with the generation prompt, prompt+completion rendered whole, the
    completion starts at their common token prefix. Returns a float32 tensor of shape (len(rows), K).
    """
    from trl.data_utils import common_prefix_length
    from trl.trainer.utils import pad

    seqs, masks = [], []
    for row in rows:
        prompt_ids = _prompt_ids(tokenizer, row["prompt"], add_generation_prompt=True)
        for completion in row["completions"]:
            full = _prompt_ids(tokenizer, row["prompt"] + completion)
            n = common_prefix_length(prompt_ids, full)
            seqs.append(torch.tensor(full))
            masks.append(torch.tensor([0] * n + [1] * (len(full) - n)))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(seqs), batch_size):
        ids = pad(seqs[start : start + batch_size], padding_value=tokenizer.pad_token_id).to(device)
        attn = pad([torch.ones_like(s) for s in seqs[start : start + batch_size]], padding_value=0).to(device)
        mask = pad(masks[start : start + batch_size], padding_value=0).to(device)
        logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1].float()
        token_logps = logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        out.append((token_logps * mask[:, 1:]).sum(-1).cpu())
    model.train(was_training)
    k = len(rows[0]["completions"]) if rows else 0
    return torch.cat(out).view(len(rows), k) if out else torch.zeros(0, k)


def by_rank(values: torch.Tensor, rows: Sequence[dict[str, Any]]) -> torch.Tensor:
    """Reorder a (N, K) tensor of per-response values so that column k is each prompt's rank-k response (0 = best)."""
    index = torch.tensor([rank_order(r["rewards"]) for r in rows], dtype=torch.long)
    return values.gather(1, index)


class RankLikelihoodProbe(TrainerCallback):
    """Records the mean log-likelihood of held-out responses per reward rank (best ... worst) during training: the
    paper's Figure 2 quantity, measured identically for every trainer (DPO logs only chosen/rejected)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, rows: Sequence[dict[str, Any]], every: int) -> None:
        self.tokenizer = tokenizer
        self.rows = list(rows)
        self.every = max(1, every)
        self.history: list[dict[str, Any]] = []

    def _record(self, model: PreTrainedModel, step: int) -> None:
        if self.history and self.history[-1]["step"] == step:
            return
        logps = by_rank(completion_logps(model, self.tokenizer, self.rows), self.rows)
        self.history.append({"step": step, "logps_by_rank": logps.mean(0).tolist()})

    def on_train_begin(self, args, state, control, model=None, **kwargs):  # noqa: D102
        self._record(model, 0)

    def on_step_end(self, args, state, control, model=None, **kwargs):  # noqa: D102
        if state.global_step % self.every == 0 or state.global_step >= state.max_steps:
            self._record(model, state.global_step)


# --- Stage 4: alignment ----------------------------------------------------------------------------------------------


@dataclass
class AlignResult:
    """What one alignment run returns."""

    model: PreTrainedModel
    log_history: list[dict[str, Any]]
    likelihood: list[dict[str, Any]]
    wall_s: float
    n_train_rows: int
    batch: int  # rows per optimizer step


def align(
    method: str,
    sft_dir: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    train_rows: Sequence[dict[str, Any]],
    probe_rows: Sequence[dict[str, Any]] | None,
    hparams: AlignHParams,
    preset: Preset,
    seed: int,
    output_dir: str | Path,
    show_progress: bool = True,
) -> AlignResult:
    """Align the SFT model in `sft_dir` on the reward rows with `method`:

    - ``nca`` / ``infonca``: `trl_nca.NCATrainer` / `InfoNCATrainer` on all K responses per prompt;
    - ``dpo``: `trl.DPOTrainer` (sigmoid loss) on the best-vs-worst pair of each prompt;
    - ``dpo_all``: `trl.DPOTrainer` on the best response against each strictly worse one;
    - ``dpo_random``: `trl.DPOTrainer` on the best against a random strictly worse one (the paper's binarisation);
    - ``nca_pair`` / ``infonca_pair``: NCA / InfoNCA on exactly ``dpo_random``'s pairs (K = 2, their own rewards);
    - ``plackett_luce`` / ``lipo_lambda``: `trl_nca.ListwiseTrainer` with that loss_type on all K responses (LiPO-λ's
      labels are the rewards as given: the demo's lie in [0, 1]).

    Budget, identical for all methods: `preset.align_steps` optimizer steps, each on the data of `preset.align_batch`
    prompts (``dpo_all`` gets (K-1)x as many pairs per step), cosine schedule with 10%
    warm-up, the same reference model (the SFT model) and seed. `probe_rows` (reward rows, optional) are scored by a
    `RankLikelihoodProbe` every `preset.probe_every` steps; its history is `AlignResult.likelihood`.
    """
    from datasets import Dataset

    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose from {METHODS}.")
    set_seed(seed)
    train_rows = [{k: r[k] for k in ("prompt", "completions", "rewards")} for r in train_rows]
    model, ref_model = load_model(sft_dir).train(), load_model(sft_dir)
    probe = RankLikelihoodProbe(tokenizer, probe_rows, preset.probe_every) if probe_rows else None
    common = dict(
        output_dir=str(Path(output_dir) / f"{method}-trainer"),
        bf16=False,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        learning_rate=hparams.learning_rate,
        beta=hparams.beta,
        max_steps=preset.align_steps,
        lr_scheduler_type="cosine",
        warmup_steps=0.1,
        weight_decay=0.0,
        logging_steps=max(1, preset.align_steps // 16),
        gradient_checkpointing=False,
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        disable_tqdm=not show_progress,
    )
    if method in ("dpo", "dpo_all", "dpo_random"):
        from trl import DPOConfig, DPOTrainer

        rows = preference_pairs(train_rows, PAIR_MODES[method], seed)
        batch = preset.align_batch * (K - 1 if method == "dpo_all" else 1)
        args = DPOConfig(**common, per_device_train_batch_size=batch, loss_type=["sigmoid"])
        trainer_cls = DPOTrainer
    else:
        from trl_nca import InfoNCAConfig, InfoNCATrainer, ListwiseConfig, ListwiseTrainer, NCAConfig, NCATrainer

        rows = (
            pair_rows(preference_pairs(train_rows, PAIR_MODES[method], seed)) if method in PAIR_MODES else train_rows
        )
        kway = {"nca": (NCAConfig, NCATrainer), "infonca": (InfoNCAConfig, InfoNCATrainer)}
        config_cls, trainer_cls = kway.get(method.removesuffix("_pair"), (ListwiseConfig, ListwiseTrainer))
        # listwise: lipo_label_normalization stays "none", the demo's rewards lie in [0, 1]
        own = {"loss_type": [method]} if method in LISTWISE_METHODS else {"alpha": hparams.alpha}
        args = config_cls(**common, per_device_train_batch_size=preset.align_batch, **own)
    start = time.perf_counter()
    trainer = trainer_cls(
        model=model,
        ref_model=ref_model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[probe] if probe is not None else None,
    )
    label_progress_bars(trainer, f"{METHOD_LABELS[method]} alignment", print_logs=False)
    trainer.train()
    wall = time.perf_counter() - start
    return AlignResult(
        model=trainer.model.eval(),
        log_history=list(trainer.state.log_history),
        likelihood=probe.history if probe is not None else [],
        wall_s=wall,
        n_train_rows=len(rows),
        batch=args.per_device_train_batch_size,
    )


# --- Stage 5: evaluation ---------------------------------------------------------------------------------------------


@dataclass
class Reference:
    """What evaluation needs from the SFT model on a held-out split, computed once and shared by all methods."""

    rows: list[dict[str, Any]]  # held-out prompts with K responses and their rewards
    logps: torch.Tensor  # (N, K) SFT log-likelihood of those responses
    ideal_rows: list[dict[str, Any]]  # the same prompts with the ideal answer as the only completion
    ideal_logps: torch.Tensor  # (N, 1)
    sft_model: PreTrainedModel | None = None  # for the sampled KL(π‖μ) estimate


def make_reference(
    sft_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: Sequence[dict[str, Any]]
) -> Reference:
    """Compute the SFT model's log-likelihoods of the held-out samples and of the ideal answers."""
    ideal_rows = [
        {
            "prompt": r["prompt"],
            "completions": [assistant_message(ideal_answer(parse_prompt(r["prompt"][0]["content"])))],
        }
        for r in rows
    ]
    return Reference(
        rows=list(rows),
        logps=completion_logps(sft_model, tokenizer, rows),
        ideal_rows=ideal_rows,
        ideal_logps=completion_logps(sft_model, tokenizer, ideal_rows),
        sft_model=sft_model,
    )


def evaluate_policy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    reference: Reference,
    preset: Preset,
    seed: int,
    show_progress: bool = True,
    desc: str = "Evaluating",
    sampling_seeds: Sequence[int] = (10_007,),
) -> dict[str, Any]:
    """Ground-truth reward of the model's own outputs on the held-out prompts, and likelihood changes vs the SFT model.

    - `reward_sampled`: mean reward of `preset.eval_samples` responses per prompt, sampled at temperature 1 with each
      of the fixed `sampling_seeds` (offsets added to `seed`; `reward_sampled_by_sampling_seed`) and averaged (the
      distribution the KL-regularised objectives shape); `reward_greedy`: greedy decoding.
    - `kl`: sampled estimate of KL(π‖μ) per response, the mean of log π(y|x) - log μ(y|x) over the first sampling
      seed's samples y ~ π (μ = `reference.sft_model`; 0 without one).
    - `best_logp_change`: mean change (nats, summed over tokens) of the log-likelihood of each prompt's best held-out
      response (an SFT sample, or a pool model's response); `rank_logp_change`: the same for every rank (best ...
      worst); `ideal_logp_change`: for the ideal answer (the sorted list), which the responses may not contain;
      `best_logp` / `greedy_logp`: mean log π of the best held-out response / of the model's greedy answer;
      `best_is_greedy`: fraction of prompts where a best-rewarded held-out response is the greedy answer.
    - `ranking_accuracy`: fraction of held-out prompts (with at least two distinct rewards) where the implicit reward
      log π/μ is highest on a best-rewarded response (`rewards/accuracies` in the trainers' logs); `None` for the SFT
      model itself, whose implicit rewards are all zero.
    """
    from trl_nca.generation import SamplingOptions, completion_text, generate_completions

    prompts = [r["prompt"] for r in reference.rows]

    def texts(options: SamplingOptions, n: int, seed: int, kind: str) -> list[list[str]]:
        samples = generate_completions(
            model, tokenizer, prompts, n, seed=seed, options=options, batch_size=128, chunk_size=256,
            desc=f"{desc} ({kind})", show_progress=show_progress,
        )  # fmt: skip
        return [[completion_text(x.completion).strip() for x in xs] for xs in samples]

    def mean(values: Sequence[float]) -> float:
        return sum(values) / len(values)

    sampling = SamplingOptions(temperature=1.0, max_new_tokens=24)
    sampled = [texts(sampling, preset.eval_samples, seed + offset, "sampled") for offset in sampling_seeds]
    greedy = [ts[0] for ts in texts(SamplingOptions(max_new_tokens=24, do_sample=False), 1, seed, "greedy")]
    rewards = [[sort_reward(p[0]["content"], t) for p, ts in zip(prompts, s) for t in ts] for s in sampled]
    by_seed = [mean(r) for r in rewards]
    rewards_greedy = [sort_reward(p[0]["content"], g) for p, g in zip(prompts, greedy)]

    def logps(rows: list[dict[str, Any]], of: PreTrainedModel = model) -> torch.Tensor:
        return completion_logps(of, tokenizer, rows)

    sample_rows = [
        {"prompt": p, "completions": [assistant_message(t) for t in ts]} for p, ts in zip(prompts, sampled[0])
    ]
    kl = 0.0
    if reference.sft_model is not None and reference.sft_model is not model:
        kl = (logps(sample_rows) - logps(sample_rows, reference.sft_model)).mean().item()
    policy_logps = logps(reference.rows)
    delta = policy_logps - reference.logps
    ranked = by_rank(delta, reference.rows)
    ideal_delta = logps(reference.ideal_rows) - reference.ideal_logps
    greedy_logp = logps([{"prompt": p, "completions": [assistant_message(g)]} for p, g in zip(prompts, greedy)])
    hits, counted, best_is_greedy = 0, 0, 0
    for i, row in enumerate(reference.rows):
        top = max(row["rewards"])
        best_is_greedy += greedy[i] in [
            c[0]["content"].strip() for c, r in zip(row["completions"], row["rewards"]) if r == top
        ]
        if top > min(row["rewards"]):
            counted += 1
            hits += row["rewards"][int(delta[i].argmax())] == top
    is_reference = bool(torch.all(delta.abs() < 1e-4))
    return {
        "reward_sampled": mean(by_seed),
        "reward_sampled_by_sampling_seed": by_seed,
        "reward_greedy": mean(rewards_greedy),
        "exact_sampled": mean([r == 1.0 for rs in rewards for r in rs]),
        "kl": kl,
        "best_logp_change": ranked[:, 0].mean().item(),
        "rank_logp_change": ranked.mean(0).tolist(),
        "ideal_logp_change": ideal_delta.mean().item(),
        "best_logp": by_rank(policy_logps, reference.rows)[:, 0].mean().item(),
        "greedy_logp": greedy_logp.mean().item(),
        "best_is_greedy": best_is_greedy / max(1, len(reference.rows)),
        "ranking_accuracy": None if is_reference or counted == 0 else hits / counted,
        "examples": [
            {"prompt": p[0]["content"], "greedy": g, "sampled": s} for p, g, s in zip(prompts[:5], greedy, sampled[0])
        ],
    }


# --- Seed-level preparation (cached): SFT model + reward datasets ----------------------------------------------------


@dataclass
class Prepared:
    """The shared, cached inputs of every alignment run for one seed."""

    seed: int
    preset: Preset
    sft_dir: Path
    tokenizer: PreTrainedTokenizerBase
    data: dict[str, list[dict[str, Any]]]  # "train", "val", "test" reward rows
    timings: dict[str, float] = field(default_factory=dict)


def prepare(
    preset: Preset,
    seed: int,
    workdir: str | Path,
    show_progress: bool = True,
    log: Any = print,
    regime: str = "self",
) -> Prepared:
    """Stages 1-3 for one seed, cached in `workdir`: tokenizer, SFT model (`workdir/sft`) and the K-response reward
    datasets (`workdir/reward_data/{train,val,test}/`, written by `reward_dataset`). A cache is reused only if its
    `meta.json` matches.

    `regime` says who writes the K responses: ``"self"``, K samples from the SFT model (the policy) itself;
    ``"pool"``, one response each from K other models (`workdir/pool/`), SFT models of the same size and recipe
    trained on demonstrators of different accuracy (`preset.pool_p_correct`) from their own initialisations and
    prompts, as UltraFeedback's responses come from models other than the one being aligned; ``"offpolicy"``, the
    pool's rows (the same cache) through `offpolicy_rows`.
    """
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    if regime not in REGIMES:
        raise ValueError(f"Unknown regime {regime!r}; choose from {REGIMES}.")
    if regime == "offpolicy":
        pool = prepare(preset, seed, workdir, show_progress, log, regime="pool")
        return replace(pool, data={split: offpolicy_rows(rows) for split, rows in pool.data.items()})
    workdir = Path(workdir)
    sft_dir, data_dir = workdir / "sft", workdir / "reward_data"
    meta = json.loads(json.dumps({"preset": asdict(preset), "seed": seed, "K": K, "regime": regime, "format": 2}))
    meta_path = workdir / "meta.json"
    splits = ("train", "val", "test")
    if meta_path.exists() and json.loads(meta_path.read_text()) == meta:
        log(f"[seed {seed}] reusing the cached SFT model and reward data in {workdir}")
        tokenizer = AutoTokenizer.from_pretrained(sft_dir)
        data = {s: load_from_disk(str(data_dir / s / "dataset")).to_list() for s in splits}
        return Prepared(seed, preset, sft_dir, tokenizer, data)

    meta_path.unlink(missing_ok=True)
    shutil.rmtree(data_dir, ignore_errors=True)  # sampled by a model that is about to be retrained
    timings = {}
    t0 = time.perf_counter()
    set_seed(seed)
    tokenizer = build_demo_tokenizer()
    prompts = split_prompts(preset, seed)
    n_demos = len(prompts["sft"])
    log(f"[seed {seed}] SFT warm start on {n_demos} imperfect demonstrations (p_correct={preset.p_correct})")
    demos = sft_dataset_rows(prompts["sft"], preset.p_correct, seed)
    train_sft(preset, tokenizer, demos, seed, sft_dir, show_progress=show_progress)
    writers = [sft_dir]
    if regime == "pool":
        writers = []
        for j, p_correct in enumerate(preset.pool_p_correct):
            label = f"sft-p{p_correct:g}"  # the pool's models are saved in workdir/pool/LABEL
            log(f"[seed {seed}] pool model {label}: SFT on demonstrations with p_correct={p_correct}")
            pool_seed = seed * SAMPLING_SEED_STRIDE + 10 + j
            digits = make_prompts(preset.n_demos, random.Random(f"{seed}-pool{j}"), preset.min_len, preset.max_len)
            rows = sft_dataset_rows(digits, p_correct, seed, name=f"pool{j}")
            writers.append(workdir / "pool" / label)
            train_sft(preset, tokenizer, rows, pool_seed, writers[-1], show_progress=show_progress, label=label)
    timings["sft_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    data = {}
    for i, split in enumerate(splits):
        messages = [user_message(d) for d in prompts[split]]
        split_seed = seed * SAMPLING_SEED_STRIDE + i
        data[split] = reward_dataset(writers, messages, split_seed, data_dir / split, show_progress=show_progress)
    timings["sampling_s"] = time.perf_counter() - t0
    meta_path.write_text(json.dumps(meta))
    return Prepared(seed, preset, sft_dir, tokenizer, data, timings)


def reward_stats(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Summary of a reward dataset: mean reward, mean best/worst per prompt, fraction of prompts with all ties."""
    n = max(1, len(rows))
    return {
        "mean": sum(sum(r["rewards"]) / len(r["rewards"]) for r in rows) / n,
        "best": sum(max(r["rewards"]) for r in rows) / n,
        "worst": sum(min(r["rewards"]) for r in rows) / n,
        "all_tied": sum(max(r["rewards"]) == min(r["rewards"]) for r in rows) / n,
    }
