"""Profile both models of every paper pair on this machine's CPU (batch 2) and ship the JSON.

    python benchmarks/partition/profile_pairs.py [--pairs ...] [--batch 2]

Writes ``tspipe_fx/profiles/cpu/PAIR_student_b2.json`` and ``..._teacher_b2.json``; the
partition benchmark scales them to its micro-batch sizes through the symbolic FLOPs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent.parent))
from pairs import PAIRS, example

import tspipe_fx
from tspipe_fx.cost import profiles
from tspipe_fx.report.profile import render_summary


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for pair in args.pairs:
        torch.manual_seed(0)
        student, teacher, _ = PAIRS[pair]()
        inputs, kwargs = example(pair, args.batch)
        for role, model in (("student", student), ("teacher", teacher)):
            t0 = time.perf_counter()
            prof = tspipe_fx.profile(model, inputs, example_kwargs=kwargs, repeats=args.repeats)
            prof.save(profiles.path_of(f"cpu/{pair}_{role}_b{args.batch}"))
            print(f"{pair} {role}: {len(prof.nodes)} nodes in {time.perf_counter() - t0:.0f} s", flush=True)
            print(render_summary(prof), flush=True)


if __name__ == "__main__":
    main()
