"""Entry point for `python -m bpflb`, identical to the `bpflb` console script."""

from bpflb.cli import main

raise SystemExit(main())
