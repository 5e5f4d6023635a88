"""The offline demo (`trl-nca demo`) and the reproduction driver: reward function, data plumbing, an end-to-end run at
the tiny size (artifacts, consistency, determinism) and the claim verdicts of the results report."""

import json
import random

import pytest
import torch

from trl_nca.demo import pipeline as P
from trl_nca.demo.task import demonstrate, format_prompt, ideal_answer, parse_prompt, sort_reward, sort_reward_func

PROMPT = format_prompt([7, 3, 9, 3, 1])  # ideal answer "1 3 3 7 9"


# ---------------------------------------------------------------------------------------------------------------------
# The reward
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "response, expected",
    [
        ("1 3 3 7 9", 1.0),  # exact
        ("  1 3 3 7 9\n", 1.0),  # whitespace is not content
        ("1 3 7 3 9", 0.8),  # one adjacent swap
        ("1 3 7 9", 0.8),  # one dropped digit
        ("1 3 3 5 7 9", 5 / 6),  # one extra digit
        ("1 3 4 7 9", 0.8),  # one wrong digit
        ("1 3 x 7 9", 0.8),  # a non-digit token never matches
        ("1 3 3 7 9,", 0.8),  # "9," is not "9"
        ("7 3 9 3 1", 0.4),  # the unsorted copy: longest sorted subsequence "3 3"
        ("9 7 3 3 1", 0.4),  # reversed
        ("", 0.0),
        ("hello", 0.0),
        ("1 3 3 7 9 1 3 3 7 9", 0.5),  # repeated answer: length penalty
    ],
)
def test_sort_reward_hand_written(response, expected):
    assert sort_reward(PROMPT, response) == pytest.approx(expected)


def test_prompt_round_trip_and_ideal_answer():
    assert PROMPT == "Sort ascending: 7 3 9 3 1"
    assert parse_prompt(PROMPT) == [7, 3, 9, 3, 1]
    assert ideal_answer([7, 3, 9, 3, 1]) == "1 3 3 7 9"
    with pytest.raises(ValueError):
        parse_prompt("Sort descending: 1 2")


def test_demonstrator_is_imperfect_but_graded():
    rng = random.Random(0)
    digits = [[rng.randrange(10) for _ in range(rng.randint(3, 7))] for _ in range(400)]
    perfect = [demonstrate(d, random.Random(i), p_correct=1.0) for i, d in enumerate(digits)]
    assert all(sort_reward(format_prompt(d), y) == 1.0 for d, y in zip(digits, perfect))
    noisy_rng = random.Random(1)
    rewards = [sort_reward(format_prompt(d), demonstrate(d, noisy_rng, p_correct=0.4)) for d in digits]
    exact = sum(r == 1.0 for r in rewards) / len(rewards)
    assert 0.3 < exact < 0.6  # p_correct plus corruptions that happen to be harmless (e.g. swapping equal digits)
    assert all(0.0 <= r <= 1.0 for r in rewards)
    assert len({round(r, 3) for r in rewards}) >= 5  # many distinct reward levels, not just 0/1
    # same generator state -> same demonstration
    assert demonstrate([5, 1, 4], random.Random(7), 0.0) == demonstrate([5, 1, 4], random.Random(7), 0.0)


# ---------------------------------------------------------------------------------------------------------------------
# Data plumbing
# ---------------------------------------------------------------------------------------------------------------------


def _row(texts, rewards):
    return {
        "prompt": P.user_message([3, 1, 2]),
        "completions": [P.assistant_message(t) for t in texts],
        "rewards": rewards,
    }


def test_reward_function_is_sort_reward_per_completion():
    """The demo's reward source, with GRPOTrainer's signature, scores each completion with `sort_reward`."""
    prompts = [P.user_message([3, 1, 2])] * 4 + [P.user_message([9, 0])] * 4
    texts = ["1 2 3", "3 1 2", "1 2", "", "0 9", "9 0", "0 9 9", "x"]
    completions = [P.assistant_message(t) for t in texts]
    scores = sort_reward_func(prompts=prompts, completions=completions, completion_ids=[[]] * 8, trainer_state=None)
    assert scores == [sort_reward(p[0]["content"], t) for p, t in zip(prompts, texts)]
    assert scores == [1.0, sort_reward("Sort ascending: 3 1 2", "3 1 2"), 2 / 3, 0.0, 1.0, 0.5, 2 / 3, 0.0]
    assert sort_reward_func([p[0]["content"] for p in prompts], texts) == scores  # plain-text prompts too


def test_rank_order_and_preference_pairs():
    row = _row(["a", "b", "c", "d"], [0.5, 1.0, 0.2, 0.5])
    assert P.rank_order(row["rewards"]) == [1, 0, 3, 2]  # ties keep sampling order
    assert P.by_rank(torch.tensor([[10.0, 11.0, 12.0, 13.0]]), [row]).tolist() == [[11.0, 10.0, 13.0, 12.0]]
    worst = P.preference_pairs([row], "best_worst")
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in worst] == [("b", "c")]
    every = P.preference_pairs([row], "best_all")
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in every] == [
        ("b", "a"),
        ("b", "c"),
        ("b", "d"),
    ]
    # best vs random: one strictly worse response, drawn reproducibly; every one of them for some seed
    drawn = {P.preference_pairs([row], "best_random", seed)[0]["rejected"][0]["content"] for seed in range(40)}
    assert drawn == {"a", "c", "d"}
    assert P.preference_pairs([row], "best_random", 3) == P.preference_pairs([row], "best_random", 3)
    # NCA/InfoNCA on the same pairs: K = 2 rows, chosen first, with the pair's own rewards
    assert P.pair_rows(worst) == [{"prompt": row["prompt"], "completions": [row["completions"][1], row["completions"][2]],
                                   "rewards": [1.0, 0.2]}]  # fmt: skip
    tied = _row(["a", "b", "c", "d"], [0.5, 0.5, 0.5, 0.5])
    assert all(P.preference_pairs([tied], mode) == [] for mode in ("best_worst", "best_all", "best_random"))
    with pytest.raises(ValueError):
        P.preference_pairs([row], "all_pairs")


def test_completion_logps_match_a_manual_computation_and_ignore_padding():
    from trl_nca.tiny import build_tiny_model

    tokenizer = P.build_demo_tokenizer()
    model = build_tiny_model(
        tokenizer, "mistral", hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1
    )
    rows = [_row(["1 2 3", "3", "1 2 3 3 3 3 3", "2 1"], [1.0, 0.0, 0.5, 0.5])]
    batched = P.completion_logps(model, tokenizer, rows)
    one_by_one = P.completion_logps(model, tokenizer, rows, batch_size=1)
    assert batched.shape == (1, 4)
    torch.testing.assert_close(batched, one_by_one, atol=1e-4, rtol=0)
    # manual: log p(completion tokens | prompt) from a single unpadded forward
    prompt_ids = tokenizer.apply_chat_template(
        rows[0]["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    full = tokenizer.apply_chat_template(
        rows[0]["prompt"] + rows[0]["completions"][2], tokenize=True, return_dict=True
    )["input_ids"]
    assert full[: len(prompt_ids)] == list(prompt_ids)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([full])).logits[0, :-1].log_softmax(-1)
    manual = sum(logits[t - 1, full[t]].item() for t in range(len(prompt_ids), len(full)))
    assert batched[0, 2].item() == pytest.approx(manual, abs=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# End to end (tiny size)
# ---------------------------------------------------------------------------------------------------------------------

METRIC_KEYS = {"reward_before", "reward_after", "best_logp_change", "trainer", "seed", "wall_s"}
VOLATILE = {"wall_s", "timings", "dataset", "log_history"}  # wall-clock times, paths; log_history holds runtimes


def _stable(metrics):
    return {k: v for k, v in metrics.items() if k not in VOLATILE}


@pytest.mark.slow
def test_demo_end_to_end_artifacts_and_determinism(tmp_path, capsys):
    from datasets import load_from_disk

    from trl_nca.demo.run import demo_runtime, main, run_demo

    threads = torch.get_num_threads()
    first = tmp_path / "first"
    assert main(["--size", "tiny", "--output-dir", str(first), "--no-progress", "--threads", "1"]) == 0
    assert "held-out reward" in capsys.readouterr().out
    assert torch.get_num_threads() == threads  # the CLI restores what it changed

    metrics = json.loads((first / "nca" / "metrics.json").read_text())
    assert METRIC_KEYS <= set(metrics)
    assert metrics["trainer"] == "nca" and metrics["seed"] == 0 and metrics["K"] == 4
    for key in ("reward_before", "reward_after"):
        assert 0.0 <= metrics[key] <= 1.0
    assert len(metrics["rank_logp_change"]) == 4
    assert metrics["rank_logp_change"][0] == pytest.approx(metrics["best_logp_change"])
    assert metrics["before"]["best_logp_change"] == pytest.approx(0.0, abs=1e-4)  # SFT vs itself

    # the reward dataset: trl-nca generate's outputs, K responses per prompt, rewards equal to the reward function's
    for split in ("train", "val", "test"):
        rows = load_from_disk(str(first / "reward_data" / split / "dataset")).to_list()  # data.jsonl: 10 digits
        stats = json.loads((first / "reward_data" / split / "stats.json").read_text())
        assert (
            len(rows)
            == stats["prompts_kept"]
            == P.PRESETS["tiny"].__getattribute__(f"n_{split}") - stats["prompts_too_few"]
        )
        for row in rows:
            assert len(row["completions"]) == len(row["rewards"]) == 4 and row["models"] == ["sft"] * 4
            assert row["prompt"][0]["role"] == "user"
            for completion, reward in zip(row["completions"], row["rewards"]):
                assert completion[0]["role"] == "assistant" and completion[0]["content"].strip()
                assert reward == sort_reward(row["prompt"][0]["content"], completion[0]["content"])
    # ... which are the SFT model's samples as trl_nca.generation gives them (the same seeds, chunks and batches),
    # minus the prompts with an empty sample
    from trl_nca.generation import SamplingOptions, completion_text, generate_completions

    tokenizer = P.build_demo_tokenizer()
    prompts = [P.user_message(d) for d in P.split_prompts(P.PRESETS["tiny"], 0)["train"]]
    samples = generate_completions(
        P.load_model(first / "sft"), tokenizer, prompts, P.K, seed=0, options=SamplingOptions(max_new_tokens=24),
        batch_size=128, chunk_size=256, show_progress=False,
    )  # fmt: skip
    expected = [
        (prompt, [completion_text(x.completion) for x in xs])
        for prompt, xs in zip(prompts, samples)
        if all(completion_text(x.completion).strip() for x in xs)
    ]
    train = load_from_disk(str(first / "reward_data" / "train" / "dataset")).to_list()
    assert [(r["prompt"], [c[0]["content"] for c in r["completions"]]) for r in train] == expected

    # the likelihood figure and the probe behind it
    assert (first / "nca" / "likelihood.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    steps = [h["step"] for h in metrics["likelihood"]]
    assert steps[0] == 0 and steps[-1] == P.PRESETS["tiny"].align_steps and steps == sorted(steps)
    assert all(len(h["logps_by_rank"]) == 4 for h in metrics["likelihood"])
    # NCA logs per-rank metrics itself
    assert any("logps/rank_0" in entry for entry in metrics["log_history"])
    report = (first / "nca" / "report.md").read_text()
    assert "likelihood.png" in report and f"{metrics['reward_after']:.3f}" in report

    # determinism: same seed, fresh directory -> same numbers
    with demo_runtime(threads=1):
        second = run_demo(tmp_path / "second", size="tiny", show_progress=False, log=lambda *_: None)
    assert _stable(second) == _stable(metrics)
    assert (tmp_path / "second" / "reward_data" / "train" / "data.jsonl").read_text() == (
        first / "reward_data" / "train" / "data.jsonl"
    ).read_text()

    # DPO baseline on the cached SFT model + data (stages 1-3 are reused, not recomputed)
    logs = []
    with demo_runtime(threads=1):
        dpo = run_demo(first, trainer="dpo", seed=0, size="tiny", show_progress=False, log=logs.append)
    assert any("reusing the cached" in line for line in logs)
    assert dpo["trainer"] == "dpo" and dpo["reward_before"] == metrics["reward_before"]
    assert "sft_s" not in dpo["timings"]
    # ... and writes its results beside NCA's, which stay as they were.
    assert json.loads((first / "dpo" / "metrics.json").read_text())["trainer"] == "dpo"
    assert json.loads((first / "nca" / "metrics.json").read_text()) == metrics


def test_demo_progress_bars_say_what_they_are(tmp_path, monkeypatch):
    """The SFT and alignment bars carry a label (not a bare `0/282`); the logged metrics dicts stay in log_history."""
    from dataclasses import replace

    import transformers.trainer_callback
    from tqdm.auto import tqdm

    from trl_nca import callbacks

    made = []

    def recording_tqdm(**kwargs):  # the bars the callbacks open, drawn nowhere (the test session disables tqdm)
        made.append(kwargs)
        return tqdm(**{**kwargs, "disable": True})

    for module in (callbacks, transformers.trainer_callback):  # ours, and transformers' unlabelled ProgressCallback
        monkeypatch.setattr(module, "tqdm", recording_tqdm, raising=False)
    preset = replace(P.PRESETS["tiny"], n_demos=16, sft_epochs=1, sft_batch=8, align_steps=2, align_batch=2)
    tokenizer = P.build_demo_tokenizer()
    digits = [[random.Random(i).randrange(10) for _ in range(3)] for i in range(preset.n_demos)]
    P.train_sft(preset, tokenizer, P.sft_dataset_rows(digits, preset.p_correct, 0), 0, tmp_path / "sft")
    rows = [_row(["1 2 3", "3 1 2", "1 2", "2 1 3"], [1.0, 0.4, 0.6, 0.3])] * 4
    for method in ("nca", "dpo"):
        hparams = P.DEFAULT_HPARAMS["tiny"][method]
        result = P.align(method, tmp_path / "sft", tokenizer, rows, None, hparams, preset, 0, tmp_path)
        assert any("loss" in entry for entry in result.log_history)
    assert [(bar.get("desc"), bar["total"]) for bar in made] == [
        ("SFT warm start", 2),  # 16 demonstrations, batches of 8, one epoch
        ("NCA alignment", 2),
        ("DPO (best vs worst) alignment", 2),
    ]


def test_listwise_methods_train_with_listwise_trainer_on_all_k_responses(tmp_path, monkeypatch):
    """`plackett_luce` / `lipo_lambda`: `ListwiseTrainer` with that loss_type (LiPO-λ labels = the rewards), on every
    prompt's K responses with NCA's budget and hyper-parameters."""
    from dataclasses import replace

    import trl_nca

    seen = []

    class RecordingListwiseTrainer(trl_nca.ListwiseTrainer):
        def __init__(self, *args, **kwargs):
            seen.append(kwargs["args"])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(trl_nca, "ListwiseTrainer", RecordingListwiseTrainer)
    preset = replace(P.PRESETS["tiny"], n_demos=16, sft_epochs=1, sft_batch=8, align_steps=2, align_batch=2)
    tokenizer = P.build_demo_tokenizer()
    digits = [[random.Random(i).randrange(10) for _ in range(3)] for i in range(preset.n_demos)]
    P.train_sft(preset, tokenizer, P.sft_dataset_rows(digits, preset.p_correct, 0), 0, tmp_path / "sft", False)
    rows = [_row(["1 2 3", "3 1 2", "1 2", "2 1 3"], [1.0, 0.4, 0.6, 0.3])] * 4
    hparams = P.AlignHParams(learning_rate=3e-4, beta=0.5, alpha=0.1)
    for method in P.LISTWISE_METHODS:
        result = P.align(method, tmp_path / "sft", tokenizer, rows, None, hparams, preset, 0, tmp_path, False)
        assert result.n_train_rows == len(rows) and any("loss" in entry for entry in result.log_history)
    assert [args.loss_type for args in seen] == [["plackett_luce"], ["lipo_lambda"]]
    for args in seen:
        assert args.lipo_label_normalization == "none" and args.plackett_luce_top_m is None
        assert (args.per_device_train_batch_size, args.max_steps) == (preset.align_batch, preset.align_steps)
        assert (args.learning_rate, args.beta) == (3e-4, 0.5)


@pytest.mark.slow
def test_demo_terminal_output_is_labelled_bars_and_its_own_lines(tmp_path):
    """What a user sees from `trl-nca demo` (tiny size, bars on): every progress bar says what it is, and every other
    line is the demo's own (no library warnings)."""
    import os
    import re
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("TQDM_", "DS_ACCELERATOR"))}
    command = [sys.executable, "-m", "trl_nca.demo.run", "--size", "tiny", "--output-dir", str(tmp_path / "demo")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    pieces = [p.strip() for p in re.split(r"[\r\n]", result.stdout + result.stderr) if p.strip()]
    bars = [p for p in pieces if re.search(r"\d+%\|", p)]
    labels = {re.sub(r":?\s*\d+%\|.*", "", bar) for bar in bars}
    assert bars and "" not in labels
    assert {"SFT warm start", "NCA alignment"} <= labels
    lines = [p for p in pieces if p not in bars]
    own = ("[seed 0] ", "Evaluating the SFT model", "Aligning with NCA", "trl-nca demo:", "held-out reward")
    own += ("exact answers", "Δ log-likelihood", "ranking accuracy", "wall time")
    assert [line for line in lines if not line.startswith(own)] == []


@pytest.mark.slow
def test_pool_regime_reward_data_comes_from_the_other_models(tmp_path):
    """`prepare(regime="pool")`: one response per prompt from each pool model (not the policy), scored like the rest."""
    from dataclasses import replace

    from trl_nca.demo.run import demo_runtime

    preset = replace(P.PRESETS["tiny"], n_demos=32, sft_epochs=1, sft_batch=16, n_train=8, n_val=4, n_test=4)
    with demo_runtime(threads=1):
        prep = P.prepare(preset, 0, tmp_path, show_progress=False, log=lambda *_: None, regime="pool")
    labels = ["sft-p0.1", "sft-p0.4", "sft-p0.7", "sft-p0.95"]
    assert all((tmp_path / "pool" / label / "config.json").is_file() for label in labels)
    config = json.loads((tmp_path / "reward_data" / "train" / "generate_config.json").read_text())
    assert config["model_name_or_path"] == [str(tmp_path / "pool" / label) for label in labels]
    for split in ("train", "val", "test"):
        for row in prep.data[split]:
            assert row["models"] == labels  # the pool's order, one response each
            assert row["rewards"] == [
                sort_reward(row["prompt"][0]["content"], c[0]["content"]) for c in row["completions"]
            ]
    with pytest.raises(ValueError, match="Unknown regime"):
        P.prepare(preset, 0, tmp_path, regime="other")


def test_demo_rejects_unknown_choices(tmp_path):
    from trl_nca.demo.run import build_parser, run_demo

    with pytest.raises(ValueError, match="Unknown trainer"):
        run_demo(tmp_path, trainer="ppo")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--trainer", "ppo"])


@pytest.mark.parametrize("underscore", [True, False])
def test_demo_flags_take_underscores_like_the_other_commands(tmp_path, underscore):
    """`--output_dir` (as `trl-nca train/generate/iterate` spell it) and `--output-dir` both work."""
    from trl_nca.demo.run import build_parser

    def flag(name: str) -> str:
        return name if underscore else name.replace("_", "-")

    argv = [flag("--output_dir"), str(tmp_path / "d"), flag("--learning_rate"), "0.5", flag("--no_progress")]
    args = build_parser().parse_args(argv)
    assert (args.output_dir, args.learning_rate, args.no_progress) == (str(tmp_path / "d"), 0.5, True)


def _demo_import_graph() -> dict[str, set[str]]:
    """`{module: the trl_nca.demo modules it imports}` for trl_nca/demo/*.py, imports inside functions included."""
    import ast
    from pathlib import Path

    import trl_nca.demo

    graph = {}
    for path in Path(trl_nca.demo.__file__).parent.glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
            elif isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
        graph[path.stem] = {n.removeprefix("trl_nca.demo.") for n in names if n.startswith("trl_nca.demo.")}
    return graph


def test_demo_modules_import_each_other_without_a_circle():
    from graphlib import CycleError, TopologicalSorter

    graph = _demo_import_graph()
    assert graph["run"] >= {"pipeline", "report"} and "pipeline" in graph["report"] and "task" in graph["pipeline"]
    assert not any("compare" in imported for imported in graph.values())
    list(TopologicalSorter(graph).static_order())  # raises CycleError on a circle
    with pytest.raises(CycleError):  # ... as it would if the pipeline called back into the command
        list(TopologicalSorter({**graph, "pipeline": graph["pipeline"] | {"run"}}).static_order())


def test_demo_compare_is_gone_with_one_line_saying_where_the_reproduction_is(tmp_path, capsys):
    """`trl-nca demo --compare` (whatever else it is given) exits 2 with one line naming the script, runs nothing and
    loads no reproduction code."""
    import sys

    from trl_nca.demo.run import main

    for argv in (["--compare"], ["--compare", "--output_dir", str(tmp_path / "c"), "--seeds", "3", "--size", "tiny"]):
        assert main(argv) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
        assert captured.err.startswith("trl-nca demo: error: --compare")
        assert "python scripts/reproduce_results.py" in captured.err
    assert not (tmp_path / "c").exists() and "trl_nca.demo.compare" not in sys.modules
