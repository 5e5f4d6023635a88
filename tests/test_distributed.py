"""Multi-process training on a CPU host through `trl-nca train`: DeepSpeed ZeRO-3, DDP, resume, and the launch traps.

Every test launches the real console script (`trl-nca train RECIPE --accelerate_config ...`), which runs
`accelerate launch` with 2 processes (gloo). Callbacks from `distributed_probes.py` are injected with `--callbacks` and
report from inside each rank what the test process cannot see: world size, accelerate's distributed type, how many
parameter elements each rank holds, and the final full weights.

Wall times on the development box (2 shared cores, DeepSpeed's shm op already built): see docs/recipes.md.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from distributed_probes import PROBE_DIR_ENV, STOP_AT_ENV
from recipe_data import save_dataset, save_model
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
TINY = REPO / "recipes" / "tiny"
LAUNCH_TIMEOUT = 300  # seconds per launch; a healthy one takes ~20-40 s here

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _trl_nca() -> list[str]:
    script = Path(sys.executable).with_name("trl-nca")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "trl_nca.cli"]


def _env(probe_dir: Path | None = None, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        TQDM_DISABLE="1",
        DS_ACCELERATOR="cpu",
        PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")])),
    )
    if probe_dir is not None:
        env[PROBE_DIR_ENV] = str(probe_dir)
    env.update(extra)
    return env


def launch(recipe: str, *args: str, env: dict[str, str], expect_ok: bool = True) -> subprocess.CompletedProcess:
    """Run `trl-nca train recipes/tiny/RECIPE ARGS` on a free port; fail with the output tail if it fails."""
    command = [*_trl_nca(), "train", str(TINY / recipe), *args, "--main_process_port", str(_free_port())]
    start = time.perf_counter()
    result = subprocess.run(
        command, env=env, cwd=REPO, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, check=False
    )
    result.wall_s = time.perf_counter() - start
    print(f"[{time.strftime('%X')}] {' '.join(command[1:4])}: rc={result.returncode} in {result.wall_s:.1f}s")
    if expect_ok and result.returncode != 0:
        pytest.fail(f"launch failed (rc={result.returncode}):\n{(result.stdout + result.stderr)[-6000:]}")
    return result


def logged_losses(output: str) -> list[float]:
    """The per-step training losses rank 0 printed (`{'loss': '1.386', ...}`)."""
    return [float(v) for v in re.findall(r"\{'loss': '([^']+)'", output)]


def _probe(probe_dir: Path, rank: int) -> dict:
    return json.loads((probe_dir / f"rank{rank}.json").read_text())


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    return {
        "mistral": save_model(root / "tiny-mistral", "mistral"),
        "mixtral": save_model(root / "tiny-mixtral", "mixtral"),
        "data": save_dataset(root / "data", "reward"),
        "authors_data": save_dataset(root / "authors-data", "authors_reward"),
    }


@pytest.fixture(scope="module")
def deepspeed_ops():
    """Build (or load from the cache) DeepSpeed's CPU shared-memory comm op once, outside the timed launches.

    DeepSpeed JIT-compiles it with ninja/g++ on first use (~50 s, cached in $TORCH_EXTENSIONS_DIR); done here in a
    child process so that each ZeRO-3 test measures training, not compilation.
    """
    import deepspeed  # noqa: F401  (the `deepspeed` extra, which CI installs)

    code = "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; ShareMemCommBuilder().load()"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=_env(), check=True, capture_output=True, timeout=600)
    print(f"DeepSpeed shm op ready in {time.perf_counter() - start:.1f}s")


def _model_weights(path: str) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return {name: param.detach() for name, param in model.named_parameters()}


@pytest.mark.parametrize("architecture", ["mistral", "mixtral"])
def test_zero3_two_processes_shards_trains_and_saves(architecture, assets, deepspeed_ops, tmp_path):
    out, probes = tmp_path / "out", tmp_path / "probes"
    result = launch(
        "nca_reward_zero3_cpu.yaml",
        "--model_name_or_path", assets[architecture],
        "--dataset_name", assets["data"],
        "--output_dir", str(out),
        "--callbacks", "distributed_probes:ShardProbe",
        env=_env(probes),
    )  # fmt: skip
    output = result.stdout + result.stderr

    # Two ranks in one DeepSpeed ZeRO-3 run (not two lone processes).
    records = [_probe(probes, rank) for rank in (0, 1)]
    for rank, record in enumerate(records):
        assert record["rank"] == rank and record["world_size"] == 2 and record["num_processes"] == 2
        assert record["distributed_type"] == "DistributedType.DEEPSPEED" and record["zero3"] is True
        # The default layout: the prompt once, for the MoE model with its router aux loss too.
        assert record["layout"] == "shared_prompt"

    # Parameters are really partitioned: each rank holds about half of every element, the two halves cover it all.
    total = sum(records[0]["full_numel"].values())
    initial = _model_weights(assets[architecture])
    assert total == sum(t.numel() for t in initial.values())
    for record in records:
        held = sum(record["local_numel"].values())
        assert 0.45 * total <= held <= 0.55 * total, (held, total)
    for name, full in records[0]["full_numel"].items():
        shards = [record["local_numel"][name] for record in records]
        assert sum(shards) >= full and max(shards) < full, (name, shards, full)

    # It trained: max_steps losses were logged, and the router aux loss for the MoE model.
    assert len(logged_losses(output)) == 4
    if architecture == "mixtral":
        assert "'aux_loss'" in output

    # The saved model.safetensors is the full model; reloaded in this (fresh) process it equals the weights the ranks
    # gathered at the end of training, exactly, and differs from the initial weights.
    gathered = [load_file(str(probes / f"rank{rank}.safetensors")) for rank in (0, 1)]
    reloaded = _model_weights(str(out))
    assert set(reloaded) == set(gathered[0]) == set(initial)
    for name, weight in reloaded.items():
        assert torch.equal(weight, gathered[0][name]) and torch.equal(weight, gathered[1][name]), name
    assert any(not torch.equal(reloaded[name], initial[name]) for name in initial)


# 6 steps over 2 epochs (16 rows / (2 ranks x 2 per device) = 4 steps per epoch), a checkpoint every 3 steps: the DDP
# run doubles as the uninterrupted reference of the resume test. The data is in the authors' A0..A3 layout, so the
# converter also runs under 2 processes (main process first, the other from its cache).
DDP_ARGS = ("--max_steps", "6", "--save_strategy", "steps", "--save_steps", "3", "--dataset_format", "authors_reward")
# Tolerance on the logged losses, grad norms and learning rates, and on the final weights, of the resumed run vs the
# uninterrupted one. The runs are deterministic on CPU, so the observed differences are 0.
RESUME_RTOL, RESUME_ATOL = 1e-5, 1e-7


@pytest.fixture(scope="module")
def ddp_run(assets, tmp_path_factory):
    """One uninterrupted 2-process DDP run (6 steps, checkpoints at 3 and 6) with the probes on."""
    root = tmp_path_factory.mktemp("ddp")
    launch(
        "nca_reward_ddp_cpu.yaml",
        "--model_name_or_path", assets["mistral"],
        "--dataset_name", assets["authors_data"],
        "--output_dir", str(root / "out"),
        *DDP_ARGS,
        "--callbacks", "distributed_probes:ShardProbe",
        env=_env(root / "probes"),
    )  # fmt: skip
    return {"out": root / "out", "probes": root / "probes"}


def test_ddp_two_processes_keeps_ranks_identical(assets, ddp_run):
    probes = ddp_run["probes"]
    records = [_probe(probes, rank) for rank in (0, 1)]
    for rank, record in enumerate(records):
        assert record["rank"] == rank and record["world_size"] == 2 and record["num_processes"] == 2
        assert record["distributed_type"] == "DistributedType.MULTI_CPU" and record["zero3"] is False
        assert record["local_numel"] == record["full_numel"]  # DDP replicates

    weights = [load_file(str(probes / f"rank{rank}.safetensors")) for rank in (0, 1)]
    initial = _model_weights(assets["mistral"])
    assert set(weights[0]) == set(weights[1]) == set(initial)
    for name in initial:  # gradients were all-reduced: bit-identical replicas after training
        assert torch.equal(weights[0][name], weights[1][name]), name
    assert any(not torch.equal(weights[0][name], initial[name]) for name in initial)
    saved = _model_weights(str(ddp_run["out"]))
    assert all(torch.equal(saved[name], weights[0][name]) for name in initial)


def _log_history(checkpoint: Path) -> list[dict]:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return [entry for entry in state["log_history"] if "loss" in entry]


def test_resume_from_checkpoint_reproduces_the_uninterrupted_run(assets, ddp_run, tmp_path):
    common = ("--model_name_or_path", assets["mistral"], "--dataset_name", assets["authors_data"], *DDP_ARGS)
    split = tmp_path / "split"
    # The interrupted run: stops right after step 3 and its checkpoint.
    launch(
        "nca_reward_ddp_cpu.yaml", *common, "--output_dir", str(split),
        "--callbacks", "distributed_probes:StopAtStep",
        env=_env(**{STOP_AT_ENV: "3"}),
    )  # fmt: skip
    assert (split / "checkpoint-3").is_dir() and not (split / "checkpoint-6").exists()
    launch(
        "nca_reward_ddp_cpu.yaml", *common, "--output_dir", str(split),
        "--resume_from_checkpoint", str(split / "checkpoint-3"),
        env=_env(),
    )  # fmt: skip

    full = ddp_run["out"]
    reference, resumed = _log_history(full / "checkpoint-6"), _log_history(split / "checkpoint-6")
    assert [e["step"] for e in reference] == [e["step"] for e in resumed] == [1, 2, 3, 4, 5, 6]
    for ref, res in zip(reference, resumed):
        for key in ("loss", "grad_norm", "learning_rate"):
            assert res[key] == pytest.approx(ref[key], rel=RESUME_RTOL, abs=RESUME_ATOL), (ref["step"], key)
    final_ref, final_res = load_file(str(full / "model.safetensors")), load_file(str(split / "model.safetensors"))
    assert set(final_ref) == set(final_res)
    for name, weight in final_ref.items():
        torch.testing.assert_close(final_res[name], weight, rtol=RESUME_RTOL, atol=RESUME_ATOL)
    diffs = [abs(res["loss"] - ref["loss"]) for ref, res in zip(reference, resumed)]
    print(f"resume: max |loss difference| = {max(diffs):.3g}")


@pytest.mark.parametrize(
    ("recipe", "override", "error"),
    [
        # MULTI_GPU launcher without use_cpu: 2 processes that would each train alone.
        ("nca_reward_ddp_cpu.yaml", ("--use_cpu", "false"), "The launcher started 2 processes"),
        # DeepSpeed with use_cpu: accelerate would leave DeepSpeed for plain DDP.
        ("nca_reward_zero3_cpu.yaml", ("--use_cpu", "true"), "The accelerate config asks for DeepSpeed"),
    ],
    ids=["ddp-without-use_cpu", "deepspeed-with-use_cpu"],
)
def test_silent_launch_traps_fail_loudly(recipe, override, error, assets, tmp_path):
    result = launch(
        recipe,
        "--model_name_or_path", assets["mistral"],
        "--dataset_name", assets["data"],
        "--output_dir", str(tmp_path / "out"),
        *override,
        env=_env(),
        expect_ok=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert f"RuntimeError: {error}" in result.stdout + result.stderr
    assert not (tmp_path / "out" / "model.safetensors").exists()
