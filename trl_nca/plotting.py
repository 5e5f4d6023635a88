"""Plots of a finished (or running) trl-nca / TRL run, from the `log_history` in its `trainer_state.json`.

`plot_run(output_dir)` draws, for train and (when logged) eval:

- `logps.png`: the policy log-likelihood of each response rank over steps, `logps/rank_0..rank_{K-1}` (rank 0 = the
  best-rewarded response); the figure that shows whether the best response's likelihood goes up (NCA) or down
  (DPO/InfoNCA). A pairwise run (`logps/chosen`, `logps/rejected` only, e.g. a DPO baseline) is drawn the same way;
- `rewards.png`: the implicit reward `beta * log(pi/ref)` per rank (`rewards/rank_k`, or `rewards/chosen`/`rejected`);
- `accuracies.png`: the ranking accuracy `rewards/accuracies`;
- `loss.png`: `loss` and `eval_loss`.

A figure is written only when its metrics were logged. matplotlib is an optional dependency (`pip install
"trl-nca[plot]"`); it is imported when a plot is drawn, through its object-oriented API on the Agg canvas, so it never
touches the global pyplot backend.

Command line: `trl-nca plot OUTPUT_DIR [--out DIR]` (dispatched to :func:`main`).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

__all__ = [
    "TrainerStateError",
    "draw_panels",
    "find_trainer_state",
    "load_log_history",
    "metric_series",
    "plot_run",
    "main",
]

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def find_trainer_state(output_dir: str | Path) -> Path:
    """The `trainer_state.json` of a run: `output_dir/trainer_state.json`, else the one in the `checkpoint-N`
    subdirectory with the largest N, else `output_dir` itself when it is the file.

    Raises:
        FileNotFoundError: when there is none.
    """
    path = Path(output_dir)
    if path.is_file():
        return path
    direct = path / "trainer_state.json"
    if direct.is_file():
        return direct
    checkpoints = []
    if path.is_dir():
        for child in path.iterdir():
            match = _CHECKPOINT.match(child.name)
            if match and (child / "trainer_state.json").is_file():
                checkpoints.append((int(match.group(1)), child / "trainer_state.json"))
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (expected a run's output_dir, or its trainer_state.json).")
    if not checkpoints:
        raise FileNotFoundError(f"No trainer_state.json in {path} or in any checkpoint-* directory under it.")
    return max(checkpoints)[1]


class TrainerStateError(ValueError):
    """A `trainer_state.json` that cannot be read: not JSON, or not a mapping with a `log_history` list."""


def load_log_history(output_dir: str | Path) -> list[dict[str, Any]]:
    """The `log_history` list of a run's `trainer_state.json` (see :func:`find_trainer_state`).

    Raises:
        FileNotFoundError: when there is none.
        TrainerStateError: when it is not JSON, or holds no mapping with a `log_history` list.
    """
    path = find_trainer_state(output_dir)
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TrainerStateError(f"{path} is not a trainer_state.json: {error}.") from None
    history = state.get("log_history", []) if isinstance(state, dict) else None
    if not isinstance(history, list) or not all(isinstance(entry, dict) for entry in history):
        raise TrainerStateError(f"{path} is not a trainer_state.json: it has no `log_history` list of entries.")
    return history


def metric_series(log_history: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """`(steps, values)` of one logged metric, in log order; entries without the key or a step are skipped."""
    steps, values = [], []
    for entry in log_history:
        if key in entry and entry[key] is not None and "step" in entry:
            steps.append(float(entry["step"]))
            values.append(float(entry[key]))
    return steps, values


def _ranked_keys(keys: set[str], family: str) -> list[tuple[str, str]]:
    """`(train_key, label)` pairs for one metric family: `family/rank_k` sorted by k, else `family/chosen`,
    `family/rejected`."""
    ranks = sorted(
        (int(m.group(1)), key) for key in keys if (m := re.fullmatch(re.escape(family) + r"/rank_(\d+)", key))
    )
    if ranks:
        return [(key, f"rank {k}" + (" (best)" if k == 0 else "")) for k, key in ranks]
    return [(f"{family}/{side}", side) for side in ("chosen", "rejected") if f"{family}/{side}" in keys]


def _import_matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            "Plotting needs matplotlib, an optional dependency: pip install 'trl-nca[plot]' "
            "(or pip install matplotlib)."
        ) from error
    return Figure, FigureCanvasAgg


Line = tuple[str, list[float], list[float], bool]  # (label, steps, values, is_eval)


def draw_panels(path: str | Path, title: str, panels: list[tuple[str, str, list[Line]]]) -> Path:
    """One PNG at `path`: side-by-side panels, one per `(panel title, y label, lines)` (a panel without a title gets
    `title`), each line a `(label, steps, values, is_eval)`; eval lines are dashed with markers, a label keeps its
    colour across panels, the legend is on the first panel. matplotlib draws on the Agg canvas (no pyplot state)."""
    figure_cls, canvas_cls = _import_matplotlib()
    figure = figure_cls(figsize=(1 + 6 * len(panels), 4.5), dpi=100)
    canvas_cls(figure)
    colors: dict[str, str] = {}
    for i, (panel_title, ylabel, lines) in enumerate(panels):
        axes = figure.add_subplot(1, len(panels), i + 1)
        for label, steps, values, is_eval in lines:
            color = colors.setdefault(label.removeprefix("eval "), f"C{len(colors) % 10}")
            style = dict(linestyle="--", marker="o", markersize=3) if is_eval else {}
            axes.plot(steps, values, color=color, label=label, **style)
        axes.set(title=panel_title or title, xlabel="step", ylabel=ylabel)
        axes.grid(True, alpha=0.3)
        if i == 0:
            axes.legend(fontsize="small")
    if len(panels) > 1:
        figure.suptitle(title)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return Path(path)


def plot_run(output_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Draw the run's training curves as PNG files and return their paths.

    Args:
        output_dir: a TRL run directory (its `trainer_state.json`, or the latest `checkpoint-*`'s), or the
            `trainer_state.json` file itself.
        out_dir: where to write the PNGs (created if needed); defaults to `<output_dir>/plots`.

    Returns:
        the written files, among `logps.png`, `rewards.png`, `accuracies.png`, `loss.png` (only those whose metrics
        were logged; empty when none were).

    Raises:
        FileNotFoundError: no `trainer_state.json` was found.
        TrainerStateError: the `trainer_state.json` cannot be read.
        ImportError: matplotlib is not installed.
    """
    history = load_log_history(output_dir)  # a wrong folder is reported before matplotlib's import (~0.8 s)
    _import_matplotlib()  # fail early and clearly when the optional dependency is missing
    base = Path(output_dir)
    out = Path(out_dir) if out_dir is not None else (base.parent if base.is_file() else base) / "plots"
    keys = {key for entry in history for key in entry}

    figures: list[tuple[str, str, str, list[tuple[str, str]]]] = [
        ("logps.png", "Log-likelihood of each response rank", "log pi(y|x) (summed)", _ranked_keys(keys, "logps")),
        ("rewards.png", "Model reward of each response rank", "beta * log(pi/ref)", _ranked_keys(keys, "rewards")),
        ("accuracies.png", "Ranking accuracy", "accuracy", [("rewards/accuracies", "accuracy")]),
        ("loss.png", "Loss", "loss", [("loss", "loss")]),
    ]
    written = []
    for filename, title, ylabel, metrics in figures:
        lines = []
        for key, label in metrics:
            for prefix, is_eval in (("", False), ("eval_", True)):
                steps, values = metric_series(history, prefix + key)
                if steps:
                    lines.append((("eval " if is_eval else "") + label, steps, values, is_eval))
        if lines:
            written.append(draw_panels(out / filename, title, [("", ylabel, lines)]))
    return written


_USAGE = "trl-nca plot OUTPUT_DIR [--out DIR]"


class _ArgumentParser(argparse.ArgumentParser):
    """argparse, with a mistake raised as a `trl_nca.cli_common.UsageError` (one line in `main`), not the usage."""

    def error(self, message: str):
        from trl_nca.cli_common import UsageError

        raise UsageError(f"{message}. Usage: {_USAGE}")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    """`trl-nca plot`'s arguments; a `UsageError` for a mistake, naming the closest flag for an unknown one."""
    from trl_nca.cli_common import UsageError, did_you_mean

    parser = _ArgumentParser(
        prog="trl-nca plot",
        description="Plot per-rank log-likelihoods, rewards, ranking accuracy and loss from trainer_state.json.",
    )
    parser.add_argument("output_dir", help="the run's output directory (or a checkpoint-* directory).")
    parser.add_argument("--out", default=None, help="directory for the PNG files (default: OUTPUT_DIR/plots).")
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        name = unknown[0].split("=", 1)[0]
        flags = [option for action in parser._actions for option in action.option_strings]
        hint = did_you_mean(name, flags) if name.startswith("-") else ""
        what = "flag" if name.startswith("-") else "argument"
        raise UsageError(f"unknown {what} `{name}`{hint}. Usage: {_USAGE}")
    return args


def main(argv: list[str] | None = None) -> int:
    """`trl-nca plot OUTPUT_DIR [--out DIR]`: draw a run's curves, print the written paths; returns the exit code.

    A mistake (an unknown flag, no `trainer_state.json` at OUTPUT_DIR, an unreadable one, no logged metric to plot,
    an `--out` that is a file) is one line on stderr with exit status 2, like the other `trl-nca` commands; a missing
    matplotlib is one line with status 1.
    """
    from trl_nca.cli_common import UsageError

    try:
        args = _parse_args(argv)
        if args.out is not None and Path(args.out).exists() and not Path(args.out).is_dir():
            raise UsageError(f"--out: {args.out} is a file; pass a folder for the PNG files.")
        paths = plot_run(args.output_dir, args.out)
        if not paths:
            raise UsageError(
                f"no plottable metrics in the log history of {find_trainer_state(args.output_dir)} (a run logs them "
                "every `logging_steps`; it may not have reached its first log yet)."
            )
    except ImportError as error:
        print(f"trl-nca plot: error: {error}", file=sys.stderr)
        return 1
    except (UsageError, FileNotFoundError, TrainerStateError) as error:
        print(f"trl-nca plot: error: {error}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
