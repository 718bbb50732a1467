"""``python -m shardgen``: see shardgen/cli.py."""

import sys

from shardgen.cli import main

sys.exit(main())
