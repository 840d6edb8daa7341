"""``python -m bench.faults``: the long fault run against a fresh local stack; prints the table."""

from __future__ import annotations

import argparse
import sys

from bench.faults.harness import TARGETS, FaultRun
from tests.e2e.stack import Stack


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--apps", type=int, default=5)
    parser.add_argument("--rate", type=float, default=10.0, help="pushes per second")
    parser.add_argument("--settle", type=float, default=15.0, help="seconds of load between faults")
    parser.add_argument("--rounds", type=int, default=1, help="times every part is killed")
    args = parser.parse_args()
    stack = Stack(extra_env={"SHIPLINE_HEALTH_INTERVAL": "0.2", "SHIPLINE_RETRY_SCALE": "0.01"})
    try:
        took = stack.up()
        print(f"stack up in {took:.1f}s at {stack.base} (data {stack.data_dir})")
        run = FaultRun(stack, apps=args.apps, rate=args.rate, settle=args.settle, targets=TARGETS * args.rounds)
        result = run.run()
        print(result.table())
        ok = not (result.lost or result.duplicated or result.sequence_problems or result.outbound_missing
                  or result.outage_2xx)
        return 0 if ok else 1
    finally:
        stack.remove()


if __name__ == "__main__":
    sys.exit(main())
