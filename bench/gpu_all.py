"""Every GPU measurement of the speed issue in one go, for a short loan of a GPU machine.

    python bench/gpu_all.py --data ../shared/data/align2llava-preference   # on a CUDA machine
    python bench/gpu_all.py --tiny --data ...                                # CPU dry run

Runs, one after the other, each in its own process with its own time limit (a step that
fails or runs out of time is reported and the next one runs):
  score       bench/gpu_score.py: LLaVA-1.5-7B-shaped reward model, share of the FLOP bound,
              the model called directly, and a profile of a served window;
  align       bench/gpu_align.py: 64 one-sample clients vs direct batched generation,
              batched by the core (static batches), then with continuous batching
              (models.NAME.continuous_rows = 64), on one build of the 7B model;
  projection  bench/curation_projection.py --gpu: the paper's whole job projected.
Prints the card, then per step its summary lines, and writes everything to ``--out``.
The steps' time limits add up to 540 s, so that the whole check fits one call of a lent
machine (600 s) and a rerun of one step (``--only``) fits the rest of a 15-minute loan.
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).parent
KEEP = (
    "device:",
    "served",
    "FLOP bound",
    "direct:",
    "total",
    "question ",
    "answer ",
    "align ",
    "projection",
    "model:",
    "profile",
)


def steps(args: argparse.Namespace) -> list[tuple[str, list[str], int]]:
    tiny = ["--tiny"] if args.tiny else []
    small = ["--clients", "8", "--new-tokens", "16"] if args.tiny else []
    data = ["--data", str(args.data)]
    projection = ["--conversations", "16", "--align-conversations", "4"] if args.tiny else []
    return [
        ("score", ["gpu_score.py", *tiny], 150),
        ("align", ["gpu_align.py", *tiny, *small, "--continuous-rows", "0,64"], 190),
        ("projection", ["curation_projection.py", "--gpu", *tiny, *data, *projection], 200),
    ]


def card() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"cpu (torch {torch.__version__})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on CPU (a dry run)")
    parser.add_argument("--data", type=pathlib.Path, required=True)
    parser.add_argument("--only", help="comma-separated step names")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("gpu_all.log"))
    args = parser.parse_args()
    wanted = set(args.only.split(",")) if args.only else None
    print(f"card: {card()}", flush=True)
    with args.out.open("w") as log:
        for name, command, limit in steps(args):
            if wanted is not None and name not in wanted:
                continue
            started = time.perf_counter()
            try:
                done = subprocess.run(
                    [sys.executable, str(HERE / command[0]), *command[1:]],
                    capture_output=True,
                    text=True,
                    timeout=limit,
                )
                output, status = done.stdout + done.stderr, f"exit {done.returncode}"
            except subprocess.TimeoutExpired as exc:
                output = "".join(
                    part.decode() if isinstance(part, bytes) else (part or "")
                    for part in (exc.stdout, exc.stderr)
                )
                status = f"timed out after {limit} s"
            seconds = time.perf_counter() - started
            log.write(f"== {name}: {' '.join(command)} ({status}, {seconds:.0f} s)\n{output}\n")
            print(f"== {name} ({status}, {seconds:.0f} s)", flush=True)
            for line in output.splitlines():
                if line.strip().startswith(KEEP):
                    print(f"   {line.strip()}", flush=True)


if __name__ == "__main__":
    main()
