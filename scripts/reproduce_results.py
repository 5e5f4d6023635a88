#!/usr/bin/env python
"""Reproduce docs/results.md: SFT only vs DPO (best-vs-worst, best-vs-each-other) vs Plackett-Luce DPO vs LiPO-λ vs
InfoNCA vs NCA on the offline demo task, same data and budget, 3 seeds, hyper-parameters tuned on a validation split
with the same grid for every method.

    python scripts/reproduce_results.py                 # ~20 min on 2 CPU cores: docs/results.md, docs/img/
    python scripts/reproduce_results.py --regime pool   # responses by 4 other models: docs/results_pool.md
    python scripts/reproduce_results.py --from-json docs/results/reproduce_self.json \
        --pool-json docs/results/reproduce_pool.json    # only re-render results.md (with the pool regime's claim 2)

Runs, cached SFT models and reward data and the raw `results.json` go to `--output-dir` (default `runs/reproduce`,
`runs/reproduce-pool` for `--regime pool`).
`trl-nca demo --compare` runs the same thing. Options: `python scripts/reproduce_results.py -h`.
"""

import sys
from pathlib import Path

from trl_nca.demo.compare import main

DOCS = Path(__file__).resolve().parent.parent / "docs"

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="python scripts/reproduce_results.py", default_docs_dir=DOCS))
