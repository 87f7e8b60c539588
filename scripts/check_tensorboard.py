#!/usr/bin/env python3
"""Reads a masklm run's TensorBoard event files with TensorBoard's own reader and prints each
scalar tag with its number of points and last value. Exits non-zero if nothing is readable.

    python scripts/check_tensorboard.py runs/quickstart/tensorboard
"""

import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def main() -> int:
    acc = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags().get("scalars", [])
    for tag in sorted(tags):
        events = acc.Scalars(tag)
        print(f"{tag} {len(events)} last_step={events[-1].step} last_value={events[-1].value:.6g}")
    return 0 if tags else 1


if __name__ == "__main__":
    sys.exit(main())
