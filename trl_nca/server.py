"""Backend `server`: sampling from OpenAI-compatible inference servers (`vllm serve`, `trl vllm-serve`, SGLang, TGI).

`ServerSampler` sends one `POST {base_url}/completions` per prompt, asking for all its samples at once (`n`), to the
servers among `base_urls` whose `GET {base_url}/models` lists the model. A base URL is the API root the `openai` client
takes, e.g. `http://node1:8000/v1` (a trailing slash is ignored; nothing is appended). Only the standard library is
used (`urllib.request`, `json`, threads).

What is sent, so that the samples are those of the `transformers` and `vllm` backends:

- the prompt as the token ids `encode_prompts` renders locally (chat template and generation prompt for conversational
  prompts), which vLLM and SGLang take as `prompt`; with `token_ids=False`, the text of those ids instead, without the
  special tokens the server's tokenizer adds itself (its BOS), so the server, which adds them, sees one BOS, not two;
- `n`, `max_tokens`, `temperature`, `top_p`, `top_k` (`-1`: off) and a `seed` per prompt, derived from the chunk's
  seed and the prompt's position, so a prompt's completions do not depend on the server or the concurrency that served
  it; greedy decoding (`do_sample=False` or a temperature below vLLM's greedy threshold) asks for one completion at
  temperature 0 and copies it, as the `vllm` backend does;
- `stop_token_ids` (the tokenizer's EOS and the model's `generation_config.eos_token_id`), `skip_special_tokens`,
  and `return_token_ids` (vLLM >= 0.10.2 then answers each choice's `token_ids` and the `prompt_token_ids`).
  Parameters other than these (e.g. `repetition_penalty`) are left to the server, which by default (vLLM's
  `--generation-config auto`) takes them from the model's `generation_config.json`, as `model.generate` does.

What comes back: vLLM's `token_ids` end with the stop token when a completion stopped on one (`finish_reason` "stop";
its `stop_reason` is the token id for a `stop_token_ids` match and null for the EOS). A server that answers no token
ids gets its text re-tokenized, and the stop token it reports (`stop_reason`, else the EOS) appended, so
`completion_ids` end with the stop token as GRPOTrainer's do (`decode_sample`).

Requests run on daemon threads, at most `max_concurrency` in flight over all servers, each sent to the least-loaded
server (ties to the least-used, so the load is dealt round-robin). A connection error, a timeout, or an HTTP 5xx or 429
answer is retried, on another server when there is one, after 1, 2, 4, ... s (at most 60 s); after `max_retries`
retries the run stops with a one-line `ServerError`, and a re-run resumes from the committed chunks. Any other 4xx
answer (e.g. `max_tokens` beyond the context) is a `ServerError` at once, with the server's message.
"""

from __future__ import annotations

import http.client
import json
import queue
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase
from transformers.utils import logging
from trl.data_utils import is_conversational

from trl_nca.generation import (
    Prompt,
    Sample,
    Sampler,
    SamplingOptions,
    decode_sample,
    encode_prompts,
    keyed_seed,
    load_generation_config,
    stop_token_ids,
    vllm_request,
)

logger = logging.get_logger(__name__)

# Backoff before the n-th retry of a request: `_BACKOFF_BASE_S * 2 ** (n - 1)` seconds, at most `_BACKOFF_MAX_S`.
_BACKOFF_BASE_S = 1.0
_BACKOFF_MAX_S = 60.0
# Seconds to wait for `GET /models` at start (an unreachable host should not hold the run for `timeout`).
_MODELS_TIMEOUT_S = 30.0


class ServerError(ValueError):
    """An inference server of backend `server` is unreachable, serves another model, or refused a request."""


class _Transient(Exception):
    """A failed attempt worth retrying: a connection error, a timeout, an HTTP 5xx or 429 answer."""


class _Aborted(Exception):
    """Another request of the same call failed for good; this one stops."""


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _error_message(body: bytes) -> str:
    """The message of an error answer: OpenAI/vLLM `{"error": {"message"}}`, TGI `{"error": str}`, vLLM's older
    `{"message"}`, FastAPI's `{"detail"}`, else the body itself."""
    text = body.decode("utf-8", "replace")
    try:
        data = json.loads(text)
    except ValueError:
        return _one_line(text) or "(empty answer)"
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and error.get("message"):
            return _one_line(error["message"])
        for value in (error, data.get("message"), data.get("detail")):
            if value:
                return _one_line(value if isinstance(value, str) else json.dumps(value))
    return _one_line(text)


def _reason(error: BaseException) -> str:
    """A short description of a failed attempt."""
    if isinstance(error, urllib.error.URLError) and not isinstance(error, urllib.error.HTTPError):
        error = error.reason if isinstance(error.reason, BaseException) else error
    if isinstance(error, TimeoutError):
        return "timed out"
    return _one_line(f"{type(error).__name__}: {error}" if str(error) else type(error).__name__, 160)


def _normalized(base_urls: Sequence[str] | str) -> list[str]:
    urls: list[str] = []
    for raw in [base_urls] if isinstance(base_urls, str) else list(base_urls):
        url = str(raw).strip().rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise ServerError(
                f"server_base_url `{raw}` is not an http(s) URL; give the API base of each server, e.g. "
                "http://127.0.0.1:8000/v1."
            )
        if url not in urls:
            urls.append(url)
    if not urls:
        raise ServerError(
            "backend `server` needs `server_base_url`: the API base of each server, e.g. http://host:8000/v1."
        )
    return urls


def _special_affixes(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """The ids the tokenizer adds around a text by itself (e.g. `[bos]` and `[]`), which a server adds too."""
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    full = list(tokenizer("a")["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    return [], []


class ServerSampler(Sampler):
    """Samples completions from OpenAI-compatible servers at `base_urls` serving `model` (see the module docstring).

    Args:
        base_urls: API bases of the servers (`http://host:8000/v1`); those whose `/models` lists `model` are used.
        model: The name the model is served under (`vllm serve --served-model-name`).
        tokenizer: The model's tokenizer: renders the prompts, decodes the completions.
        options: Sampling options (`max_new_tokens` is the request's `max_tokens`).
        api_key: Sent as `Authorization: Bearer API_KEY` when given.
        token_ids: Send prompts as token ids (vLLM, SGLang); `False` sends their text.
        max_concurrency: Requests (one prompt and its samples each) in flight at once, over all servers.
        max_retries: Retries of a request after a connection error, a timeout or an HTTP 5xx/429 answer.
        timeout: Seconds to wait for the server at each step of a request (connecting, reading its answer).
        chat_template_kwargs: Extra `apply_chat_template` arguments for conversational prompts.
        tools: Tools rendered by the chat template.
        name: The model's label (the `models` column).
        stop_ids: Token ids that end a completion; default: the tokenizer's EOS and the `eos_token_id` of the
            `generation_config.json` next to the tokenizer (`tokenizer.name_or_path`), as the other backends stop.
        backoff_s: Delay before the first retry (doubled for each next one, at most 60 s); default 1 s.
    """

    def __init__(
        self,
        base_urls: Sequence[str] | str,
        model: str,
        tokenizer: PreTrainedTokenizerBase,
        options: SamplingOptions,
        *,
        api_key: str | None = None,
        token_ids: bool = True,
        max_concurrency: int = 32,
        max_retries: int = 8,
        timeout: float = 600.0,
        chat_template_kwargs: dict[str, Any] | None = None,
        tools: list | None = None,
        name: str = "model",
        stop_ids: Sequence[int] | None = None,
        backoff_s: float | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.options = options
        self.api_key = api_key
        self.token_ids = token_ids
        self.max_concurrency = max(1, int(max_concurrency))
        self.max_retries = max(0, int(max_retries))
        self.timeout = float(timeout)
        self.chat_template_kwargs = chat_template_kwargs
        self.tools = tools
        self.name = name
        self.backoff_s = _BACKOFF_BASE_S if backoff_s is None else float(backoff_s)
        if stop_ids is None:
            stop_ids = stop_token_ids(load_generation_config(getattr(tokenizer, "name_or_path", None)), tokenizer)
        self.stop_ids = [int(token) for token in stop_ids]
        eos = tokenizer.eos_token_id
        self.eos_id = int(eos) if eos is not None else (self.stop_ids[0] if self.stop_ids else None)
        self._affixes = _special_affixes(tokenizer) if not token_ids else ([], [])
        self._warned: set[str] = set()
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(self.max_concurrency)

        urls = _normalized(base_urls)
        served = {url: self._served_models(url) for url in urls}
        self.base_urls = [url for url in urls if model in served[url]]
        if not self.base_urls:
            listing = "; ".join(f"{url} serves {', '.join(names) or 'no model'}" for url, names in served.items())
            raise ServerError(
                f"no server serves model `{model}` ({listing}); set server_model_names to the served name "
                f"(`vllm serve --served-model-name`), or point server_base_url at servers of `{model}`."
            )
        if len(self.base_urls) < len(urls):
            others = [url for url in urls if url not in self.base_urls]
            logger.warning(f"{', '.join(others)} do not serve `{model}`; sampling {name} from the others.")
        self._in_flight = dict.fromkeys(self.base_urls, 0)
        self._used = dict.fromkeys(self.base_urls, 0)
        self._down_until = dict.fromkeys(self.base_urls, 0.0)

    # -- HTTP ---------------------------------------------------------------------------------------------------------

    def _call(self, url: str, payload: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        """One attempt: GET (no payload) or POST `payload` as JSON; the JSON answer back. `_Transient` for what is
        worth retrying, `ServerError` for a refusal (HTTP 4xx other than 429)."""
        headers = {"Accept": "application/json", "User-Agent": "trl-nca"}
        data = None
        if payload is not None:
            data = json.dumps(payload).encode()
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(url, data=data, headers=headers, method="POST" if data else "GET")
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.timeout) as response:
                body = response.read()
        except urllib.error.HTTPError as error:
            try:
                message = _error_message(error.read())
            except (OSError, http.client.HTTPException):
                message = error.reason or "(no message)"
            if error.code == 429 or error.code >= 500:
                raise _Transient(f"HTTP {error.code}: {message}") from None
            hint = ""
            if error.code in (401, 403):
                hint = " (check the API key: the environment variable named by server_api_key_env)"
            elif error.code == 404 and not url.rsplit("/", 1)[0].endswith("/v1"):
                hint = " (server_base_url is the API base, which ends with /v1 for vLLM: http://host:8000/v1)"
            elif error.code == 422 and payload is not None and isinstance(payload.get("prompt"), list):
                hint = " (a server that takes no token ids as prompt needs server_token_ids false)"
            raise ServerError(f"{url} answered HTTP {error.code}: {message}{hint}") from None
        except (OSError, http.client.HTTPException) as error:  # URLError, ConnectionError, TimeoutError, ...
            raise _Transient(_reason(error)) from None
        try:
            return json.loads(body)
        except ValueError:
            raise _Transient(
                f"an answer that is not JSON: {_one_line(body.decode('utf-8', 'replace'), 120)}"
            ) from None

    def _served_models(self, url: str) -> list[str]:
        try:
            answer = self._call(f"{url}/models", timeout=min(self.timeout, _MODELS_TIMEOUT_S))
        except _Transient as error:
            raise ServerError(
                f"cannot reach the server at {url} ({error}); start it (e.g. `vllm serve MODEL`, and wait until it "
                "answers /health) or check server_base_url."
            ) from None
        data = answer.get("data") if isinstance(answer, dict) else None
        if not isinstance(data, list):
            raise ServerError(
                f"{url}/models did not answer an OpenAI model list; server_base_url is the API base of an "
                "OpenAI-compatible server, e.g. http://host:8000/v1."
            )
        return [str(entry.get("id")) for entry in data if isinstance(entry, dict)]

    def _pick(self, avoid: str | None) -> str:
        """The least-loaded server (ties: the least used), not `avoid` nor one that just failed when others remain."""
        with self._lock:
            now = time.monotonic()
            others = [url for url in self.base_urls if url != avoid] or self.base_urls
            candidates = [url for url in others if self._down_until[url] <= now] or others
            url = min(candidates, key=lambda u: (self._in_flight[u], self._used[u]))
            self._in_flight[url] += 1
            self._used[url] += 1
            return url

    def _complete(self, payload: dict[str, Any], abort: threading.Event) -> tuple[str, Any]:
        """POST `payload` to `/completions`, retrying with backoff; (the server that answered, its answer)."""
        failed: list[str] = []
        last = ""
        url = None
        for attempt in range(self.max_retries + 1):
            if attempt and abort.wait(min(self.backoff_s * 2 ** (attempt - 1), _BACKOFF_MAX_S)):
                raise _Aborted
            while not self._slots.acquire(timeout=0.5):
                if abort.is_set():
                    raise _Aborted
            url = self._pick(url)
            try:
                if abort.is_set():
                    raise _Aborted
                answer = self._call(f"{url}/completions", payload)
            except _Transient as error:
                last = f"{url}: {error}"
                if url not in failed:
                    failed.append(url)
                with self._lock:
                    self._down_until[url] = time.monotonic() + min(self.backoff_s * 2**attempt, _BACKOFF_MAX_S)
                continue
            finally:
                with self._lock:
                    self._in_flight[url] -= 1
                self._slots.release()
            with self._lock:
                self._down_until[url] = 0.0
            return url, answer
        raise ServerError(
            f"server(s) {', '.join(failed)} unreachable after {self.max_retries} retries (last error: {last}); "
            "finished chunks are kept, re-run the same command to resume."
        )

    # -- Sampling -----------------------------------------------------------------------------------------------------

    def _prompt_text(self, ids: list[int]) -> str:
        """The text of prompt `ids` for a server that tokenizes it: without the special tokens its tokenizer adds."""
        prefix, suffix = self._affixes
        body = ids
        if prefix and body[: len(prefix)] == prefix:
            body = body[len(prefix) :]
        if suffix and body[len(body) - len(suffix) :] == suffix:
            body = body[: len(body) - len(suffix)]
        text = self.tokenizer.decode(body, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if list(self.tokenizer(text)["input_ids"]) != ids:
            self._warn_once(
                "text",
                f"server_token_ids false: a prompt's text does not re-tokenize to its rendered token ids, so the "
                f"servers sample {self.name} from other tokens than the transformers backend would; send token ids "
                "if the servers take them.",
            )
        return text

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message)

    def _payloads(self, encoded: list[list[int]], request: dict[str, Any], seed: int) -> list[dict[str, Any]]:
        common: dict[str, Any] = dict(
            model=self.model,
            **request,
            stop_token_ids=self.stop_ids,
            skip_special_tokens=True,
            return_token_ids=True,
        )
        return [
            dict(
                common,
                prompt=ids if self.token_ids else self._prompt_text(ids),
                seed=keyed_seed(seed, index) % (2**31),
            )
            for index, ids in enumerate(encoded)
        ]

    def _generate(self, prompts: Sequence[Prompt], num_samples: int, seed: int) -> list[list[Sample]]:
        conversational = is_conversational({"prompt": prompts[0]})
        encoded = encode_prompts(self.tokenizer, prompts, self.tools, self.chat_template_kwargs)
        copies, request = vllm_request(self.options, num_samples)
        n = request["n"]
        payloads = self._payloads(encoded, request, seed)
        answers = self._run_all(payloads)
        results = []
        for ids, (url, answer) in zip(encoded, answers, strict=True):
            choices = answer.get("choices") if isinstance(answer, dict) else None
            if not isinstance(choices, list) or len(choices) != n:
                got = f"{len(choices)} choices" if isinstance(choices, list) else _one_line(json.dumps(answer), 160)
                raise ServerError(f"{url}/completions answered {got} for a request of n={n} completions.")
            choices = sorted(choices, key=lambda choice: choice.get("index", 0))
            served_prompt = choices[0].get("prompt_token_ids")
            if isinstance(served_prompt, list) and list(served_prompt) != ids:
                self._warn_once(
                    "prompt",
                    f"{url} sampled {self.name} from other prompt tokens than the local tokenizer renders; check that "
                    "the server runs the same tokenizer and chat template.",
                )
            samples = [self._sample(choice, conversational) for choice in choices]
            results.append([sample for sample in samples for _ in range(copies)])
        return results

    def _run_all(self, payloads: list[dict[str, Any]]) -> list[tuple[str, Any]]:
        """Each payload's answer, in order, from at most `max_concurrency` daemon threads (a failed run does not wait
        at exit for requests still in flight, as a `ThreadPoolExecutor`'s threads would)."""
        jobs: queue.SimpleQueue[int] = queue.SimpleQueue()
        for index in range(len(payloads)):
            jobs.put(index)
        done: queue.SimpleQueue[tuple[int, Any, BaseException | None]] = queue.SimpleQueue()
        abort = threading.Event()

        def worker() -> None:
            while not abort.is_set():
                try:
                    index = jobs.get_nowait()
                except queue.Empty:
                    return
                try:
                    done.put((index, self._complete(payloads[index], abort), None))
                except BaseException as error:  # handed to the caller
                    done.put((index, None, error))
                    return

        for number in range(min(self.max_concurrency, len(payloads))):
            threading.Thread(target=worker, name=f"trl-nca-server-{number}", daemon=True).start()
        answers: list[Any] = [None] * len(payloads)
        try:
            for _ in range(len(payloads)):
                index, answer, error = done.get()
                if error is not None:
                    raise error
                answers[index] = answer
        finally:
            abort.set()
        return answers

    def _sample(self, choice: dict[str, Any], conversational: bool) -> Sample:
        """A `Sample` from one choice: its token ids (or its re-tokenized text), ending with the stop token it stopped
        on."""
        ids = choice.get("token_ids")
        if not isinstance(ids, list):
            self._warn_once(
                "ids",
                f"the server answers no completion token ids (vLLM >= 0.10.2 does with `return_token_ids`); the "
                f"completion_ids of {self.name} are its re-tokenized text.",
            )
            ids = self.tokenizer(choice.get("text") or "", add_special_tokens=False)["input_ids"]
        ids = [int(token) for token in ids]
        stops = list(self.stop_ids)
        stopped = choice.get("finish_reason") == "stop"
        reason = choice.get("stop_reason")
        token = reason if isinstance(reason, int) and not isinstance(reason, bool) else None
        if stopped and token is not None and token not in stops:  # a stop token of the server's own
            stops.append(token)
        if stopped and reason in (None, token) and not any(t in stops for t in ids):
            stop = token if token is not None else self.eos_id
            if stop is not None:  # the server left the stop token out
                ids.append(stop)
                if stop not in stops:
                    stops.append(stop)
        sample = decode_sample(self.tokenizer, ids, stops, conversational)
        if stopped:  # also on a stop string, which leaves no token
            sample.finished = True
        return sample

    def close(self) -> None:
        """Nothing to free: requests run on daemon threads that end with each call."""
