"""Engines: where the pipeline's steps (load -> compute -> write) run. The default is pipeline/run.py's threads in
one process; engines/ray.py runs the same steps as a Ray Data pipeline across a cluster."""
