"""The default layout is exact on every causal-LM architecture transformers ships, or it is not used.

For every model type in transformers' causal-LM auto mapping that `model_zoo` can build (tiny, random, fp32, sdpa
where supported), an NCATrainer with `kway_layout="auto"` and precomputed references, with and without
`padding_free`, must either keep the shared-prompt (or packed) layout with log-probs equal to the padded layout's, or
fall back to the padded layout. Never a silent difference, never a crash where padded works. Checked per model: the
policy's per-response log-probs of the first training batch (after the trainer's first-batch check) and the
precomputed reference log-probs, both against the plain padded layout (one right-padded row per response, TRL's way).

`python tests/test_layout_zoo.py --json docs/results/layout_zoo.json --markdown docs/layout_zoo.md` runs the same
check for every type and writes the table docs/usage.md links to.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import cpu_args  # noqa: E402
from datasets import Dataset  # noqa: E402
from model_zoo import CAUSAL_LM_TYPES, UNBUILDABLE, build_tiny_causal_lm, check_unbuildable  # noqa: E402
from test_shared_prompt import kway_rows  # noqa: E402

from trl_nca import NCAConfig, NCATrainer  # noqa: E402
from trl_nca.layout import grouped_examples  # noqa: E402

RTOL, ATOL = 1e-4, 1e-4  # per response log-prob: what "equal to padded" means here (fp32)
# Types on which `auto` may not keep the shared-prompt layout unpacked: TRL's and our most common targets.
MUST_SHARE = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe", "gemma2", "gemma3_text", "phi3", "gpt2")


def layout_case(model_type: str, tokenizer, output_dir: Path, padding_free: bool, layout: str = "auto") -> dict:
    """One trainer on `kway_rows()`: the layout it ends with and the largest differences from the padded layout."""
    model = build_tiny_causal_lm(model_type, vocab_size=len(tokenizer))
    args = cpu_args(
        NCAConfig,
        output_dir,
        kway_layout=layout,
        padding_free=padding_free,
        precompute_ref_log_probs=True,
        precompute_ref_batch_size=4,
        per_device_train_batch_size=4,
        beta=0.5,
    )
    trainer = NCATrainer(model, args=args, train_dataset=Dataset.from_list(kway_rows()), processing_class=tokenizer)
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    batch = trainer._exact_layout([trainer.model], trainer._prepare_inputs(trainer.data_collator(rows)))
    padded = dataclasses.replace(trainer.data_collator, layout="padded", padding_free=False)
    oracle_inputs = {
        **{key: batch[key] for key in ("response_index", "response_mask")},
        **trainer._prepare_inputs(padded.collate_sequences(grouped_examples(batch))),
    }
    model = trainer.model.eval()
    with torch.no_grad():
        logps = trainer._forward_logps(model, batch)[1]
        oracle = trainer._forward_logps(model, oracle_inputs)[1]
    mask = batch["response_mask"]
    excess = ((logps - oracle).abs() - (ATOL + RTOL * oracle.abs()))[mask].max().item()
    ref_excess = ((batch["ref_logps"] - oracle).abs() - (ATOL + RTOL * oracle.abs()))[mask].max().item()
    return {
        "layout": trainer.data_collator.layout,
        "packed": trainer.data_collator.padding_free,
        "max_abs_diff": (logps - oracle).abs()[mask].max().item(),
        "max_rel_diff": ((logps - oracle).abs() / oracle.abs().clamp_min(1e-6))[mask].max().item(),
        "ref_max_abs_diff": (batch["ref_logps"] - oracle).abs()[mask].max().item(),
        "excess": max(excess, ref_excess),
        "attn": getattr(model.config, "_attn_implementation", None),
    }


BUILDABLE = [model_type for model_type in CAUSAL_LM_TYPES if model_type not in UNBUILDABLE]


@pytest.mark.parametrize("model_type", BUILDABLE)
def test_the_auto_layout_is_exact_or_padded(tmp_path, tokenizer, model_type):
    torch.set_num_threads(1)
    for padding_free in (False, True):
        case = layout_case(model_type, tokenizer, tmp_path / str(padding_free), padding_free)
        label = f"{model_type} padding_free={padding_free} -> {case['layout']} packed={case['packed']}"
        assert case["excess"] <= 0, f"{label}: differs from the padded layout by {case['max_abs_diff']:.3g} nats"
        if case["layout"] == "padded" and not case["packed"]:
            assert case["max_abs_diff"] == 0, label  # the fallback is the oracle's layout itself
        if model_type in MUST_SHARE:
            assert (case["layout"], case["packed"]) == ("shared_prompt", padding_free), label
    # Packing asked for explicitly (`kway_layout="padded"`): exact, or one line saying why not.
    try:
        case = layout_case(model_type, tokenizer, tmp_path / "packed", True, layout="padded")
    except ValueError as error:
        assert "padding_free=True cannot" in str(error) and "\n" not in str(error), error
    else:
        assert (case["layout"], case["packed"]) == ("padded", True) and case["excess"] <= 0, model_type


@pytest.mark.parametrize("model_type", sorted(UNBUILDABLE))
def test_every_type_left_out_really_fails(model_type):
    """Built anyway, each type of `UNBUILDABLE` fails the builder's check (TRL's fused head against the model's own
    logits, causality, or the forward itself), so no type is left out of the test above without cause."""
    reason = UNBUILDABLE[model_type]
    with pytest.raises(Exception) as error:
        check_unbuildable(model_type)
    if "fused head" in reason and "last_hidden_state" not in reason:  # wrong log-probs, not a crash
        assert "differ from the plain logits" in str(error.value), error.value
    if "bidirectional" in reason and "crashes" not in reason:
        assert "not causal" in str(error.value), error.value


def test_the_committed_table_is_rendered_from_the_committed_results():
    root = Path(__file__).resolve().parents[1]
    record = json.loads((root / "docs" / "results" / "layout_zoo.json").read_text())
    assert (root / "docs" / "layout_zoo.md").read_text() == render(record)
    assert [row["model_type"] for row in record["rows"]] == CAUSAL_LM_TYPES


def test_the_models_that_broke_on_main_are_covered():
    """The issue's report: OPT (packed), MPT/Bloom (ALiBi) and RWKV (recurrent) are built and run above."""
    for model_type in ("opt", "mpt", "bloom", "rwkv", "mamba", "falcon_h1", "lfm2", "qwen3_next"):
        assert model_type in CAUSAL_LM_TYPES and model_type not in UNBUILDABLE, model_type


# ------------------------------------------------------------------------------------------------ the docs table
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--markdown", type=Path, required=True)
    parser.add_argument("types", nargs="*", default=CAUSAL_LM_TYPES)
    options = parser.parse_args()
    import tempfile

    import transformers
    from tqdm.auto import tqdm

    import trl_nca.trainer as trainer_module
    from trl_nca.tiny import build_tokenizer

    torch.set_num_threads(1)
    tokenizer = build_tokenizer()
    logged: list[str] = []  # the trainer's fallback lines: the reason each row gives
    trainer_module.logger.warning_once = lambda message, *args, **kwargs: logged.append(str(message))
    rows = []
    for model_type in tqdm(options.types, desc="model types"):
        if model_type in UNBUILDABLE:
            rows.append({"model_type": model_type, "unbuildable": UNBUILDABLE[model_type]})
            continue
        row = {"model_type": model_type}
        for key, padding_free, layout in (
            ("rows", False, "auto"),
            ("padding_free", True, "auto"),
            ("explicit_packed", True, "padded"),
        ):
            start, logged[:] = time.perf_counter(), []
            with tempfile.TemporaryDirectory() as out:
                try:
                    case = layout_case(model_type, tokenizer, Path(out), padding_free, layout)
                except ValueError as error:  # explicit packing that cannot be exact
                    case = {"raises": str(error)}
            if logged:
                case["reason"] = logged[-1].split(" because ", 1)[-1].rstrip(".")
            case["seconds"] = round(time.perf_counter() - start, 2)
            row[key] = case
        rows.append(row)
    options.json.parent.mkdir(parents=True, exist_ok=True)
    record = {"transformers": transformers.__version__, "torch": torch.__version__, "rows": rows}
    options.json.write_text(json.dumps(record, indent=1) + "\n")
    options.markdown.write_text(render(record))


def _difference(case: dict) -> str:
    return f"{max(case['max_abs_diff'], case['ref_max_abs_diff']):.2g}"


def _layout(case: dict) -> str:
    return f"{case['layout']}{' (packed)' if case['packed'] else ''}"


def render(record: dict) -> str:
    ok = [r for r in record["rows"] if "unbuildable" not in r]
    kept = [r[key] for r in ok for key in ("rows", "padding_free") if r[key]["layout"] == "shared_prompt"]
    summary = {
        "shared": sum(r["rows"]["layout"] == "shared_prompt" for r in ok),
        "abs": max(max(case["max_abs_diff"], case["ref_max_abs_diff"]) for case in kept),
        "rel": max(case["max_rel_diff"] for case in kept),
        "explicit": sum("raises" not in r["explicit_packed"] for r in ok),
    }
    lines = [
        "# Which layout each architecture gets",
        "",
        f"Rendered from `docs/results/layout_zoo.json` by `python tests/test_layout_zoo.py --json "
        f"docs/results/layout_zoo.json --markdown docs/layout_zoo.md` (transformers {record['transformers']}, torch "
        f"{record['torch']}, CPU, fp32). Every causal-LM model type of transformers' auto mapping, as a tiny random "
        "model (`tests/model_zoo.py`), trained by `NCATrainer` with `kway_layout='auto'` and precomputed references, "
        "without and with `padding_free=True`, and with packing asked for explicitly (`kway_layout='padded', "
        "padding_free=True`: used when exact, else the trainer raises). *Largest difference*: the largest |log-prob difference| of a response "
        "of the first batch (policy, and the precomputed reference) against the plain padded layout, in nats; 0 where "
        "the trainer uses the padded layout itself. `tests/test_layout_zoo.py` asserts every row.",
        "",
        f"{len(ok)} of {len(record['rows'])} model types built and checked. {summary['shared']} keep the shared-prompt "
        f"layout (`auto`), with log-probs within {summary['abs']:.2g} nats ({summary['rel']:.2g} relative) of the "
        f"padded layout's; {len(ok) - summary['shared']} fall back to the padded layout. Explicit packing is exact "
        f"on {summary['explicit']} and raises on the others.",
        "",
        "| model type | attention | `auto` | largest difference | `auto` + `padding_free` | largest difference | "
        "`padded` + `padding_free` | why not shared |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in ok:
        rows, packed, explicit = row["rows"], row["padding_free"], row["explicit_packed"]
        why = rows.get("reason") or packed.get("reason") or ""
        if not why and "raises" in explicit:
            why = "packing only: " + explicit["raises"].split(": ", 1)[-1].split(". ")[0]
        why = why.replace("|", "/")
        explicit_cell = "raises" if "raises" in explicit else f"exact ({_difference(explicit)})"
        lines.append(
            f"| {row['model_type']} | {rows['attn']} | {_layout(rows)} | {_difference(rows)} | {_layout(packed)} | "
            f"{_difference(packed)} | {explicit_cell} | {why} |"
        )
    lines += ["", "## Not built", "", "| model type | why |", "|---|---|"]
    lines += [f"| {r['model_type']} | {r['unbuildable']} |" for r in record["rows"] if "unbuildable" in r]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
