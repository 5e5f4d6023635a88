"""Training across machines, on one box: `recipes/launch.slurm` run twice, as SLURM runs it on each of 2 nodes.

Each "node" is the script run with the environment SLURM gives a node's task (SLURM_PROCID, SLURM_NNODES,
SLURM_JOB_NODELIST, ...; one process per node, gloo over 127.0.0.1), so the script's own launch line starts
`trl-nca train --num_machines 2 --machine_rank R ...`: two launchers side by side, DeepSpeed ZeRO-3 over both
(recipes/accelerate_configs/cpu_multinode_zero3.yaml). The slow tests train the tiny Mixtral recipe, resume it, reload
what it saved, and kill one node mid-run; the fast ones check the script's launch lines (with stand-ins for
`trl-nca` and `srun`) and the one line a lost peer is reported with.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from distributed_probes import PROBE_DIR_ENV, STOP_AT_ENV, ShardProbe
from recipe_data import save_dataset, save_model
from safetensors.torch import load_file
from test_distributed import (
    _env,
    _free_port,
    _model_weights,
    deepspeed_ops,  # noqa: F401  (the fixture: DeepSpeed's CPU comm op, built once)
    launch,
    logged_losses,
)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "recipes" / "launch.slurm"
RECIPE = REPO / "recipes" / "tiny" / "nca_reward_zero3_cpu.yaml"
NODES = 2
NODE_TIMEOUT = 240  # seconds for both nodes of one run; a healthy one takes ~20-30 s here
# The resumed run vs the uninterrupted single-machine one: deterministic on CPU (observed differences are 0).
RTOL, ATOL = 1e-5, 1e-7


class NodeProbe(ShardProbe):
    """`ShardProbe`, plus the machine (torchrun's GROUP_RANK) each rank ran on and the processes on that machine."""

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        path = self.out / f"rank{os.environ['RANK']}.json"
        record = json.loads(path.read_text())
        record.update(machine=int(os.environ["GROUP_RANK"]), local_world_size=int(os.environ["LOCAL_WORLD_SIZE"]))
        path.write_text(json.dumps(record))


def slurm_env(node: int, port: int, nodes: int = NODES, **extra: str) -> dict[str, str]:
    """The environment of node `node`'s task in a `sbatch --nodes=NODES` job (`srun`, one task per node), plus what
    the tests set: one training process per node (GPUS_PER_NODE), a free port, `trl-nca` of this interpreter."""
    hosts = ",".join(["127.0.0.1"] * nodes)  # where there is no `scontrol`, the script reads a plain list
    env = _env(**extra)
    env.pop("MASTER_ADDR", None)
    env.update(
        SLURM_JOB_ID="4242", SLURM_JOB_NAME="trl-nca", SLURM_NNODES=str(nodes), SLURM_JOB_NUM_NODES=str(nodes),
        SLURM_JOB_NODELIST=hosts, SLURM_NODELIST=hosts, SLURM_STEP_ID="0", SLURM_STEP_NUM_NODES=str(nodes),
        SLURM_STEP_NUM_TASKS=str(nodes), SLURM_STEP_NODELIST=hosts, SLURM_PROCID=str(node), SLURM_NODEID=str(node),
        SLURM_LOCALID="0", GPUS_PER_NODE="1", MASTER_PORT=str(port),
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
    )  # fmt: skip
    return env


def start_nodes(tmp: Path, *args: str, nodes: int = NODES, **extra: str) -> list[subprocess.Popen]:
    """`bash recipes/launch.slurm RECIPE ARGS` once per node, side by side (each in its own process group, output in
    `tmp/node{R}.out|err`)."""
    port, processes = _free_port(), []
    for node in range(nodes):
        with open(tmp / f"node{node}.out", "w") as out, open(tmp / f"node{node}.err", "w") as err:
            command = ["bash", str(SCRIPT), str(RECIPE), "--accelerate_config", "cpu_multinode_zero3", *args]
            env = slurm_env(node, port, nodes, **extra)
            processes.append(
                subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=err, start_new_session=True)
            )
    return processes


def _output(tmp: Path, node: int) -> str:
    return (tmp / f"node{node}.out").read_text() + (tmp / f"node{node}.err").read_text()


def _stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def run_nodes(tmp: Path, *args: str, **extra: str) -> list[str]:
    """Both nodes of one run to the end; their outputs. Fails with their tails if a node fails or hangs."""
    tmp.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    processes = start_nodes(tmp, *args, **extra)
    try:
        for process in processes:
            process.wait(timeout=max(1.0, NODE_TIMEOUT - (time.perf_counter() - start)))
    except subprocess.TimeoutExpired:
        pytest.fail("a node hung:\n" + "\n".join(_output(tmp, n)[-3000:] for n in range(NODES)))
    finally:
        _stop(processes)
    print(f"{tmp.name}: both nodes done in {time.perf_counter() - start:.1f}s")
    outputs = [_output(tmp, node) for node in range(NODES)]
    for node, process in enumerate(processes):
        if process.returncode != 0:
            pytest.fail(f"node {node} failed (rc={process.returncode}):\n{outputs[node][-5000:]}")
    return outputs


def _log_history(folder: Path) -> list[dict]:
    state = json.loads((folder / "trainer_state.json").read_text())
    return [entry for entry in state["log_history"] if "loss" in entry]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode")
    return {
        "mixtral": save_model(root / "tiny-mixtral", "mixtral"),
        "data": save_dataset(root / "data", "reward"),
        # 100 steps an epoch: a node killed after step 2 leaves no epoch start (and its dataloader warning) in between
        "long_data": save_dataset(root / "long-data", "reward", n_train=400),
    }


def _logits(path: str | Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.arange(3, 40).unsqueeze(0)).logits


@pytest.mark.slow
@pytest.mark.usefixtures("deepspeed_ops")
def test_two_machines_shard_checkpoint_resume_and_save(assets, tmp_path):
    data = ("--model_name_or_path", assets["mixtral"], "--dataset_name", assets["data"])
    out = tmp_path / "out"
    common = (*data, "--output_dir", str(out), "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1")

    # Machine 0 and machine 1 train; the run stops after step 1 and its checkpoint (an interrupted run).
    first = run_nodes(
        tmp_path / "first", *common, "--callbacks", "test_multinode:NodeProbe", "distributed_probes:StopAtStep",
        **{PROBE_DIR_ENV: str(tmp_path / "probes1"), STOP_AT_ENV: "1"},
    )  # fmt: skip
    records = [json.loads((tmp_path / "probes1" / f"rank{rank}.json").read_text()) for rank in range(NODES)]
    for rank, record in enumerate(records):
        # One DeepSpeed ZeRO-3 run of world size 2, one process on each machine, global rank r on machine r.
        assert record["rank"] == rank and record["world_size"] == 2 and record["num_processes"] == 2
        assert record["machine"] == rank and record["local_world_size"] == 1
        assert record["distributed_type"] == "DistributedType.DEEPSPEED" and record["zero3"] is True
    # The parameters are partitioned across the machines: each holds about half, the halves cover every tensor.
    total = sum(records[0]["full_numel"].values())
    assert total == sum(t.numel() for t in _model_weights(assets["mixtral"]).values())
    for record in records:
        assert 0.45 * total <= sum(record["local_numel"].values()) <= 0.55 * total
    for name, full in records[0]["full_numel"].items():
        shards = [record["local_numel"][name] for record in records]
        assert sum(shards) >= full and max(shards) < full, (name, shards, full)
    # Rank 0 (machine 0) logs; each machine wrote its own optimizer shard into the checkpoint.
    assert len(logged_losses(first[0])) == 1 and logged_losses(first[1]) == []
    assert "launch.slurm: 2 node(s) x 1 process(es), machine 0 at 127.0.0.1:" in first[0]
    checkpoint = out / "checkpoint-1"
    for rank in range(NODES):
        assert next(checkpoint.glob(f"global_step1/*zero_pp_rank_{rank}_*optim_states.pt"), None), rank
    assert not (out / "checkpoint-2").exists()

    # Both machines resume from the newest checkpoint and finish; the final model is saved in full.
    second = run_nodes(
        tmp_path / "second", *common, "--resume_from_checkpoint", "last",
        "--callbacks", "distributed_probes:ShardProbe", **{PROBE_DIR_ENV: str(tmp_path / "probes2")},
    )  # fmt: skip
    assert len(logged_losses(second[0])) == 1  # step 2 only: step 1 came from the checkpoint
    assert [entry["step"] for entry in _log_history(out / "checkpoint-2")] == [1, 2]

    # The oracle: the same 2 steps uninterrupted, 2 processes on ONE machine (recipes' own cpu_zero3 config).
    reference = tmp_path / "reference"
    launch("nca_reward_zero3_cpu.yaml", *data, "--output_dir", str(reference), "--max_steps", "2", env=_env())
    for got, want in zip(_log_history(out / "checkpoint-2"), _log_history(reference)):
        for key in ("loss", "grad_norm", "learning_rate"):
            assert got[key] == pytest.approx(want[key], rel=RTOL, abs=ATOL), (got["step"], key)

    # What the two machines saved reloads (fresh from_pretrained) to the weights their ranks gathered at the end,
    # exactly; it matches the single-machine run, weights and logits; and it trained (differs from the start).
    saved = _model_weights(str(out))
    gathered = [load_file(str(tmp_path / "probes2" / f"rank{rank}.safetensors")) for rank in range(NODES)]
    expected = _model_weights(str(reference))
    initial = _model_weights(assets["mixtral"])
    assert set(saved) == set(gathered[0]) == set(expected) == set(initial)
    for name, weight in saved.items():
        assert torch.equal(weight, gathered[0][name]) and torch.equal(weight, gathered[1][name]), name
        torch.testing.assert_close(weight, expected[name], rtol=RTOL, atol=ATOL)
    assert any(not torch.equal(saved[name], initial[name]) for name in initial)
    torch.testing.assert_close(_logits(out), _logits(reference), rtol=RTOL, atol=1e-6)


def _training_pids(out: Path) -> list[int]:
    """Live processes whose command line names this run's output folder (launchers and training processes)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, ValueError, IndexError):
            continue
        if str(out) in cmdline and state != "Z" and proc.name.isdigit():
            pids.append(int(proc.name))
    return pids


@pytest.mark.slow
@pytest.mark.usefixtures("deepspeed_ops")
@pytest.mark.parametrize("victim", [1, 0], ids=["kill-machine-1", "kill-machine-0"])
def test_killing_one_machine_stops_the_other_with_one_line(victim, assets, tmp_path):
    out = tmp_path / "out"
    survivor = 1 - victim
    processes = start_nodes(
        tmp_path, "--model_name_or_path", assets["mixtral"], "--dataset_name", assets["long_data"],
        "--output_dir", str(out), "--max_steps", "400", "--save_strategy", "steps", "--save_steps", "2",
        "--callbacks", "distributed_probes:SlowSteps",
    )  # fmt: skip
    try:
        deadline = time.monotonic() + NODE_TIMEOUT
        while not (out / "checkpoint-2" / "trainer_state.json").exists():
            for node, process in enumerate(processes):
                assert process.poll() is None, f"node {node} stopped:\n{_output(tmp_path, node)[-3000:]}"
            assert time.monotonic() < deadline, "the run did not reach its first checkpoint"
            time.sleep(0.2)
        said = (tmp_path / f"node{survivor}.err").stat().st_size

        os.killpg(processes[victim].pid, signal.SIGKILL)  # the whole node: its launcher and its training process
        start = time.monotonic()
        try:
            processes[survivor].wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"machine {survivor} still runs 60 s after machine {victim} died")
        print(f"machine {survivor} stopped {time.monotonic() - start:.1f}s after machine {victim} was killed")
        assert processes[survivor].returncode == 1

        # What the surviving machine printed from then on: one line, no traceback.
        with open(tmp_path / f"node{survivor}.err") as err:
            err.seek(said)
            lines = err.read().splitlines()
        assert len(lines) == 1, "\n".join(lines)[-5000:]
        assert lines[0].startswith(f"trl-nca train: training process rank {survivor} (pid ")
        assert "lost the other processes (" in lines[0] and "a process on another machine stopped" in lines[0]
        assert f"the run stopped; last checkpoint: {out / 'checkpoint-'}" in lines[0]
        assert lines[0].endswith("--resume_from_checkpoint last (on each of the 2 machines, with its --machine_rank)")
        deadline = time.monotonic() + 10
        while _training_pids(out) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _training_pids(out), "processes of the run survived"
    finally:
        _stop(processes)


# --------------------------------------------------------------------------------------------------- fast checks
def _stand_in(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text(f"#!/bin/bash\n{body}\n")
    path.chmod(0o755)


def _script(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """`bash recipes/launch.slurm ARGS` with stand-ins for `trl-nca` (prints its arguments, one per line, after the
    node's SLURM_PROCID) and `srun` (runs its command once per node with that node's SLURM_PROCID) first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    _stand_in(bin_dir, "trl-nca", 'echo "node $SLURM_PROCID:"; printf "%s\\n" "$@"')
    srun = (
        'echo "srun $*" >&2\n'
        'while [[ "$1" == --* ]]; do shift; done\n'  # its options; then the command, run once per node
        "for node in $(seq 0 $((SLURM_NNODES - 1))); do\n"
        '    SLURM_PROCID=$node SLURM_STEP_NUM_NODES=$SLURM_NNODES "$@"\n'
        "done"
    )
    _stand_in(bin_dir, "srun", srun)
    env = {"PATH": f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin", **env}
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=30)


def test_the_batch_script_runs_one_launcher_per_node_with_its_machine_rank(tmp_path):
    job = {"SLURM_JOB_ID": "7", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu-a,gpu-b", "SLURM_PROCID": "0"}
    result = _script(tmp_path, job, "mixtral-8x7b/nca_reward_lora", "--output_dir", "/shared/run a")
    assert result.returncode == 0, result.stderr
    assert "srun --nodes=2 --ntasks-per-node=1 --kill-on-bad-exit=1" in result.stderr
    flags = ["--num_machines", "2", "--num_processes", "16", "--main_process_ip", "gpu-a", "--main_process_port",
             "29500"]  # fmt: skip
    launches = [block.splitlines() for block in result.stdout.split("node ")[1:]]
    assert launches == [
        [f"{node}:", "train", "mixtral-8x7b/nca_reward_lora", "--output_dir", "/shared/run a", *flags,
         "--machine_rank", str(node)]
        for node in range(2)
    ]  # fmt: skip


def test_a_node_task_launches_itself_and_the_environment_overrides_the_defaults(tmp_path):
    task = {"SLURM_NNODES": "4", "SLURM_JOB_NODELIST": "n[1-4]", "SLURM_STEP_NUM_NODES": "3",
            "SLURM_STEP_NODELIST": "n2,n3,n4", "SLURM_PROCID": "2", "SLURM_GPUS_ON_NODE": "4"}  # fmt: skip
    result = _script(tmp_path, task, "RECIPE")
    assert result.returncode == 0 and "srun" not in result.stderr, result.stderr
    assert result.stdout.split("node ")[1].splitlines() == [
        "2:", "train", "RECIPE", "--num_machines", "3", "--num_processes", "12", "--main_process_ip", "n2",
        "--main_process_port", "29500", "--machine_rank", "2",
    ]  # fmt: skip
    result = _script(tmp_path, {**task, "GPUS_PER_NODE": "1", "MASTER_ADDR": "10.0.0.9", "MASTER_PORT": "6000"}, "R")
    assert "--num_processes\n3\n--main_process_ip\n10.0.0.9\n--main_process_port\n6000\n" in result.stdout


@pytest.mark.parametrize(
    ("env", "args", "error"),
    [
        ({}, (), "usage: sbatch --nodes=N recipes/launch.slurm RECIPE"),
        ({}, ("RECIPE",), "not in a SLURM allocation"),
        ({"SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu[1-2]"}, ("RECIPE",), "without scontrol: set MASTER_ADDR"),
    ],
    ids=["no-recipe", "no-allocation", "node-range-without-scontrol"],
)
def test_the_script_refuses_with_one_line(tmp_path, env, args, error):
    result = _script(tmp_path, env, *args)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and error in result.stderr, result.stderr


def test_a_lost_peer_is_told_from_a_bug():
    from trl_nca.scripts.train import lost_peer

    gloo = "[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [10.0.0.2]:1161. This is"
    assert lost_peer(RuntimeError(gloo)) and lost_peer(RuntimeError("Read error [10.0.0.2]: Connection reset by peer"))
    assert not lost_peer(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x64 and 32x64)"))
    assert not lost_peer(ValueError("Connection closed by peer"))


def test_the_launcher_reports_a_recorded_lost_peer_in_one_line(tmp_path, monkeypatch):
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ErrorHandler, ProcessFailure

    from trl_nca.cli import failure_message

    # What a training process that lost its peers does (trl_nca.scripts.train.run), then what the launcher reads.
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    try:
        raise RuntimeError(
            "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
            "[10.0.0.2]:1161. This is typically caused by a remote worker crashing. Check the logs of the remote "
            "worker."
        )
    except RuntimeError as raised:
        ErrorHandler().record_exception(raised)
    failure = ProcessFailure(local_rank=0, pid=4321, exitcode=1, error_file=str(error_file))
    line = failure_message(ChildFailedError("trl_nca.scripts.train", {0: failure}), str(tmp_path / "none"), 2)
    assert line == (
        "trl-nca train: training process rank 0 (pid 4321) lost the other processes (RuntimeError: Connection closed "
        "by peer [10.0.0.2]:1161): a process on another machine stopped, or the network failed; the run stopped; "
        f"no checkpoint in {tmp_path / 'none'} to resume from"
    )
    # A process that died without a word is reported as before, also when the one that lost it failed first.
    died = ProcessFailure(local_rank=1, pid=99, exitcode=-9, error_file=str(tmp_path / "absent.json"))
    died.timestamp = failure.timestamp + 1  # the launcher saw it a second after the other process recorded its loss
    for failures in ({1: died}, {0: failure, 1: died}):
        line = failure_message(ChildFailedError("trl_nca.scripts.train", failures), None)
        assert line.startswith(
            "trl-nca train: training process rank 1 (pid 99) was killed by SIGKILL; the run stopped"
        )


@pytest.mark.parametrize(
    ("flags", "error"),
    [
        (("--num_processes", "3"), "--num_processes 3 is the total over the 2 machines: give a multiple of 2"),
        (("--machine_rank", "2"), "--machine_rank 2 is not a machine of this run: give 0 .. 1"),
        (
            ("--accelerate_config", "single_device", "--num_machines", "2"),
            "a run on 2 machines needs a distributed accelerate config",
        ),
    ],
    ids=["processes-not-a-multiple", "rank-out-of-range", "single-process-config"],
)
def test_a_multi_machine_launch_accelerate_would_get_wrong_is_a_usage_error(assets, monkeypatch, flags, error):
    import accelerate.commands.launch

    from trl_nca.cli import COMMAND_ENV, UsageError, train

    def launched(*args, **kwargs):
        raise AssertionError("launched instead of refusing")

    monkeypatch.setattr(os, "execvpe", launched)  # a single-process launch would replace this process
    monkeypatch.setattr(accelerate.commands.launch, "launch_command", launched)
    monkeypatch.setenv(COMMAND_ENV, "")  # train() sets it; restored after the test
    argv = [str(RECIPE), "--model_name_or_path", assets["mixtral"], "--dataset_name", assets["data"],
            "--accelerate_config", "cpu_multinode_zero3", *flags]  # fmt: skip
    with pytest.raises(UsageError, match=error.replace(".", r"\.")):
        train(argv)
