"""Registers adapters from a separate process, for tests/test_registry.py.

python tests/_registry_worker.py register ROOT NAME SRC COUNT GO_FILE
    wait until GO_FILE exists, register SRC as NAME COUNT times, print the versions
python tests/_registry_worker.py hang-after-stage ROOT NAME SRC
python tests/_registry_worker.py hang-after-rename ROOT NAME SRC
    register once, but print HANGING and sleep at that point (the test kills us there)
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import peftkit.registry.staging as staging
from peftkit.registry import Registry


def _hang_after(function_name: str) -> None:
    original = getattr(staging, function_name)

    def hanging(*args, **kwargs):
        result = original(*args, **kwargs)
        print("HANGING", flush=True)
        time.sleep(120)
        return result

    setattr(staging, function_name, hanging)


def main(argv: list[str]) -> None:
    mode, root, name, src = argv[:4]
    reg = Registry(root)
    meta = dict(
        method="lora",
        labels=("neg", "pos"),
        base_fingerprint="fp-worker",
        tags=(f"pid-{os.getpid()}",),
    )
    if mode == "register":
        count, go = int(argv[4]), Path(argv[5])
        while not go.exists():
            time.sleep(0.002)
        versions = [reg.register(name, src, **meta).version for _ in range(count)]
        print(" ".join(map(str, versions)), flush=True)
        return
    _hang_after({"hang-after-stage": "fill_stage", "hang-after-rename": "move_into_place"}[mode])
    reg.register(name, src, **meta)


if __name__ == "__main__":
    main(sys.argv[1:])
