"""`python -m bpflb.lab ARGS` runs `bpflb lab ARGS` without the rest of the CLI."""

from bpflb.lab.commands import main

raise SystemExit(main())
