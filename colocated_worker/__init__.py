"""colocated worker actor (see worker.py)."""
