"""Memory and throughput of the two ways to serve the paper's two reward heads
(`python bench/shared_base.py`).

- merged: each LoRA adapter merged into its own copy of the base (`align2 convert-reward`;
  what `models.NAME.adapter` alone serves): two full models, a device thread each.
- shared: one base in memory, each head's LoRA adapter, projector and score head applied
  per batch on its one device thread (`share_base = true`); the tower runs once per image.

Inputs are tiny-but-not-trivial release-format stand-ins built offline
(align2.server.models.original_builders): an original-LLaVA base with a Llama text half
256 x 2 layers and a CLIP tower 64 x 2 layers at 224 px (256 image tokens; LLaVA-1.5 has
576 at 336 px, which takes too long here), and two PEFT reward adapters on every LLM linear
layer. The LoRA is as wide relative to the model as the released one (r / hidden = 8 / 256
= 128 / 4096), so unmerged it adds about the same share of FLOPs (4.5%; 7B: 4.9%). The
tower is ~8% of a forward's FLOPs here, ~4% in the 7B model.

Memory: each mode is loaded in a fresh process that first imports every module either mode
uses, then reports the parameter bytes (the distinct tensor storages of both heads'
models) and its RSS before loading, after loading and after one Score call. Throughput:
both modes are loaded in one more process and Score calls with both heads alternate
between them (the core's Scorer and one batcher per head, as served, without gRPC), each
pair of calls on new images; the median of REPEATS calls per mode (``--breakdown``: also
calls with one head). Then the parameter bytes of LLaVA-1.5-7B in bf16 are computed from
its architecture's parameter counts (built on the meta device). ``--size large`` measures
memory only, on a text half 1024 x 8 layers where the parameters outweigh the process's
fixed costs.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import io
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SAMPLES = 32
REPEATS = 3
SIZES: dict[str, dict[str, int]] = {
    # r / text_hidden = 128 / 4096, as the released adapters over the 7B base.
    "small": {"text_hidden": 256, "text_layers": 2, "text_heads": 4, "r": 8},
    # Memory only: parameters dominate the process's fixed costs (tokenizer, processor,
    # Python objects), which they do not at the small size.
    "large": {"text_hidden": 1024, "text_layers": 8, "text_heads": 8, "r": 32},
    # The embedded defaults (what `make serve` serves): the SmolLM2-135M base (576 x 30
    # layers, bf16 weights loaded as float32) and the two shipped adapters (r=8, top 4 layers).
    "embedded": {},
}


# -- inputs (parent) ------------------------------------------------------------------------
def build_inputs(root: pathlib.Path, size: str) -> dict[str, pathlib.Path]:
    from align2.server.models import original_builders as ob
    from align2.server.models.convert_reward import convert_reward

    root = root / size
    if size == "embedded":
        return _embedded_inputs(root)
    shape = dict(SIZES[size])
    rank = shape.pop("r")
    paths = {name: root / name for name in ("clip", "base", "question", "answer")}
    if (root / "merged-answer" / "config.json").exists():
        return paths | {f"merged-{h}": root / f"merged-{h}" for h in ("question", "answer")}
    clip = ob.build_clip_tower(paths["clip"], hidden=64, layers=2, heads=2, image_size=224)
    base = ob.build_original_base(paths["base"], clip, vocab_size=1024, **shape)
    for seed, head in enumerate(("question", "answer"), start=1):
        ob.build_reward_adapter(paths[head], base, seed=seed, r=rank, lora_alpha=2 * rank)
        paths[f"merged-{head}"] = convert_reward(
            base, paths[head], root / f"merged-{head}", vision_tower=clip
        )
    return paths


def _embedded_inputs(root: pathlib.Path) -> dict[str, pathlib.Path]:
    """The embedded base, tower and shipped adapters (built in ``root``/cache), and each
    adapter merged into its own copy as convert-reward does."""
    from align2.server.models import embedded
    from align2.server.models.convert_reward import convert_reward

    cache = root / "cache"
    paths = {
        "clip": embedded.ensure(embedded.REWARD_VISION, cache),
        "base": embedded.ensure(embedded.REWARD_BASE, cache),
        **{h: embedded.ensure(name, cache) for h, name in embedded.LORA_ADAPTERS.items()},
    }
    for head in ("question", "answer"):
        merged = root / f"merged-{head}"
        if not (merged / "config.json").exists():
            convert_reward(paths["base"], paths[head], merged, vision_tower=paths["clip"])
        paths[f"merged-{head}"] = merged
    return paths


# -- one mode (child process) ---------------------------------------------------------------
def rss_bytes() -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def storage_bytes(tensors: Any) -> int:
    """Bytes of the distinct storages behind ``tensors`` (shared ones count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def load(mode: str, paths: dict[str, pathlib.Path]) -> tuple[dict[str, Any], int, Any]:
    """Both heads' backends, their parameter bytes, and a tower-image counter."""
    import torch

    from align2.server.backends import load_shared_scoring
    from align2.server.backends.transformers_scoring import TransformersScoring
    from align2.server.config import ModelConfig

    def tensors(module: torch.nn.Module) -> list[torch.Tensor]:
        return [*module.parameters(), *(b for b in module.buffers() if b is not None)]

    if mode == "merged":
        heads = {
            head: TransformersScoring.load(
                head, ModelConfig(path=str(paths[f"merged-{head}"])), paths[f"merged-{head}"]
            )
            for head in ("question", "answer")
        }
        owned = [t for h in heads.values() for t in (*tensors(h._base), h._head)]
        counter = TowerCounter([h._base.vision_tower for h in heads.values()])
        return heads, storage_bytes(owned), counter
    configs = {
        head: ModelConfig(
            path=str(paths["base"]),
            adapter=str(paths[head]),
            vision_tower=str(paths["clip"]),
            share_base=True,
        )
        for head in ("question", "answer")
    }
    shared = load_shared_scoring(configs, paths["base"].parent)
    base = shared["question"].shared_base  # type: ignore[attr-defined]
    owned = [*tensors(base.model), *(h._head for h in shared.values())]  # type: ignore[attr-defined]
    owned += [t for p in base.projectors.values() for t in tensors(p)]
    return shared, storage_bytes(owned), TowerCounter([base.model.vision_tower])


class TowerCounter:
    """Images through the vision tower(s): a forward hook on each."""

    def __init__(self, towers: list[Any]) -> None:
        self.images = 0
        for tower in towers:
            tower.register_forward_hook(self._hook)

    def _hook(self, module: Any, args: tuple[Any, ...], output: Any) -> None:
        self.images += args[0].shape[0]


def samples(count: int, call: int = 0) -> list[Any]:
    """COCO-sized JPEGs, one per sample and call (no image is scored twice across calls, so
    the shared base's feature cache helps only within a call); 1, 2 or 3 turns."""
    from PIL import Image

    from align2.client import Sample, Turn

    out = []
    for i in range(count):
        buffer = io.BytesIO()
        Image.effect_noise((640, 480), 20 + i + 50 * call).convert("RGB").save(buffer, "JPEG")
        turns = [
            Turn(f"What is happening in region {i % 7} of the picture?", "A dog runs on grass."),
            Turn("Why is it doing that?", "It is chasing a ball that a child threw for it."),
            Turn("What colour is the ball?", "Red, with a white stripe."),
        ][: 1 + i % 3]
        out.append(Sample(id=str(i), image=buffer.getvalue(), turns=turns))
    return out


class Mode:
    """One way of serving, ready for Score calls: both heads, a batcher each, a Scorer."""

    def __init__(self, backends: dict[str, Any], counter: TowerCounter) -> None:
        from align2.server.config import BatchingConfig, LimitsConfig, ScoreConfig
        from align2.server.core.runtime import ScoringRuntime
        from align2.server.core.scoring import Scorer

        self.counter = counter
        self.runtimes = {n: ScoringRuntime(b, BatchingConfig()) for n, b in backends.items()}
        for runtime in self.runtimes.values():
            runtime.start()
        self.scorer = Scorer(self.runtimes, ScoreConfig(), LimitsConfig(), POOL)

    async def call(self, batch: list[Any], head: str = "both") -> tuple[float, int]:
        """samples/s of one Score call with both heads (or one), and its tower images."""
        from align2.server.core.scoring import Head, ScoreCall

        heads = frozenset(Head) if head == "both" else frozenset({Head(head)})
        images, started = self.counter.images, time.perf_counter()
        outcome = await self.scorer.score(ScoreCall(samples=batch, heads=heads))
        seconds = time.perf_counter() - started
        assert all(r.error is None for r in outcome.results), outcome.results
        return len(batch) / seconds, self.counter.images - images


POOL: Any = None


def speed(root: pathlib.Path, size: str, breakdown: bool) -> dict[str, Any]:
    """Both modes in one process, their calls interleaved (merged, shared, shared, merged,
    ...), so that both see the same machine state; a new set of images for every pair of
    calls, so that no image's features are cached from an earlier call. ``breakdown``: also
    calls with one head only (``merged/question``, ...)."""
    from concurrent.futures import ThreadPoolExecutor

    global POOL
    POOL = ThreadPoolExecutor(2)  # the server's default batching.preprocess_workers
    paths = build_inputs(root, size)

    async def run() -> dict[str, Any]:
        modes = {m: Mode(*load(m, paths)[::2]) for m in ("merged", "shared")}
        for mode in modes.values():  # warm-up
            await mode.call(samples(4, call=99))
        heads = ["both", "question", "answer"] if breakdown else ["both"]
        rates: dict[str, list[float]] = {}
        towers: dict[str, int] = {}
        for call in range(REPEATS):
            for head in heads:
                batch = samples(SAMPLES, call + 10 * heads.index(head))
                order = list(modes) if call % 2 == 0 else list(reversed(modes))
                for name in order:
                    key = name if head == "both" else f"{name}/{head}"
                    rate, towers[key] = await modes[name].call(batch, head)
                    rates.setdefault(key, []).append(rate)
        for mode in modes.values():
            for runtime in mode.runtimes.values():
                await runtime.batcher.close()
        return {"samples_per_s": rates, "tower_images": towers}

    result = asyncio.run(run())
    result["inputs_per_call"] = sum(1 + len(s.turns) for s in samples(SAMPLES))
    return result


def memory(mode: str, root: pathlib.Path, size: str) -> dict[str, Any]:
    """Parameter bytes and RSS of one mode, loaded in a fresh process: after loading, and
    after one Score call (which touches every weight: a weight file mapped into memory
    counts in RSS only once read)."""
    import torch  # noqa: F401  (imported before the first RSS reading, as every module a
    import transformers  # noqa: F401  mode uses: RSS then differs by the models alone)

    import align2.server.backends.shared_scoring  # and peft
    import align2.server.backends.transformers_scoring
    import align2.server.models.convert_reward  # noqa: F401

    paths = build_inputs(root, size)
    batch = samples(4, call=98)
    before = rss_bytes()
    started = time.perf_counter()
    backends, params, counter = load(mode, paths)
    loaded = time.perf_counter() - started
    _trim()
    after_load = rss_bytes()

    async def one_call() -> None:
        global POOL
        from concurrent.futures import ThreadPoolExecutor

        POOL = ThreadPoolExecutor(2)
        mode = Mode(backends, counter)
        await mode.call(batch)
        for runtime in mode.runtimes.values():
            await runtime.batcher.close()

    asyncio.run(one_call())
    _trim()
    return {
        "param_bytes": params,
        "rss_before": before,
        "rss_loaded": after_load,
        "rss_scored": rss_bytes(),
        "load_seconds": loaded,
    }


def _trim() -> None:
    """Give what was freed back to the system, so that RSS shows what is held."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


# -- LLaVA-1.5-7B from parameter counts -----------------------------------------------------
def computed_7b() -> dict[str, float]:
    """Parameter counts of LLaVA-1.5-7B's scoring model (no LM head), its projector and an
    r=128 LoRA on every LLM linear layer, from the architecture built on the meta device."""
    import torch
    from gpu_shapes import CLIP_L_336, VICUNA_7B  # the 7B shapes, kept in one place
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaModel

    # llava-v1.5-7b's 32000 rows and the <image> row the conversion adds.
    text = LlamaConfig(**{**VICUNA_7B, "vocab_size": 32001})
    vision = CLIPVisionConfig(**CLIP_L_336)
    config = LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-2)
    with torch.device("meta"):
        model = LlavaModel(config)
    total = sum(p.numel() for p in model.parameters())
    projector = sum(p.numel() for p in model.multi_modal_projector.parameters())
    shapes = [(4096, 4096)] * 4 + [(4096, 11008)] * 2 + [(11008, 4096)]
    lora = 32 * sum(128 * (i + o) for i, o in shapes)
    head = 4096
    return {
        "merged_one": total + head,
        "projector": projector,
        "lora": lora,
        "merged_two": 2 * (total + head),
        "shared": total - projector + 2 * (lora + projector + head),
    }


# -- report ---------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)  # memory:MODE | speed
    parser.add_argument("--dir", type=pathlib.Path, help="where inputs are built (reused)")
    parser.add_argument(
        "--breakdown", action="store_true", help="also time calls with one head only"
    )
    parser.add_argument(
        "--size",
        choices=sorted(SIZES),
        default="small",
        help="small: memory and throughput (default); large: memory only, a text half "
        "1024 x 8 layers (r=32); embedded: memory and throughput of the embedded defaults",
    )
    args = parser.parse_args()
    if args.child:
        kind, _, mode = args.child.partition(":")
        run = {"memory": lambda: memory(mode, args.dir, args.size)}
        print(json.dumps(run.get(kind, lambda: speed(args.dir, args.size, args.breakdown))()))
        return
    started = time.perf_counter()
    children = ["memory:merged", "memory:shared"] + (["speed"] if args.size != "large" else [])
    with tempfile.TemporaryDirectory(prefix="align2-shared-") as scratch:
        root = args.dir or pathlib.Path(scratch)
        build_inputs(root, args.size)
        results = {child: _run_child(child, root, args.size, args.breakdown) for child in children}
    print(f"size {args.size}: {SIZES[args.size]}")
    report(results, computed_7b())
    print(
        f"(this run: {time.perf_counter() - started:.0f} s; load average {os.getloadavg()[0]:.1f})"
    )


def _run_child(child: str, root: pathlib.Path, size: str, breakdown: bool) -> dict[str, Any]:
    flags = ["--breakdown"] if breakdown else []
    out = subprocess.run(
        [sys.executable, __file__, "--child", child, "--dir", str(root), "--size", size, *flags],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def report(results: dict[str, dict[str, Any]], big: dict[str, float]) -> None:
    mb = 1e6
    speed = results.get("speed")
    rates = {m: statistics.median(r) for m, r in speed["samples_per_s"].items()} if speed else {}
    if speed:
        print(
            f"Score calls of {SAMPLES} samples ({speed['inputs_per_call']} inputs), both heads; "
            f"median of {REPEATS} interleaved calls per mode"
        )
    print(
        f"{'mode':<7} {'param MB':>9} {'RSS before':>11} {'+ loaded':>9} {'+ scored':>9} "
        f"{'load s':>7} {'samples/s':>10} {'tower images':>13}"
    )
    for mode in ("merged", "shared"):
        row = results[f"memory:{mode}"]
        print(
            f"{mode:<7} {row['param_bytes'] / mb:9.2f} {row['rss_before'] / mb:11.1f} "
            f"{(row['rss_loaded'] - row['rss_before']) / mb:9.1f} "
            f"{(row['rss_scored'] - row['rss_before']) / mb:9.1f} "
            f"{row['load_seconds']:7.2f} {rates.get(mode, float('nan')):10.2f} "
            f"{speed['tower_images'][mode] if speed else '-':>13}"
        )
    merged, shared = results["memory:merged"], results["memory:shared"]
    ratio = (
        f"shared / merged: parameter bytes {shared['param_bytes'] / merged['param_bytes']:.3f}, "
        f"RSS after a call {_held(shared) / _held(merged):.3f}"
    )
    if speed:
        calls = "; ".join(
            f"{m} " + ", ".join(f"{r:.2f}" for r in speed["samples_per_s"][m])
            for m in ("merged", "shared")
        )
        ratio += f", samples/s {rates['shared'] / rates['merged']:.3f} (calls: {calls})"
    print(ratio)
    for head in ("question", "answer"):
        if f"merged/{head}" in rates:
            merged_rate, shared_rate = rates[f"merged/{head}"], rates[f"shared/{head}"]
            print(
                f"  {head} head only: merged {merged_rate:.2f}, shared {shared_rate:.2f} "
                f"samples/s ({shared_rate / merged_rate:.3f}); tower images "
                f"{speed['tower_images'][f'merged/{head}']} vs "
                f"{speed['tower_images'][f'shared/{head}']}"
            )
    print("LLaVA-1.5-7B in bf16, computed from parameter counts (not measured):")
    one = big["merged_one"]
    print(f"  one merged model (no LM head) {one / 1e9:.3f} B params = {2 * one / 1e9:.2f} GB")
    print(f"  merged, both heads            {2 * big['merged_two'] / 1e9:.2f} GB")
    print(
        f"  shared, both heads            {2 * big['shared'] / 1e9:.2f} GB "
        f"(per head: LoRA r=128 {big['lora'] / 1e6:.1f} M = {2 * big['lora'] / 1e9:.2f} GB, "
        f"projector {big['projector'] / 1e6:.1f} M)"
    )
    print(f"  saved                         {2 * (big['merged_two'] - big['shared']) / 1e9:.2f} GB")


def _held(row: dict[str, Any]) -> float:
    return float(row["rss_scored"] - row["rss_before"])


if __name__ == "__main__":
    main()
