"""GPU diagnosis behind ``torch_device.prepare_device``: what a 64 x 256-token batched
generation (``generate_batch``, the transformers backend's decoding loop) costs on a thread
that has not seen its attention shapes, with and without cuDNN's attention kernel.

    python bench/gpu_attention.py            # on a CUDA machine (Vicuna-7B-shaped, bf16)
    python bench/gpu_attention.py --tiny     # the same code path on CPU with tiny shapes

A server runs each model's batches on its own device thread and meets new shapes all the
time (batch sizes, KV lengths, rows leaving the batch); cuDNN builds an execution plan per
shape and per thread. Runs, in order: the main thread twice, then fresh threads with cuDNN
attention on, off, off, on. No align2 backend is built (its start would turn cuDNN
attention off): the script calls the decoding loop itself and sets the switch per run.

The H200 figures in docs/benchmarks.md came from this script's prototype (the same model,
prompts, runs and order, written in one sitting on the GPU machine); this cleaned-up form
has run on CPU (``--tiny``) only.
"""

from __future__ import annotations

import argparse
import threading
import time

import torch
from gpu_align import build_model, rewrite_requests, synchronize

from align2.server.backends.chat import prompt_ids
from align2.server.backends.decoding import generate_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on CPU (a dry run)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=256)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    tokenizer, model = build_model(args.tiny, device)
    eos, pad = frozenset({tokenizer.eos_token_id}), tokenizer.pad_token_id  # the model's too
    requests = rewrite_requests(args.batch, args.new_tokens)
    prompts = [prompt_ids(tokenizer, r.messages) for r in requests]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"device: {name}; torch {torch.__version__}; attention {model.config._attn_implementation}"
    )

    def once(label: str) -> None:
        synchronize(device)
        started = time.perf_counter()
        with torch.inference_mode():
            made = generate_batch(
                model,
                prompts,
                [r.decoding for r in requests],
                [r.decoding.max_new_tokens for r in requests],
                eos_ids=eos,
                pad_id=pad,
                device=device,
            )
        synchronize(device)
        tokens = sum(len(d.tokens) for d in made)
        print(f"{label:<36} {time.perf_counter() - started:6.2f} s  ({tokens} tokens)", flush=True)

    def on_fresh_thread(label: str, cudnn: bool) -> None:
        torch.backends.cuda.enable_cudnn_sdp(cudnn)
        thread = threading.Thread(target=once, args=(label,))
        thread.start()
        thread.join()

    torch.backends.cuda.enable_cudnn_sdp(True)
    once("main thread, first run")
    once("main thread, second run")
    on_fresh_thread("fresh thread, cuDNN attention on", True)
    on_fresh_thread("fresh thread, cuDNN attention off", False)
    on_fresh_thread("fresh thread, cuDNN attention off", False)
    on_fresh_thread("fresh thread, cuDNN attention on", True)


if __name__ == "__main__":
    main()
