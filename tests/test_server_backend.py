"""`backend: server` against a fake OpenAI-compatible server on 127.0.0.1 that answers deterministically from each
request (the oracle): prompts as token ids, sampling parameters and seeds as sent, completions and their ids back (with
the stop token), bounded concurrency over two servers, retries, one-line errors, and `trl-nca generate` runs that
resume after the server failed."""

import contextlib
import json
import random
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from test_generate import _rows
from transformers import AutoTokenizer

from trl_nca import server as server_module
from trl_nca.generation import SamplingOptions, chunk_key, encode_prompts, keyed_seed
from trl_nca.server import ServerError, ServerSampler
from trl_nca.tiny import CHAT_TEMPLATE, build_tokenizer

MODEL = "tiny"
EOS, END = 2, 7  # `</s>` and `<|end|>`: the tiny model's stop tokens (generation_config.eos_token_id)
WORDS = "the sky is blue cat dog runs over under one two three good bad answer".split()


def _conversational(n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": f"What is {i} plus {i}?"}] for i in range(n)]


# ---------------------------------------------------------------------------------------------------------------------
# The fake server: /v1/models and /v1/completions, answers derived from the request only
# ---------------------------------------------------------------------------------------------------------------------


def oracle_choice(tokenizer, prompt_ids: list[int], payload: dict, j: int) -> dict:
    """The j-th completion of a request, as a vLLM server answers it: its token ids end with the stop token it stopped
    on (`stop_reason` null for the EOS, the id for another stop token), the text is decoded without it."""
    key = [prompt_ids, payload["seed"], j, payload["temperature"], payload["top_p"], payload["top_k"]]
    rng = random.Random(json.dumps(key))
    max_tokens = payload["max_tokens"]
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max_tokens)))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    stop = rng.choice(payload["stop_token_ids"]) if rng.random() < 0.75 and len(ids) < max_tokens else None
    ids = ids[:max_tokens]
    choice = dict(
        index=j,
        text=tokenizer.decode(ids, skip_special_tokens=True),
        finish_reason="stop" if stop is not None else "length",
        stop_reason=None if stop in (None, EOS) else stop,
        token_ids=ids + ([stop] if stop is not None else []),
    )
    return choice


class FakeState:
    """What the fake servers sharing it saw, and how they misbehave.

    `faults` are played, in arrival order, on the next `/completions` requests: "500", "503" and "429" (answered with
    that status), "drop" (the connection closes unanswered), "drop_after" (the request is served, then the connection
    closes unanswered) and "slow" (the answer comes after `slow_s`). From the `fail_after`-th served request on, and while `down`, every request is
    answered 503. A `text_only` server (as TGI) refuses token-id prompts with 422."""

    def __init__(
        self,
        tokenizer,
        served=(MODEL,),
        *,
        delay=0.0,
        token_ids=True,
        stop_in_ids=True,
        max_model_len=512,
        text_only=False,
    ):
        self.tokenizer = tokenizer
        self.text_only = text_only
        self.served = list(served)
        self.delay = delay
        self.token_ids = token_ids
        self.stop_in_ids = stop_in_ids
        self.max_model_len = max_model_len
        self.faults: list[str] = []
        self.slow_s = 1.0
        self.fail_after: int | None = None
        self.down = False
        self.lock = threading.Lock()
        self.log: list[dict] = []  # every /completions request: server, payload, prompt ids, whether served
        self.headers: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0

    def served_requests(self) -> list[dict]:
        return [entry for entry in self.log if entry["served"]]


class FakeHandler(BaseHTTPRequestHandler):
    state: FakeState
    name: str

    def log_message(self, *args):  # quiet
        pass

    def _answer(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        with contextlib.suppress(ConnectionError):  # the client gave up (timed out)
            self.wfile.write(data)

    def do_GET(self):
        self.state.headers.append(dict(self.headers))
        if self.path != "/v1/models":
            return self._answer(404, {"detail": "Not Found"})
        self._answer(200, {"object": "list", "data": [{"id": m, "object": "model"} for m in self.state.served]})

    def do_POST(self):
        state = self.state
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        state.headers.append(dict(self.headers))
        if self.path != "/v1/completions":
            return self._answer(404, {"detail": "Not Found"})
        prompt = payload["prompt"]
        if state.text_only and not isinstance(prompt, str):
            return self._answer(
                422, {"error": "Input validation error: `inputs` must be a string", "error_type": "validation"}
            )
        # A text prompt is tokenized as vLLM does it: with the tokenizer's special tokens (add_special_tokens=True).
        prompt_ids = prompt if isinstance(prompt, list) else state.tokenizer(prompt)["input_ids"]
        entry = dict(server=self.name, payload=payload, prompt_ids=prompt_ids, served=False)
        with state.lock:
            state.log.append(entry)
            fault = state.faults.pop(0) if state.faults else None
            if state.fail_after is not None and len(state.served_requests()) >= state.fail_after:
                state.down = True
            down = state.down
            state.in_flight += 1
            state.max_in_flight = max(state.max_in_flight, state.in_flight)
        try:
            time.sleep(state.delay)
            if down or fault in ("500", "503", "429"):
                status = 503 if down else int(fault)
                return self._answer(status, {"error": {"message": "server busy", "code": status}})
            if fault == "drop":
                self.close_connection = True
                return
            if fault == "slow":
                time.sleep(state.slow_s)
            if len(prompt_ids) + payload["max_tokens"] > state.max_model_len:
                message = (
                    f"This model's maximum context length is {state.max_model_len} tokens. However, you requested "
                    f"{payload['max_tokens']} output tokens and your prompt contains {len(prompt_ids)} input tokens."
                )
                return self._answer(400, {"error": {"message": message, "type": "BadRequestError", "code": 400}})
            choices = [oracle_choice(state.tokenizer, prompt_ids, payload, j) for j in range(payload["n"])]
            for choice in choices:
                if not (state.token_ids and payload.get("return_token_ids")):
                    del choice["token_ids"]
                elif not state.stop_in_ids and choice["finish_reason"] == "stop":
                    choice["token_ids"] = choice["token_ids"][:-1]
                if payload.get("return_token_ids"):
                    choice["prompt_token_ids"] = prompt_ids
            entry["served"] = True
            if fault == "drop_after":
                self.close_connection = True
                return
            self._answer(200, {"object": "text_completion", "model": payload["model"], "choices": choices})
        finally:
            with state.lock:
                state.in_flight -= 1


@contextlib.contextmanager
def fake_server(state: FakeState, name: str = "a"):
    """A fake server in a thread; yields its API base (`http://127.0.0.1:PORT/v1`)."""
    handler = type("Handler", (FakeHandler,), {"state": state, "name": name})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_port}/v1"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module")
def model_tokenizer(tiny_model_dir):
    """The tiny model's tokenizer, loaded from its folder (next to its generation config: stop tokens EOS and <|end|>)."""
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _sampler(urls, tokenizer, options=None, **kwargs) -> ServerSampler:
    kwargs.setdefault("backoff_s", 0.01)
    return ServerSampler(urls, MODEL, tokenizer, options or SamplingOptions(max_new_tokens=8), **kwargs)


def _as_tuples(rows):
    return [[(x.completion_ids, x.completion, x.finished) for x in row] for row in rows]


def _expected(tokenizer, state: FakeState, prompts, conversational=True):
    """Each prompt's samples from the fake's answers to the request that carried it (the ids include the stop)."""
    by_prompt = {}
    for entry in state.served_requests():
        by_prompt[json.dumps(entry["prompt_ids"])] = entry
    rows = []
    for ids in encode_prompts(tokenizer, prompts):
        payload = by_prompt[json.dumps(ids)]["payload"]
        row = []
        for j in range(payload["n"]):
            choice = oracle_choice(tokenizer, ids, payload, j)
            text = choice["text"]
            row.append(
                (
                    choice["token_ids"],
                    [{"role": "assistant", "content": text}] if conversational else text,
                    choice["finish_reason"] == "stop",
                )
            )
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# Requests and answers
# ---------------------------------------------------------------------------------------------------------------------


def test_prompts_parameters_and_completions_follow_the_server(model_tokenizer):
    tokenizer = model_tokenizer
    prompts = _conversational(12)
    state = FakeState(tokenizer)
    options = SamplingOptions(temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=8)
    with fake_server(state) as url:
        sampler = _sampler(url + "/", tokenizer, options, max_concurrency=4)  # a trailing slash is ignored
        assert sampler.stop_ids == [EOS, END] and sampler.base_urls == [url]
        rows = sampler.sample(prompts, 3, seed=5, key="chunk")
    sampler.close()
    requests = state.served_requests()
    assert len(requests) == len(state.log) == 12
    # The prompts arrive as the chat template's token ids, generation prompt included; one request per prompt.
    rendered = [
        tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        for p in prompts
    ]
    assert rendered[0] == tokenizer("<|user|>\nWhat is 0 plus 0?<|end|>\n<|assistant|>\n")["input_ids"]
    assert sorted(map(json.dumps, (e["payload"]["prompt"] for e in requests))) == sorted(map(json.dumps, rendered))
    chunk_seed = keyed_seed(5, "chunk")
    for entry in requests:
        payload = entry["payload"]
        index = rendered.index(payload["prompt"])
        assert payload["seed"] == keyed_seed(chunk_seed, index) % 2**31
        assert {k: payload[k] for k in ("model", "n", "max_tokens", "temperature", "top_p", "top_k")} == dict(
            model=MODEL, n=3, max_tokens=8, temperature=0.7, top_p=0.9, top_k=20
        )
        assert payload["stop_token_ids"] == [EOS, END] and payload["return_token_ids"] is True
    # Results in prompt order, each the server's answer to that prompt, the stop token kept in the ids.
    assert _as_tuples(rows) == _expected(tokenizer, state, prompts)
    flat = [x for row in rows for x in row]
    ends = {x.completion_ids[-1] for x in flat if x.finished}
    assert ends == {EOS, END} and any(not x.finished and len(x.completion_ids) == 8 for x in flat)
    # Another chunk key, other seeds; top_k 0 is sent as -1 (off).
    state = FakeState(tokenizer)
    with fake_server(state) as url:
        other = _sampler(url, tokenizer, SamplingOptions(max_new_tokens=8)).sample(prompts[:2], 3, seed=5, key="x")
    assert _as_tuples(other) != _as_tuples(rows[:2]) and {e["payload"]["top_k"] for e in state.log} == {-1}


def test_standard_prompts_get_text_completions(model_tokenizer):
    tokenizer = model_tokenizer
    prompts = ["the sky is", "one two"]
    state = FakeState(tokenizer)
    with fake_server(state) as url:
        rows = _sampler(url, tokenizer).sample(prompts, 2, seed=0)
    assert all(isinstance(x.completion, str) for row in rows for x in row)
    assert _as_tuples(rows) == _expected(tokenizer, state, prompts, conversational=False)


@pytest.mark.parametrize("options", [SamplingOptions(do_sample=False), SamplingOptions(temperature=0.0)])
def test_greedy_asks_one_completion_and_copies_it(model_tokenizer, options):
    state = FakeState(model_tokenizer)
    with fake_server(state) as url:
        rows = _sampler(url, model_tokenizer, options).sample(_conversational(3), 4, seed=0)
    for entry in state.log:
        payload = entry["payload"]
        assert (payload["n"], payload["temperature"], payload["top_p"], payload["top_k"]) == (1, 0.0, 1.0, -1)
    expected = _expected(model_tokenizer, state, _conversational(3))
    assert _as_tuples(rows) == [row * 4 for row in expected]


def test_text_prompts_get_one_bos_not_two():
    """`server_token_ids: false`: the server tokenizes the text with its special tokens (vLLM's default); a chat
    template that writes the BOS and a tokenizer that adds one would double it if the rendered text were sent."""
    from tokenizers.processors import TemplateProcessing

    tokenizer = build_tokenizer(chat_template="{{ bos_token }}" + CHAT_TEMPLATE)
    tokenizer._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    bos = tokenizer.bos_token_id
    prompts = _conversational(3)
    rendered = tokenizer.apply_chat_template(prompts[0], add_generation_prompt=True, tokenize=False)
    assert tokenizer(rendered)["input_ids"][:2] == [bos, bos]  # the trap
    for batch, conversational in ((prompts, True), (["the sky is", "one two"], False)):
        expected_ids = encode_prompts(tokenizer, batch)
        assert all(ids[0] == bos and ids[1] != bos for ids in expected_ids)
        state = FakeState(tokenizer)
        with fake_server(state) as url:
            sampler = _sampler(url, tokenizer, token_ids=False, stop_ids=[tokenizer.eos_token_id])
            rows = sampler.sample(batch, 2, seed=0)
        sent = [e["payload"]["prompt"] for e in state.log]
        assert all(isinstance(text, str) and not text.startswith("<s>") for text in sent)
        # What the server tokenized is exactly what the transformers backend generates from.
        assert sorted(map(json.dumps, (e["prompt_ids"] for e in state.log))) == sorted(map(json.dumps, expected_ids))
        assert _as_tuples(rows) == _expected(tokenizer, state, batch, conversational)


def test_completion_ids_without_ids_or_stop_token_from_the_server(model_tokenizer):
    """A server that answers no token ids: the text is re-tokenized and the stop token it reports appended; one that
    leaves the stop token out of its ids: it is appended (`stop_reason`, else the EOS)."""
    tokenizer = model_tokenizer
    prompts = _conversational(6)
    clean = FakeState(tokenizer)
    with fake_server(clean) as url:
        reference = _as_tuples(_sampler(url, tokenizer).sample(prompts, 3, seed=1))
    without_stop = FakeState(tokenizer, stop_in_ids=False)
    with fake_server(without_stop) as url:
        assert _as_tuples(_sampler(url, tokenizer).sample(prompts, 3, seed=1)) == reference
    without_ids = FakeState(tokenizer, token_ids=False)
    with fake_server(without_ids) as url:
        rows = _sampler(url, tokenizer).sample(prompts, 3, seed=1)
    for row, expected in zip(rows, reference, strict=True):
        for sample, (ids, completion, finished) in zip(row, expected, strict=True):
            text = completion[0]["content"]
            retokenized = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert sample.completion == completion and sample.finished == finished
            assert sample.completion_ids == retokenized + ([ids[-1]] if finished else [])


# ---------------------------------------------------------------------------------------------------------------------
# Concurrency, retries, errors
# ---------------------------------------------------------------------------------------------------------------------


def test_two_servers_share_the_load_within_max_concurrency(model_tokenizer):
    prompts = _conversational(24)
    state = FakeState(model_tokenizer, delay=0.05)  # shared by both servers: in flight over both
    with fake_server(state, "a") as url_a, fake_server(state, "b") as url_b:
        sampler = _sampler([url_a, url_b], model_tokenizer, max_concurrency=3)
        assert sampler.base_urls == [url_a, url_b]
        rows = sampler.sample(prompts, 2, seed=0)
    counts = {name: sum(e["server"] == name for e in state.log) for name in "ab"}
    assert 2 <= state.max_in_flight <= 3, state.max_in_flight
    assert min(counts.values()) >= 6, counts
    single = FakeState(model_tokenizer)
    with fake_server(single) as url:
        alone = _sampler(url, model_tokenizer, max_concurrency=1).sample(prompts, 2, seed=0)
    assert _as_tuples(rows) == _as_tuples(alone)  # nor the server nor the concurrency change the completions


def test_retries_after_errors_drops_and_timeouts_lose_and_duplicate_nothing(model_tokenizer):
    prompts = _conversational(8)
    clean = FakeState(model_tokenizer)
    with fake_server(clean) as url:
        reference = _as_tuples(_sampler(url, model_tokenizer).sample(prompts, 3, seed=2))
    state = FakeState(model_tokenizer)
    state.faults = ["503", "drop", "429", "drop_after", "503", "slow", "drop", "500"]
    state.slow_s = 3.0
    with fake_server(state) as url:
        rows = _sampler(url, model_tokenizer, max_concurrency=2, timeout=1.0, max_retries=8).sample(prompts, 3, seed=2)
    assert _as_tuples(rows) == reference
    assert len(state.log) == len(prompts) + 8  # each fault cost one retry
    served = [json.dumps(e["prompt_ids"]) for e in state.served_requests()]
    assert len(set(served)) == len(prompts)  # all served; the dropped-after-serving and slow ones twice


def test_a_failing_server_hands_its_requests_to_another(model_tokenizer):
    prompts = _conversational(8)
    failing, working = FakeState(model_tokenizer), FakeState(model_tokenizer)
    with fake_server(failing, "a") as url_a, fake_server(working, "b") as url_b:
        sampler = _sampler([url_a, url_b], model_tokenizer, max_concurrency=2, max_retries=1)
        failing.down = True
        rows = sampler.sample(prompts, 2, seed=0)
    assert failing.log and not failing.served_requests() and len(working.served_requests()) == len(prompts)
    assert _as_tuples(rows) == _expected(model_tokenizer, working, prompts)


def test_a_refused_request_is_one_line_and_not_retried(model_tokenizer):
    state = FakeState(model_tokenizer, max_model_len=64)
    with fake_server(state) as url:
        sampler = _sampler(url, model_tokenizer, SamplingOptions(max_new_tokens=100), max_concurrency=1)
        with pytest.raises(ServerError) as error:
            sampler.sample(_conversational(3), 2, seed=0)
    message = str(error.value)
    assert "\n" not in message and f"{url}/completions answered HTTP 400" in message
    assert "maximum context length is 64 tokens" in message
    assert len(state.log) == 1
    # A server that takes text prompts only (TGI answers 422 to token ids): the fix is named.
    state = FakeState(model_tokenizer, text_only=True)
    with fake_server(state) as url:
        with pytest.raises(ServerError, match=r"answered HTTP 422: .*needs server_token_ids false\)$"):
            _sampler(url, model_tokenizer).sample(_conversational(1), 2, seed=0)
        assert len(_sampler(url, model_tokenizer, token_ids=False).sample(_conversational(1), 2, seed=0)[0]) == 2


def test_a_server_that_stays_down_is_one_line_after_the_retries(model_tokenizer):
    state = FakeState(model_tokenizer)
    with fake_server(state) as url:
        sampler = _sampler(url, model_tokenizer, max_retries=3, max_concurrency=1)
        state.down = True  # answers 503 to everything
        with pytest.raises(ServerError) as failing:
            sampler.sample(_conversational(4), 2, seed=0)
    # The server is gone: connections are refused.
    start = time.perf_counter()
    with pytest.raises(ServerError) as gone:
        sampler.sample(_conversational(4), 2, seed=0)
    assert time.perf_counter() - start < 5
    for error, reason in ((failing, "HTTP 503: server busy"), (gone, "Connection refused")):
        message = str(error.value)
        assert "\n" not in message and message.startswith(f"server(s) {url} unreachable after 3 retries"), message
        assert reason in message and message.endswith("finished chunks are kept, re-run the same command to resume.")
    assert len(state.log) == 4  # 1 + 3 retries of the first prompt, which stopped the others


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_servers_and_other_models_are_one_line_errors(model_tokenizer, caplog):
    tokenizer = model_tokenizer
    nowhere = f"http://127.0.0.1:{_free_port()}/v1"
    with pytest.raises(ServerError, match=rf"^cannot reach the server at {nowhere} \(.*refused.*\); start it"):
        _sampler(nowhere, tokenizer)
    with pytest.raises(ServerError, match="is not an http"):
        _sampler("127.0.0.1:8000/v1", tokenizer)
    other = FakeState(tokenizer, served=("other-model",))
    ours = FakeState(tokenizer)
    with fake_server(other) as other_url, fake_server(ours) as our_url:
        with pytest.raises(ServerError) as error:
            _sampler(other_url, tokenizer)
        message = str(error.value)
        assert "\n" not in message and f"no server serves model `tiny` ({other_url} serves other-model)" in message
        assert "server_model_names" in message
        # The servers of the model are used, the others left out.
        sampler = _sampler([other_url, our_url], tokenizer)
        assert sampler.base_urls == [our_url]
        sampler.sample(_conversational(3), 1, seed=0)
        with pytest.raises(ServerError, match=r"HTTP 404: Not Found \(server_base_url is the API base, .*/v1"):
            _sampler(our_url.removesuffix("/v1"), tokenizer)
    assert len(ours.log) == 3 and not other.log


def test_the_api_key_is_sent_as_a_bearer_token(model_tokenizer):
    state = FakeState(model_tokenizer)
    with fake_server(state) as url:
        _sampler(url, model_tokenizer, api_key="sk-test").sample(_conversational(2), 1, seed=0)
        assert [h.get("Authorization") for h in state.headers] == ["Bearer sk-test"] * 3  # /models, 2 completions
        state.headers.clear()
        _sampler(url, model_tokenizer).sample(_conversational(1), 1, seed=0)
        assert [h.get("Authorization") for h in state.headers] == [None, None]


# ---------------------------------------------------------------------------------------------------------------------
# `trl-nca generate --backend server`
# ---------------------------------------------------------------------------------------------------------------------


def _write_config(tmp_path, model_dir, url, name, n_prompts=6, **overrides) -> Path:
    """A `trl-nca generate` config sampling `n_prompts` chat prompts from the server at `url` (which serves the model
    as `MODEL`), scored by their length. Shared with tests/test_vllm_server.py."""
    prompts = tmp_path / f"prompts-{n_prompts}.jsonl"
    if not prompts.exists():
        rows = [{"prompt": p, "answer": str(2 * i)} for i, p in enumerate(_conversational(n_prompts))]
        prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rewards = tmp_path / "rewards.py"
    rewards.write_text(
        "def length(completions, **kwargs):\n    return [float(len(c[0]['content'])) for c in completions]\n"
    )
    config = dict(
        dataset_name=str(prompts),
        model_name_or_path=[model_dir],
        backend="server",
        server_base_url=[url],
        server_model_names=[MODEL],
        num_completions=3,
        max_new_tokens=8,
        temperature=0.8,
        reward_funcs=[f"{rewards}:length"],
        chunk_size=1,
        deduplicate=False,
        output_dir=str(tmp_path / name),
    )
    config.update(overrides)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_generate_with_the_server_backend_writes_the_servers_completions(tmp_path, tiny_model_dir, model_tokenizer):
    from trl_nca.scripts.generate import main

    state = FakeState(model_tokenizer)
    with fake_server(state) as url:
        assert main([str(_write_config(tmp_path, tiny_model_dir, url, "out"))]) == 0
    rows = _rows(tmp_path / "out")
    prompts = _conversational(6)
    assert [row["prompt"] for row in rows] == prompts and len(state.log) == 6
    expected = _expected(model_tokenizer, state, prompts)
    for index, (row, want) in enumerate(zip(rows, expected, strict=True)):
        assert row["completions"] == [completion for _, completion, _ in want]
        assert row["rewards"] == [float(len(c[0]["content"])) for c in row["completions"]]
        assert row["answer"] == str(2 * index) and row["models"] == [Path(tiny_model_dir).name] * 3
        chunk = json.loads((tmp_path / "out" / "chunks" / "samples-0" / f"chunk-{index:06d}.json").read_text())
        assert [x["completion_ids"] for x in chunk[0]["samples"]] == [ids for ids, _, _ in want]
        # The seed of a prompt: the chunk's key, then its place in the chunk.
        entry = next(e for e in state.log if e["prompt_ids"] == encode_prompts(model_tokenizer, [prompts[index]])[0])
        assert entry["payload"]["seed"] == keyed_seed(keyed_seed(0, chunk_key(0, index)), 0) % 2**31


def test_a_run_whose_server_failed_resumes_to_the_rows_of_an_uninterrupted_one(
    tmp_path, tiny_model_dir, model_tokenizer, capsys, monkeypatch
):
    from trl_nca.scripts.generate import main

    monkeypatch.setattr(server_module, "_BACKOFF_BASE_S", 0.01)
    state = FakeState(model_tokenizer)
    with fake_server(state) as url:
        assert main([str(_write_config(tmp_path, tiny_model_dir, url, "whole"))]) == 0
    whole = _rows(tmp_path / "whole")

    state = FakeState(model_tokenizer)
    state.fail_after = 3  # the server serves 3 requests (3 chunks of one prompt), then answers 503
    with fake_server(state) as url:
        flags = ["--server_max_concurrency", "1", "--server_max_retries", "2"]
        config = str(_write_config(tmp_path, tiny_model_dir, url, "failed"))
        capsys.readouterr()
        assert main([config, *flags]) == 2
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if "error" in line.lower()]
        assert len(errors) == 1 and "Traceback" not in err, err[-2000:]
        assert errors[0].startswith(f"trl-nca generate: error: server(s) {url} unreachable after 2 retries")
        chunks = tmp_path / "failed" / "chunks" / "samples-0"
        committed = {path.name: path.read_bytes() for path in chunks.glob("chunk-*.json")}
        assert len(committed) == 3 and not (tmp_path / "failed" / "data.jsonl").exists()

        state.down, state.fail_after = False, None  # the server is back
        assert main([config, *flags]) == 0
    assert _rows(tmp_path / "failed") == whole
    assert {name: (chunks / name).read_bytes() for name in committed} == committed  # kept as they were
    stats = json.loads((tmp_path / "failed" / "stats.json").read_text())
    assert stats["chunks_computed"][f"sampling/{Path(tiny_model_dir).name}"] == 3
    served = [json.dumps(e["prompt_ids"]) for e in state.served_requests()]
    assert len(served) == len(set(served)) == 6  # each prompt sampled once over both runs
