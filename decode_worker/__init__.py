"""decode worker actor (see worker.py)."""
