"""trl_nca.plotting on a hand-built trainer_state.json: which PNGs are drawn, from which checkpoint, and the CLI."""

import json
import sys

import pytest

from trl_nca import plotting

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def kway_history(n_steps=4, k=3):
    """A log_history shaped like the trainers': per-rank metrics every step, eval every 2 steps, a final summary."""
    history = []
    for step in range(1, n_steps + 1):
        entry = {"epoch": step / n_steps, "step": step, "loss": 1.0 / step, "learning_rate": 1e-3, "grad_norm": 0.5}
        for rank in range(k):
            entry[f"logps/rank_{rank}"] = -10.0 * (rank + 1) - step
            entry[f"rewards/rank_{rank}"] = 0.1 * step * (k - rank)
        entry.update({"logps/chosen": -10.0 - step, "logps/rejected": -30.0 - step, "rewards/chosen": 0.3 * step})
        entry.update({"rewards/rejected": 0.1 * step, "rewards/margins": 0.2 * step, "rewards/accuracies": 0.5})
        entry["target_weights/entropy"] = 0.9
        history.append(entry)
        if step % 2 == 0:
            evaluation = {"epoch": step / n_steps, "step": step, "eval_loss": 0.8 / step}
            for rank in range(k):
                evaluation[f"eval_logps/rank_{rank}"] = -11.0 * (rank + 1)
                evaluation[f"eval_rewards/rank_{rank}"] = 0.05 * step * (k - rank)
            evaluation["eval_rewards/accuracies"] = 0.75
            history.append(evaluation)
    history.append({"epoch": 1.0, "step": n_steps, "train_runtime": 3.2, "train_loss": 0.5})
    return history


def write_state(directory, history):
    directory.mkdir(parents=True, exist_ok=True)
    state = {"global_step": history[-1]["step"] if history else 0, "log_history": history, "max_steps": 4}
    (directory / "trainer_state.json").write_text(json.dumps(state))
    return directory


def is_png(path):
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC


def test_plot_run_draws_all_figures(tmp_path):
    run = write_state(tmp_path / "run", kway_history())
    paths = plotting.plot_run(run)
    assert [p.name for p in paths] == ["logps.png", "rewards.png", "accuracies.png", "loss.png"]
    assert all(p.parent == run / "plots" for p in paths)
    assert all(is_png(p) for p in paths)


def test_plot_run_custom_out_dir_and_state_file(tmp_path):
    run = write_state(tmp_path / "run", kway_history())
    paths = plotting.plot_run(run / "trainer_state.json", out_dir=tmp_path / "figs" / "nested")
    assert len(paths) == 4
    assert all(p.parent == tmp_path / "figs" / "nested" and is_png(p) for p in paths)


def test_latest_checkpoint_is_numeric_not_lexicographic(tmp_path):
    run = tmp_path / "run"
    write_state(run / "checkpoint-2", kway_history(n_steps=2))
    write_state(run / "checkpoint-10", kway_history(n_steps=4))
    (run / "checkpoint-30").mkdir()  # a checkpoint directory without a state file is skipped
    assert plotting.find_trainer_state(run) == run / "checkpoint-10" / "trainer_state.json"
    steps, _ = plotting.metric_series(plotting.load_log_history(run), "loss")
    assert steps == [1.0, 2.0, 3.0, 4.0]


def test_metric_series_values():
    history = kway_history()
    assert plotting.metric_series(history, "logps/rank_1") == ([1.0, 2.0, 3.0, 4.0], [-21.0, -22.0, -23.0, -24.0])
    assert plotting.metric_series(history, "eval_rewards/accuracies") == ([2.0, 4.0], [0.75, 0.75])
    assert plotting.metric_series(history, "eval_logps/rank_9") == ([], [])


def test_ranked_keys_order_and_pairwise_fallback():
    keys = {f"logps/rank_{k}" for k in (0, 1, 2, 10)} | {"logps/chosen", "logps/rejected"}
    assert plotting._ranked_keys(keys, "logps") == [
        ("logps/rank_0", "rank 0 (best)"),
        ("logps/rank_1", "rank 1"),
        ("logps/rank_2", "rank 2"),
        ("logps/rank_10", "rank 10"),
    ]
    assert plotting._ranked_keys({"rewards/chosen", "rewards/rejected", "rewards/accuracies"}, "rewards") == [
        ("rewards/chosen", "chosen"),
        ("rewards/rejected", "rejected"),
    ]


def test_pairwise_run_and_partial_logs(tmp_path):
    dpo = [{"step": s, "loss": 0.6, "logps/chosen": -5.0, "logps/rejected": -7.0} for s in (1, 2)]
    dpo_paths = plotting.plot_run(write_state(tmp_path / "dpo", dpo))
    assert [p.name for p in dpo_paths] == ["logps.png", "loss.png"]
    assert all(is_png(p) for p in dpo_paths)
    assert plotting.plot_run(write_state(tmp_path / "empty", [{"step": 1, "train_runtime": 1.0}])) == []


def test_missing_state_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="trainer_state.json"):
        plotting.plot_run(tmp_path)


def test_main(tmp_path, capsys):
    run = write_state(tmp_path / "run", kway_history())
    assert plotting.main([str(run), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out.split()
    assert sorted(printed) == sorted(
        str(tmp_path / "out" / n) for n in ("logps.png", "rewards.png", "accuracies.png", "loss.png")
    )
    assert plotting.main([str(tmp_path / "nowhere")]) == 2
    assert "trainer_state.json" in capsys.readouterr().err


def test_missing_matplotlib_message(tmp_path, monkeypatch):
    run = write_state(tmp_path / "run", kway_history())
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(ImportError, match=r"trl-nca\[plot\]"):
        plotting.plot_run(run)
    assert plotting.main([str(run)]) == 1


def _user_error_cases(tmp_path):
    run = write_state(tmp_path / "run", kway_history())
    (tmp_path / "not_json").mkdir()
    (tmp_path / "not_json" / "trainer_state.json").write_text("{oops")
    (tmp_path / "a_list").mkdir()
    (tmp_path / "a_list" / "trainer_state.json").write_text("[1, 2]")
    (tmp_path / "no_state").mkdir()
    (tmp_path / "file.png").write_bytes(PNG_MAGIC)
    no_metrics = write_state(tmp_path / "no_metrics", [{"step": 1, "train_runtime": 1.0}])
    return {
        "missing folder": ([str(tmp_path / "nowhere")], "nowhere does not exist"),
        "no trainer_state.json": ([str(tmp_path / "no_state")], "No trainer_state.json in"),
        "not JSON": ([str(tmp_path / "not_json")], "is not a trainer_state.json: Expecting"),
        "not a state": ([str(tmp_path / "a_list")], "has no `log_history` list"),
        "a binary file": ([str(tmp_path / "file.png")], "file.png is not a trainer_state.json"),
        "no log history": ([str(no_metrics)], "no plottable metrics in the log history of"),
        "flag typo": ([str(run), "--outt", "x"], "unknown flag `--outt` (did you mean `--out`?)"),
        "extra argument": ([str(run), "extra"], "unknown argument `extra`"),
        "no argument": ([], "the following arguments are required: output_dir"),
        "--out is a file": ([str(run), "--out", str(tmp_path / "file.png")], "is a file; pass a folder"),
    }


@pytest.mark.parametrize(
    "case",
    ["missing folder", "no trainer_state.json", "not JSON", "not a state", "a binary file", "no log history"]
    + ["flag typo", "extra argument", "no argument", "--out is a file"],
)
def test_user_errors_are_one_line_with_status_2(tmp_path, capsys, case):
    """Like the other `trl-nca` commands: a mistake is one line naming it, exit status 2, no usage text or traceback."""
    argv, expected = _user_error_cases(tmp_path)[case]
    assert plotting.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.strip().splitlines()
    assert line.startswith("trl-nca plot: error: ") and expected in line
