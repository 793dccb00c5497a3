"""sa-engine's storage floor: the mask store, image sources, exports.

Imported first by every package of the engine, so it also fixes, before torch loads them, the thread runtimes'
settings a result depends on: OpenMP's and MKL's "dynamic" modes size their thread teams by the machine's load,
so the same training steps summed differently on a busy machine (measured: 294 of 813 holdout figures of a short
loop off by up to 1.1e-3 beside one busy process; with both off, 1 figure by 9e-8; tests/test_reproducible.py).
"""
import os

DETERMINISTIC_THREADS = {"OMP_DYNAMIC": "FALSE", "MKL_DYNAMIC": "FALSE"}
for _name, _value in DETERMINISTIC_THREADS.items():
    os.environ.setdefault(_name, _value)
