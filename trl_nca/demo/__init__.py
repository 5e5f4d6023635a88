"""The offline demo (`trl-nca demo`) and the reproduction (`scripts/reproduce_results.py`): digit sorting with a
graded ground-truth reward, SFT warm start, K-sample reward data, NCA / InfoNCA / DPO alignment and evaluation."""
