"""A stand-in for the bpflb agent in the lab's plumbing tests (how `lab up` waits for, and reports on,
agents that get ready, die or hang).  It programs nothing: datapath behaviour is tested with the real
agent in tests/lab/test_datapath.py.

    fake_agent.py --node NODE --source-dir DIR --pin-root DIR --behaviour ready|die|hang
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--node", required=True)
    parser.add_argument("--source-dir", type=Path, required=True)
    parser.add_argument("--pin-root", type=Path, required=True)
    parser.add_argument("--netns", help="accepted for template compatibility")
    parser.add_argument("--behaviour", default="ready", choices=["ready", "die", "hang"])
    args = parser.parse_args()
    print(f"fake agent {args.node}: {args.behaviour}", flush=True)
    if args.behaviour == "die":
        print("fake agent: cannot attach to eth0 (simulated failure)", flush=True)
        return 3
    if args.behaviour == "hang":
        time.sleep(3600)
        return 0
    args.pin_root.mkdir(parents=True, exist_ok=True)
    if not os.path.lexists(args.pin_root / "ready"):
        os.symlink("synced", args.pin_root / "ready")
    while True:
        time.sleep(1)


if __name__ == "__main__":
    sys.exit(main())
