"""Runnable entry points of trl-nca (``accelerate launch -m trl_nca.scripts.train CONFIG.yaml``)."""
