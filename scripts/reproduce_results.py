#!/usr/bin/env python
"""Reproduce docs/results.md and docs/results_pool.md: NCA and InfoNCA against DPO on three binarisations of the same
reward data, against NCA/InfoNCA on the same pairs as DPO, and against the listwise Plackett-Luce DPO and LiPO-λ, on
the offline demo task (`trl_nca.demo`), with paired per-seed 95% confidence intervals.

    python scripts/reproduce_results.py                    # every regime, ~45 min on 2 CPU cores
    python scripts/reproduce_results.py --from-json        # only re-render the pages from docs/results/*.json

Protocol (one JSON per regime in docs/results/, schema in `scripts/results_report.py`):

1. "self" regime (the K = 4 responses are the SFT policy's own samples), claims 1 and 2. Tuning: every method at every
   point of the learning-rate x β grid on each tuning seed's validation prompts; the point with the highest mean
   sampled reward over the tuning seeds is selected (never the likelihood). Test: every method at its selected point
   on each test seed (one SFT model and one reward dataset per seed, shared by all methods), scored on that seed's
   test prompts with two sampling seeds; NCA/InfoNCA with hard labels (α = 0) as an ablation; and the
   equal-settings slice: the claim-2 methods at every slice point on the slice seeds.
2. "pool" (responses written by 4 other models) and "offpolicy" (the pool's exact answers rewritten in a form the
   policy finds unlikely), claim 2: the claim-2 methods at the self regime's selected points.

Jobs run in `--workers` processes (1 torch thread each); every job is deterministic under its seeds, so the numbers do
not depend on the number of workers. SFT models and reward data are cached per regime and seed under `--output-dir`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shlex
import statistics
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict
from functools import lru_cache
from multiprocessing import get_context
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

REGIMES = ("self", "pool", "offpolicy")
CLAIM2_METHODS = ("nca", "infonca", "dpo", "dpo_all", "dpo_random")
GRID_LR = (1e-4, 3e-4, 1e-3, 3e-3)
GRID_BETA = (0.1, 0.5, 2.0, 8.0)
SLICE_POINTS = ((3e-4, 0.5), (3e-4, 2.0), (1e-3, 0.5), (1e-3, 2.0))
ALPHA = 0.1
SAMPLING_SEEDS = (10_007, 20_011)  # offsets added to the data seed for the evaluation samples


# ---------------------------------------------------------------------------------------------------------------------
# One job, run in a worker process
# ---------------------------------------------------------------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _init_worker(output_dir: str, size: str) -> None:
    """Each worker: offline, 1 torch thread, quiet libraries (`trl-nca demo`'s runtime, entered for its life)."""
    from trl_nca.cli_common import hold_optional_kernel_logs
    from trl_nca.demo.run import demo_runtime

    hold_optional_kernel_logs()  # bitsandbytes' import-time kernel warnings: the reproduction never quantizes
    runtime = demo_runtime(threads=1)
    runtime.__enter__()
    _WORKER.update(output_dir=Path(output_dir), size=size, runtime=runtime)  # kept: exiting it restores the defaults


def _workdir(regime: str, seed: int) -> Path:
    # the offpolicy regime transforms the pool's cached data: same folder
    return _WORKER["output_dir"] / ("self" if regime == "self" else "pool") / f"seed{seed}"


@lru_cache(maxsize=8)
def _prepared(regime: str, seed: int) -> Any:
    from trl_nca.demo import pipeline as P

    return P.prepare(P.PRESETS[_WORKER["size"]], seed, _workdir(regime, seed), False, lambda _: None, regime=regime)


@lru_cache(maxsize=8)
def _reference(regime: str, seed: int, split: str) -> Any:
    from trl_nca.demo import pipeline as P

    prep = _prepared(regime, seed)
    return P.make_reference(P.load_model(prep.sft_dir), prep.tokenizer, prep.data[split])


def _data_stats(regime: str, seed: int) -> dict[str, Any]:
    """What the reward data of (regime, seed) looks like (schema: data_stats)."""
    from trl_nca.demo import pipeline as P

    prep = _prepared(regime, seed)
    train = prep.data["train"]
    by_model: dict[str, list[float]] = {}
    if regime != "self":
        for row in train:
            for model, reward in zip(row["models"], row["rewards"], strict=True):
                by_model.setdefault(Path(model).name, []).append(reward)
    responses = [reward for r in train for reward in r["rewards"]]
    # `offpolicy_rows` rewrites exactly the responses with reward 1.0
    rewritten = sum(reward == 1.0 for reward in responses) / max(1, len(responses)) if regime == "offpolicy" else 0.0
    return {
        "n_prompts": P.PRESETS[_WORKER["size"]].n_train,
        "n_trainable": len(train),
        "n_pairs": {
            mode: len(P.preference_pairs(train, mode, seed)) for mode in ("best_worst", "best_all", "best_random")
        },
        "reward_stats": P.reward_stats(train),
        "reward_by_model": {m: {"mean": statistics.fmean(v)} for m, v in by_model.items()},
        "rewritten": rewritten,
        "timings": prep.timings,
    }


def prepare_job(regime: str, seed: int) -> float:
    """Build (or find cached) the SFT model(s) and reward data of (regime, seed); one job per cache folder, so two
    workers never write the same one. Returns the seconds it took."""
    start = time.perf_counter()
    _prepared(regime, seed)
    return time.perf_counter() - start


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Train (unless method is "sft") and evaluate one job; returns its record (schema: record)."""
    from trl_nca.demo import pipeline as P

    job_start = time.perf_counter()
    regime, method, seed, split = job["regime"], job["method"], job["seed"], job["split"]
    preset = P.PRESETS[_WORKER["size"]]
    prep, reference = _prepared(regime, seed), _reference(regime, seed, split)
    hp = P.AlignHParams(**job["hparams"])
    result = None
    model = reference.sft_model
    if method != "sft":
        run_dir = _WORKER["output_dir"] / "runs" / f"{regime}-{job['stage']}-{method}-{seed}"
        result = P.align(method, prep.sft_dir, prep.tokenizer, prep.data["train"], reference.rows, hp, preset, seed,
                         run_dir, show_progress=False)  # fmt: skip
        model = result.model
    evaluation = P.evaluate_policy(
        model, prep.tokenizer, reference, preset, seed, False, sampling_seeds=SAMPLING_SEEDS
    )
    evaluation.pop("examples")
    trajectory = []
    if result is not None:
        start = result.likelihood[0]["logps_by_rank"][0]
        trajectory = [[h["step"], h["logps_by_rank"][0] - start] for h in result.likelihood]
    record = {
        **{k: job[k] for k in ("stage", "method", "seed", "split", "hparams")},
        **evaluation,
        "best_logp_min": min(v for step, v in trajectory if step > 0) if trajectory else None,
        "best_logp_trajectory": trajectory,
        "likelihood": result.likelihood if result is not None else [],
        "n_train_rows": result.n_train_rows if result is not None else 0,
        "batch": result.batch if result is not None else 0,
        "steps": preset.align_steps if result is not None else 0,
        "align_s": result.wall_s if result is not None else 0.0,
    }
    if method == "sft":
        record["data_stats"] = _data_stats(regime, seed)
    record["job_s"] = time.perf_counter() - job_start
    return record


# ---------------------------------------------------------------------------------------------------------------------
# The protocol: which jobs, in which order
# ---------------------------------------------------------------------------------------------------------------------


def _hp(lr: float, beta: float, alpha: float = ALPHA) -> dict[str, float]:
    return {"learning_rate": lr, "beta": beta, "alpha": alpha}


def _job(regime: str, stage: str, method: str, seed: int, split: str, hparams: dict[str, float]) -> dict[str, Any]:
    return {"regime": regime, "stage": stage, "method": method, "seed": seed, "split": split, "hparams": hparams}


def _key(job: dict[str, Any]) -> tuple:
    return (job["regime"], job["method"], job["seed"], job["split"], tuple(sorted(job["hparams"].items())))


def select(records: list[dict[str, Any]], methods: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Per method, the grid point with the highest validation reward averaged over the tuning seeds (first in grid
    order on a tie)."""
    selected = {}
    for method in methods:
        by_point: dict[tuple[float, float], list[float]] = {}
        for r in records:
            if r["stage"] == "tuning" and r["method"] == method:
                by_point.setdefault((r["hparams"]["learning_rate"], r["hparams"]["beta"]), []).append(
                    r["reward_sampled"]
                )
        point = max(by_point, key=lambda p: statistics.fmean(by_point[p]))
        selected[method] = _hp(*point)
    return selected


def plan(args: argparse.Namespace, selected: dict[str, dict[str, float]] | None) -> list[dict[str, Any]]:
    """Before selection (`selected` None): the SFT evaluations, the tuning grid and the slices. After: the test and
    ablation runs at the selected points."""
    jobs = []
    slice_points = [tuple(p) for p in args.slice_points]
    if selected is None:
        for seed in args.tuning_seeds:
            jobs.append(_job("self", "sft", "sft", seed, "val", _hp(0, 0, 0)))
        for regime in args.regimes:
            for seed in args.test_seeds if regime == "self" else args.pool_seeds:
                jobs.append(_job(regime, "sft", "sft", seed, "test", _hp(0, 0, 0)))
        grid = list(itertools.product(args.lr_grid, args.beta_grid))
        for seed, method, point in itertools.product(args.tuning_seeds, args.methods, grid):
            jobs.append(_job("self", "tuning", method, seed, "val", _hp(*point)))
        for seed, method, point in itertools.product(args.slice_seeds, CLAIM2_METHODS, slice_points):
            if method in args.methods:  # the self regime only: the budget of one command
                jobs.append(_job("self", "slice", method, seed, "test", _hp(*point)))
        return jobs
    for regime in args.regimes:
        methods = args.methods if regime == "self" else [m for m in CLAIM2_METHODS if m in args.methods]
        for seed in args.test_seeds if regime == "self" else args.pool_seeds:
            for method in methods:
                jobs.append(_job(regime, "test", method, seed, "test", selected[method]))
            if regime == "self" and not args.no_ablation:
                for method in ("nca", "infonca"):
                    if method in methods:
                        jobs.append(_job(regime, "ablation", method, seed, "test", {**selected[method], "alpha": 0.0}))
    return jobs


def run_jobs(jobs: list[dict[str, Any]], pool: Any, workers: int, done: dict[tuple, dict[str, Any]], bar: Any) -> None:
    """Run the jobs not already in `done` (same regime, method, seed, split and hyper-parameters), filling `done`."""
    todo = {}
    for job in jobs:
        if _key(job) not in done and _key(job) not in todo:
            todo[_key(job)] = job
    bar.total = (bar.total or 0) + len(todo)
    bar.refresh()
    futures: dict[Future, tuple] = {}
    queue = list(todo.items())
    while queue or futures:
        while queue and len(futures) < 2 * workers:
            key, job = queue.pop(0)
            futures[pool.submit(run_job, job)] = key
        finished, _ = wait(futures, return_when=FIRST_COMPLETED)
        for future in finished:
            key = futures.pop(future)
            done[key] = {**future.result(), "regime": key[0]}
            bar.set_postfix_str(f"{key[0]} {done[key]['stage']} {key[1]} seed {key[2]}", refresh=False)
            bar.update()


def assemble(args: argparse.Namespace, done: dict[tuple, dict[str, Any]], selected: dict, jobs: list[dict]) -> dict:
    """One results dict per regime (schema in scripts/results_report.py)."""
    from trl_nca.demo import pipeline as P

    out = {}
    for regime in args.regimes:
        test_keys = {_key(j) for j in jobs if j["stage"] == "test"}
        records = [
            {**done[_key(job)], "stage": job["stage"]}
            for job in jobs
            if job["regime"] == regime and not (job["stage"] == "slice" and _key(job) in test_keys)
        ]
        data = {str(r["seed"]): r.pop("data_stats") for r in records if "data_stats" in r}
        job_s = sum(r["job_s"] for r in records)
        for r in records:
            if r["method"] == "sft" and r["split"] == "test":
                data[str(r["seed"])].update(
                    sft_logp_best=r["best_logp"], sft_logp_greedy=r["greedy_logp"], best_is_greedy=r["best_is_greedy"]
                )
        methods = list(args.methods) if regime == "self" else [m for m in CLAIM2_METHODS if m in args.methods]
        out[regime] = {
            "regime": regime,
            "size": args.size,
            "preset": asdict(P.PRESETS[args.size]),
            "K": P.K,
            "methods": methods,
            "labels": dict(P.METHOD_LABELS),
            "grid": {"learning_rate": list(args.lr_grid), "beta": list(args.beta_grid), "alpha": ALPHA},
            "tuning_seeds": list(args.tuning_seeds) if regime == "self" else [],
            "selected": {m: selected[m] for m in methods},
            "selected_from": "tuning" if regime == "self" else "self",
            "test_seeds": list(args.test_seeds if regime == "self" else args.pool_seeds),
            "slice": {
                "seeds": list(args.slice_seeds) if regime == "self" else [],
                "points": [list(p) for p in args.slice_points] if regime == "self" else [],
                "methods": [m for m in CLAIM2_METHODS if m in methods] if regime == "self" else [],
            },
            "sampling_seeds": list(SAMPLING_SEEDS),
            "records": records,
            "data": data,
            "regime_job_s": job_s,  # the seconds its jobs took, summed over workers
        }
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The reproduction's arguments."""
    from trl_nca.demo.pipeline import METHODS

    parser = argparse.ArgumentParser(prog="python scripts/reproduce_results.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="runs/reproduce", help="caches and runs (default: %(default)s)")
    parser.add_argument("--docs-dir", default=str(ROOT / "docs"), help="results*.md, img/ and results/*.json go here")
    parser.add_argument("--regimes", nargs="+", choices=REGIMES, default=list(REGIMES))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--test-seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--tuning-seeds", type=int, nargs="+", default=[1000, 1001])
    parser.add_argument("--pool-seeds", type=int, nargs="+", default=list(range(5)), help="pool/offpolicy test seeds")
    parser.add_argument("--slice-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lr-grid", type=float, nargs="+", default=list(GRID_LR))
    parser.add_argument("--beta-grid", type=float, nargs="+", default=list(GRID_BETA))
    parser.add_argument(
        "--slice-points", type=float, nargs=2, action="append", metavar=("LR", "BETA"), default=None,
        help="an equal-settings point (repeat the flag); default: lr {3e-4, 1e-3} x β {0.5, 2}",
    )  # fmt: skip
    parser.add_argument("--size", choices=("tiny", "small"), default="small")
    parser.add_argument("--no-ablation", action="store_true", help="skip the α = 0 runs")
    parser.add_argument("--workers", type=int, default=2, help="worker processes, 1 torch thread each")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--from-json", action="store_true", help="only re-render the pages from DOCS_DIR/results/{regime}.json"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the reproduction (or only re-render it) and write the JSON, pages and figures. Returns the exit code."""
    from tqdm.auto import tqdm

    from trl_nca.cli_common import hold_optional_kernel_logs

    hold_optional_kernel_logs()
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.slice_points = args.slice_points or [list(p) for p in SLICE_POINTS]
    docs_dir = Path(args.docs_dir)
    json_dir = docs_dir / "results"
    sources = {regime: (json_dir / f"{regime}.json") for regime in args.regimes}
    if args.from_json:
        import results_report

        return results_report.main(["--docs-dir", str(docs_dir), *[str(p) for p in sources.values()]])
    if "self" not in args.regimes:
        print("error: --regimes must include self (the other regimes use its selected hyper-parameters)")
        return 2
    start = time.perf_counter()
    context = get_context("spawn")
    done: dict[tuple, dict[str, Any]] = {}
    with (
        ProcessPoolExecutor(args.workers, context, _init_worker, (args.output_dir, args.size)) as pool,
        tqdm(total=0, desc="reproduction jobs", disable=args.no_progress, dynamic_ncols=True) as bar,
    ):
        caches = {("self", s) for s in (*args.tuning_seeds, *args.test_seeds)}
        caches |= {("pool", s) for s in args.pool_seeds if {"pool", "offpolicy"} & set(args.regimes)}
        bar.total = len(caches)
        # the pool's caches (5 SFT models each) first, so the two workers finish together
        for future in [pool.submit(prepare_job, *c) for c in sorted(caches, key=lambda c: (c[0] == "self", c[1]))]:
            future.result()
            bar.update()
        first = plan(args, None)
        run_jobs(first, pool, args.workers, done, bar)
        selected = select(list(done.values()), tuple(args.methods))
        second = plan(args, selected)
        run_jobs(second, pool, args.workers, done, bar)
    wall = time.perf_counter() - start
    results = assemble(args, done, selected, first + second)
    command = "python scripts/reproduce_results.py" + (" " + shlex.join(argv) if argv else "")
    import torch

    json_dir.mkdir(parents=True, exist_ok=True)
    total_job_s = sum(result["regime_job_s"] for result in results.values())
    for regime, result in results.items():
        result.update(
            wall_s=wall,
            regime_wall_s=wall * result["regime_job_s"] / total_job_s,  # its share of the wall time
            machine=f"{platform.machine()}, {platform.system()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
            workers=args.workers,
            command=command,
        )
        sources[regime].write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {', '.join(str(p) for p in sources.values())} ({wall / 60:.1f} min)")
    import results_report

    return results_report.main(["--docs-dir", str(docs_dir), *[str(p) for p in sources.values()]])


if __name__ == "__main__":
    sys.exit(main())
