"""`python -m bpflb_lab.lab ARGS` runs `bpflb lab ARGS` without the rest of the CLI."""

from bpflb_lab.lab.commands import main

raise SystemExit(main())
