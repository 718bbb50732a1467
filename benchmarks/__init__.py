"""Speed benchmarks, run as ``python -m benchmarks.<name>``; never collected by pytest."""

import os

# torch and numba each keep an OpenMP thread pool. With the default (active) wait policy idle
# workers spin, and on a small or shared machine they starve the other pool's threads: on 2
# cores Cellpose's compute_masks on a 400^2 image took 0.07 s with PASSIVE and 0.2-6.7 s
# without, depending on what ran before. PASSIVE is the fair setting for both sides of every
# comparison; it must be set before either library starts its pool, and this package is
# imported before any benchmark module.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
