"""Tiny, offline models and tokenizers built entirely in code.

Nothing here touches a model hub: the tokenizer is trained with the `tokenizers` library on a corpus you pass (or a
small built-in one) and the models are random-init from a config. Tests, the demo, the recipes' CPU smoke runs and the
benchmarks all use these builders, so every architecture trl-nca supports can be exercised on a CPU box.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast

# A minimal chat template in the Zephyr style: every turn is "<|role|>\n{content}<|end|>\n". It renders a prompt with
# `add_generation_prompt=True` as a strict token prefix of the same prompt followed by an assistant turn, which is what
# DPO-style prompt/completion splitting relies on.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]

# Model shapes: a few layers, GQA, untied head (the fused LM head must handle an untied `lm_head`).
TINY_ARCHITECTURES = {
    "mistral": dict(model_type="mistral", sliding_window=None),
    "mixtral": dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.01),
    "llama": dict(model_type="llama"),
    "qwen2": dict(model_type="qwen2"),
}


def default_corpus(n_lines: int = 1500, seed: int = 0) -> list[str]:
    """A small synthetic English-like corpus with digits, enough to train a byte-level BPE of a few thousand tokens."""
    rng = random.Random(seed)
    words = (
        "the a an sky sea is was blue green red big small cat dog bird runs jumps sings over under near far fast "
        "slow answer question number sum sort list word letter please write give tell me what why how one two three "
        "four five six seven eight nine ten good bad best worst reward model response prompt user assistant and or "
        "not yes no hello world happy sad"
    ).split()
    lines = []
    for _ in range(n_lines):
        n = rng.randint(3, 14)
        parts = [rng.choice(words) if rng.random() < 0.8 else str(rng.randint(0, 999)) for _ in range(n)]
        lines.append(" ".join(parts) + rng.choice([".", "?", "!", ""]))
    return lines


def build_tokenizer(
    corpus: Iterable[str] | None = None, vocab_size: int = 1000, chat_template: str = CHAT_TEMPLATE
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `corpus` and wrap it as a `PreTrainedTokenizerFast` with a chat template.

    Special tokens: `<pad>`=0, `<s>`=1, `</s>`=2 (EOS), `<unk>`, and the chat role markers.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = list(corpus) if corpus is not None else default_corpus()
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def tiny_config(
    tokenizer: PreTrainedTokenizerFast,
    architecture: str = "mistral",
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int | None = None,
    **overrides,
) -> PretrainedConfig:
    """The config of a tiny model of `architecture` (`mistral`, `mixtral`, `llama`, `qwen2`) for `tokenizer`."""
    if architecture not in TINY_ARCHITECTURES:
        raise ValueError(f"Unknown architecture {architecture!r}; choose from {sorted(TINY_ARCHITECTURES)}.")
    kwargs = dict(TINY_ARCHITECTURES[architecture])
    model_type = kwargs.pop("model_type")
    kwargs.update(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def build_tiny_model(
    tokenizer: PreTrainedTokenizerFast,
    architecture: str = "mistral",
    attn_implementation: str = "sdpa",
    seed: int = 0,
    **config_kwargs,
) -> PreTrainedModel:
    """A random-init causal LM of the given architecture (`mistral`, `mixtral`, `llama`, `qwen2`) sized for a CPU;
    `config_kwargs` are `tiny_config`'s sizes and any config overrides."""
    import torch

    config = tiny_config(tokenizer, architecture, **config_kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = _stop_ids(tokenizer)
    return model


def _stop_ids(tokenizer: PreTrainedTokenizerFast) -> int | list[int]:
    """EOS plus the chat template's end-of-turn token, as chat models' generation configs list them."""
    end_of_turn = tokenizer.convert_tokens_to_ids("<|end|>")
    if end_of_turn is None or end_of_turn == tokenizer.unk_token_id or end_of_turn == tokenizer.eos_token_id:
        return tokenizer.eos_token_id
    return [tokenizer.eos_token_id, end_of_turn]


def build_tiny_reward_model(
    tokenizer: PreTrainedTokenizerFast, architecture: str = "mistral", seed: int = 0, **config_kwargs
) -> PreTrainedModel:
    """A random-init `AutoModelForSequenceClassification` with one label (a reward model) sized for a CPU (by default
    hidden size 32, one layer)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    sizes = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, num_labels=1)
    config = tiny_config(tokenizer, architecture, **{**sizes, **config_kwargs})
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(config, dtype=torch.float32).eval()


def save_tiny(path: str, architecture: str = "mistral", **model_kwargs) -> str:
    """Build a tokenizer and a tiny model and save both to `path` (a local 'model id' for recipes and CLI tests)."""
    tokenizer = build_tokenizer()
    model = build_tiny_model(tokenizer, architecture, **model_kwargs)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


TINY_PROMPTS = (
    "Sort ascending: 7 3 9",
    "What is 2 plus 3?",
    "Name a colour.",
    "Write one word that rhymes with cat.",
    "Count from one to three.",
    "Say hello in French.",
    "What is the capital of France?",
    "Give an even number.",
)


def save_tiny_assets(path: str) -> dict[str, str]:
    """An offline stand-in for `trl-nca generate`'s inputs under `path`: `policy/` (a tiny Mistral), `reward_model/`
    (a tiny one-label classifier) and `prompts.jsonl` (conversational prompts). Returns the three paths."""
    import json
    from pathlib import Path

    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    policy = build_tiny_model(
        tokenizer, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1
    )
    policy.save_pretrained(root / "policy")
    tokenizer.save_pretrained(root / "policy")
    build_tiny_reward_model(tokenizer).save_pretrained(root / "reward_model")
    tokenizer.save_pretrained(root / "reward_model")
    with open(root / "prompts.jsonl", "w") as handle:
        for text in TINY_PROMPTS:
            handle.write(json.dumps({"prompt": [{"role": "user", "content": text}]}) + "\n")
    return {
        "policy": str(root / "policy"),
        "reward_model": str(root / "reward_model"),
        "prompts": str(root / "prompts.jsonl"),
    }


if __name__ == "__main__":
    import sys

    paths = save_tiny_assets(sys.argv[1] if len(sys.argv) > 1 else "runs/tiny")
    print("\n".join(f"{name}: {value}" for name, value in paths.items()))
