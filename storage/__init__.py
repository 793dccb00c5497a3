"""sa-engine's storage floor: the mask store, image sources, exports.

Imported first by every package of the engine, so it also fixes, before torch loads them, the thread runtimes'
settings a result depends on. With the defaults, a busy machine changed the figures: OpenMP's and MKL's "dynamic"
modes size thread teams by the load, and OpenMP threads spin while waiting, which on a loaded core both reorders
work and wastes it. Measured (2 cores, 20 steps of the compact model with 2 threads, alone / beside one
CPU-burning process): defaults 3.5 s / 34.5 s with a different loss; these settings 5.7 s / 6.5 s with the same
loss; a short loop's 813 holdout figures all equal (tests/test_reproducible.py). On an idle machine the compact
CPU model trains about 1.6x slower for it; a dedicated idle machine that wants speed over equal figures can export
OMP_WAIT_POLICY=ACTIVE (any value set before the engine starts is kept).
"""
import os

DETERMINISTIC_THREADS = {"OMP_DYNAMIC": "FALSE", "MKL_DYNAMIC": "FALSE", "OMP_WAIT_POLICY": "PASSIVE"}
for _name, _value in DETERMINISTIC_THREADS.items():
    os.environ.setdefault(_name, _value)
