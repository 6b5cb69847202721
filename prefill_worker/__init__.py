"""prefill worker actor (see worker.py)."""
