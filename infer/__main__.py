"""``python -m infer``: see infer/cli.py."""

import os

# torch and numba each keep an OpenMP thread pool; with the default (active) wait policy idle
# workers spin and starve the other pool on small machines (see benchmarks/__init__.py). It
# must be set before either library loads, hence here, before infer.cli imports them.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import sys  # noqa: E402

from infer.cli import main  # noqa: E402

sys.exit(main())
