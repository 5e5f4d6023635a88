"""Shared fixtures: everything offline, tiny models built in code, CPU-safe trainer configs."""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
# The CLI's option-table cache (trl_nca.arguments): one per test session, never the user's.
os.environ.setdefault("TRL_NCA_CACHE_DIR", tempfile.mkdtemp(prefix="trl-nca-test-cache-"))

import pytest  # noqa: E402

from trl_nca.tiny import build_tiny_model, build_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture
def make_model(tokenizer):
    """`make_model(architecture="mistral", seed=0, **config_overrides)` -> a fresh tiny random model."""

    def _make(architecture: str = "mistral", seed: int = 0, **kwargs):
        return build_tiny_model(tokenizer, architecture, seed=seed, **kwargs)

    return _make


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A tiny Mistral + tokenizer saved to disk, usable as a local model id."""
    path = tmp_path_factory.mktemp("tiny-mistral")
    build_tiny_model(tokenizer, "mistral").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def load_script(path):
    """Import a script from `scripts/` (not a package) as a module, for tests that call its functions."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cpu_args(config_cls, output_dir, **overrides):
    """A trainer config that runs on a CPU box: fp32, no reporting, no saving unless asked, deterministic."""
    defaults = dict(
        output_dir=str(output_dir),
        bf16=False,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        learning_rate=1e-3,
        logging_steps=1,
        max_steps=2,
        gradient_checkpointing=False,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    defaults.update(overrides)
    return config_cls(**defaults)
