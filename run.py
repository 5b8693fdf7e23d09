#!/usr/bin/env python
"""mkd_ray entry point: `python run.py <command> ...` (see `python run.py --help`)."""

import sys

from mkd_ray.cli import main

if __name__ == "__main__":
    sys.exit(main())
