"""``align2 train-lora`` end to end: the method's reward models, LoRA + head, Bradley-Terry.

Per head: an untrained adapter in the release layout (LoRA on the top ``layers`` decoder
layers, PEFT's initialisation: the base exactly; a head drawn as the reference's model draws
it) is loaded by the server's shared-base backend over the base, the exact path ``make
serve`` takes. The hidden states entering the first adapted layer are captured from that
backend (cached), the top layers are trained on them (training.lora), and the epoch with the
best validation accuracy (images held out, never candidates) is written as the release
writes an adapter (training.adapter_files). Finally the written adapter is loaded by the
server's backend again and scores a few validation inputs: the report gives the largest
difference from the tool's scores. The test file is read only with ``evaluate_test``, and
nothing is chosen by it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from align2.server.backends.checkpoint import folder_revision
from align2.server.backends.shared_scoring import SharedHeadScoring, load_shared
from align2.server.config import LimitsConfig, ModelConfig
from align2.server.core.templates import TEMPLATE_VERSION
from align2.server.models import embedded
from align2.server.models.shared_llava import read_head
from align2.server.training import data, features, lora, lora_selection
from align2.server.training.adapter_files import (
    LoraShape,
    initial_head,
    initial_lora,
    write_adapter,
)
from align2.server.training.evaluate import length_scores, pairwise_accuracy
from align2.server.training.layer_inputs import LayerInputs, cached_layer_inputs
from align2.server.training.lora_selection import Selection
from align2.server.training.pipeline import FILES
from align2.server.training.report import SplitResult

log = logging.getLogger(__name__)

SEEDS: dict[str, int] = {"question": 1, "answer": 2}
"""Seed of each head's initial LoRA A and head (and of its training order)."""

SELECTION: dict[str, Selection] = {
    "question": Selection(learning_rates=(3e-4, 1e-3)),
    # 3-fold: answer-dev.json has 112 images, so one 20% split validates on 22 of them.
    # One rate: on every validation look at this file (three rates explored, then a 20%
    # split) 1e-3 led at every epoch; each more rate costs as much as the three folds.
    "answer": Selection(learning_rates=(1e-3,), folds=3),
}
"""How each head's (learning rate, epoch) is chosen; see training.lora_selection."""


@dataclass(frozen=True)
class TrainLoraConfig:
    """Typed options of ``align2 train-lora`` (argv and environment are read in main)."""

    data_dir: pathlib.Path
    cache_dir: pathlib.Path
    heads: tuple[str, ...] = ("question", "answer")
    base: str = embedded.PREFIX + embedded.REWARD_BASE
    vision_tower: str = embedded.PREFIX + embedded.REWARD_VISION
    out: pathlib.Path | None = None
    """Write the adapters here as ``reward-{head}-lora/`` (the shipped ones:
    align2/server/models/adapters)."""
    evaluate_test: bool = False
    layers: int = 4
    """Top decoder layers that get LoRA."""
    r: int = 8
    alpha: int = 16
    train: lora.LoraTrainConfig = field(default_factory=lora.LoraTrainConfig)
    selection: Mapping[str, Selection] = field(default_factory=lambda: dict(SELECTION))
    """Per head: the learning rates tried and how (rate, epoch) is chosen."""
    val_fraction: float = 0.2
    """Images held out by a head chosen on one split (``Selection.folds == 0``)."""
    split_seed: int = 0
    batch_size: int = 16
    max_text_tokens: int = LimitsConfig.max_text_tokens


@dataclass(frozen=True)
class LoraReport:
    head: str
    shape: LoraShape
    train_groups: int
    train_pairs: int
    best_epoch: int
    lr: float
    learning_rates: tuple[float, ...]
    folds: int
    """0: chosen on one held-out split; k: by k-fold cross-validation."""
    epochs: tuple[lora.Epoch, ...]
    """Of the kept learning rate: accuracy by epoch, held-out or out-of-fold."""
    splits: tuple[SplitResult, ...]
    capture_seconds: float
    layer_inputs_cached: bool
    """Every layer input was read from the cache (nothing computed)."""
    train_seconds: float
    served_difference: float
    """Largest |server score - tool score| over the checked validation inputs."""


async def run(config: TrainLoraConfig) -> list[LoraReport]:
    unknown = sorted(set(config.heads) - set(FILES))
    if unknown:
        raise ValueError(f"unknown heads {unknown}; valid: {', '.join(FILES)}")
    for head in config.heads:
        if _selection(head, config).folds:  # refused before any training when missing
            log.info("%s: chosen by k-fold cross-validation (val_fraction does not apply)", head)
    return [await _run_head(head, config) for head in config.heads]


def _model_config(base: pathlib.Path, adapter: pathlib.Path, tower: pathlib.Path) -> ModelConfig:
    return ModelConfig(
        path=str(base),
        adapter=str(adapter),
        vision_tower=str(tower),
        share_base=True,
        dtype="float32",
        device="cpu",
    )


def load_head(
    head: str, base: pathlib.Path, adapter: pathlib.Path, tower: pathlib.Path
) -> SharedHeadScoring:
    """The server's backend for one adapter over ``base`` (shared-base mode)."""
    inputs = read_head(base, adapter, tower)
    loaded = load_shared(base, {head: (_model_config(base, adapter, tower), inputs)})
    return loaded[head]


def lora_sizes(config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(in, out) of each adapted Linear of a Llama layer, from an original-LLaVA config."""
    hidden, inter = int(config["hidden_size"]), int(config["intermediate_size"])
    heads = int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    return {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv * head_dim),
        "v_proj": (hidden, kv * head_dim),
        "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }


@dataclass(frozen=True)
class _Setup:
    """One head's inputs: the base, its tower, where the LoRA goes, the untrained start."""

    base: pathlib.Path
    tower: pathlib.Path
    base_config: dict[str, Any]
    shape: LoraShape
    seed: int
    start: tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]
    sets: list[data.PreferenceSet]
    selection: Selection
    """The training file, then the test file when asked."""


def _setup(head: str, config: TrainLoraConfig) -> _Setup:
    base = embedded.resolve(config.base, config.cache_dir)
    tower = embedded.resolve(config.vision_tower, config.cache_dir)
    base_config = json.loads((base / "config.json").read_text())
    total = int(base_config["num_hidden_layers"])
    shape = LoraShape(tuple(range(total - config.layers, total)), config.r, config.alpha)
    seed = SEEDS[head] + config.train.seed
    start = (
        initial_lora(shape, lora_sizes(base_config), seed),
        initial_head(int(base_config["hidden_size"]), seed),
    )
    train_name, test_name = FILES[head]
    names = [train_name, test_name] if config.evaluate_test else [train_name]
    sets = [data.load(config.data_dir / name, head) for name in names]
    return _Setup(base, tower, base_config, shape, seed, start, sets, _selection(head, config))


@dataclass
class _Trained:
    trained: lora.Trained
    splits: list[SplitResult]
    checked: dict[int, float]
    """The tool's scores of a few validation rows (the served check compares them)."""
    train_groups: list[data.Group]
    capture_seconds: float
    cached: bool
    train_seconds: float


async def _run_head(head: str, config: TrainLoraConfig) -> LoraReport:
    setup = _setup(head, config)
    with tempfile.TemporaryDirectory(prefix="align2-lora-") as scratch:
        initial = write_adapter(
            pathlib.Path(scratch) / "initial", setup.shape, *setup.start, setup.base_config
        )
        backend = load_head(head, setup.base, initial, setup.tower)
        try:
            done = await _train(head, backend, setup, config)
        finally:
            backend.close()
        provenance = _provenance(head, config, setup, done.trained)
        # Written once, where it is wanted; the server's backend then scores from there.
        target = pathlib.Path(scratch) / "trained"
        if config.out is not None:
            target = config.out / embedded.LORA_ADAPTERS[head]
        written = write_adapter(
            target,
            setup.shape,
            done.trained.lora,
            done.trained.head,
            setup.base_config,
            extra_files=[("align2_training.json", provenance)],
        )
        if config.out is not None:
            log.info("wrote %s", written)
        difference = await _served_difference(head, setup, written, done.checked, config)
    return LoraReport(
        head=head,
        shape=setup.shape,
        train_groups=len(done.train_groups),
        train_pairs=len(data.pairs(done.train_groups)),
        best_epoch=done.trained.best_epoch,
        lr=done.trained.lr,
        learning_rates=setup.selection.learning_rates,
        folds=setup.selection.folds,
        epochs=tuple(done.trained.epochs),
        splits=tuple(done.splits),
        capture_seconds=done.capture_seconds,
        layer_inputs_cached=done.cached,
        train_seconds=done.train_seconds,
        served_difference=difference,
    )


async def _train(
    head: str, backend: SharedHeadScoring, setup: _Setup, config: TrainLoraConfig
) -> _Trained:
    """Capture the layer inputs, train the grid, evaluate the kept adapter."""
    language_model = backend.shared_base.model.language_model
    first = setup.shape.layers[0]
    # What the layer inputs depend on: the base and the tower, not the adapter.
    revision = f"{folder_revision(setup.base)}+{folder_revision(setup.tower)}"
    cache = features.FeatureCache(config.cache_dir / "features")
    started = time.monotonic()
    captured = [
        await cached_layer_inputs(
            backend,
            language_model.layers,
            first,
            revision,
            s,
            cache,
            batch_size=config.batch_size,
            max_text_tokens=config.max_text_tokens,
        )
        for s in setup.sets
    ]
    capture_seconds = time.monotonic() - started
    tail = lora.Tail(language_model, first)
    _check_tail(tail, captured[0])
    adapter_name = backend.shared_base.heads[head].adapter_name
    params = _parameters(language_model, adapter_name, setup.shape)
    runner = lora_selection.Runner(
        tail,
        params,
        torch.nn.Parameter(setup.start[1].clone()),
        setup.start,
        captured[0].states,
        dataclasses.replace(config.train, seed=setup.seed),
    )
    selection = setup.selection
    started = time.monotonic()
    chosen = lora_selection.choose(
        runner,
        setup.sets[0].groups,
        selection,
        val_fraction=config.val_fraction,
        split_seed=config.split_seed,
    )
    train_seconds = time.monotonic() - started
    trained = chosen.trained
    lora.load(params, trained.lora)
    validation = setup.sets[0].subset(chosen.validation)
    if selection.folds:
        # Out of fold: each fold scored by the run that did not train on it.
        splits = [
            _evaluated(
                f"{selection.folds}-fold",
                validation,
                captured[0],
                trained.best_accuracy,
                setup.start[1],
            )
        ]
    else:
        splits = [
            _evaluate("validation", validation, captured[0], tail, trained.head, setup.start[1])
        ]
    if len(setup.sets) > 1:
        splits.append(
            _evaluate("test", setup.sets[1], captured[1], tail, trained.head, setup.start[1])
        )
    checked_rows = sorted({r for g in chosen.validation for r in g.rows})[:8]
    return _Trained(
        trained=trained,
        splits=splits,
        checked=lora.scores_of(tail, trained.head, captured[0].states, checked_rows),
        train_groups=chosen.train_groups,
        capture_seconds=capture_seconds,
        cached=all(c.cached for c in captured),
        train_seconds=train_seconds,
    )


def _parameters(language_model: Any, adapter_name: str, shape: LoraShape) -> lora.Params:
    """The injected LoRA A and B of every adapted module, as trainable parameters."""
    params: lora.Params = {}
    for name in shape.module_names():
        layer = language_model.get_submodule(name.removeprefix("model."))
        params[name] = (
            layer.lora_A[adapter_name].weight,
            layer.lora_B[adapter_name].weight,
        )
    return params


def _check_tail(tail: lora.Tail, captured: LayerInputs) -> None:
    """The tail on the captured inputs gives the server's pooled features (before any
    training, when both run the same adapter)."""
    rows = list(range(min(8, len(captured.states))))
    with torch.no_grad():
        mine = tail.pooled([captured.states[r] for r in rows])
    served = captured.pooled[rows]
    worst = float((mine - served).abs().max())
    scale = float(served.abs().max())
    if worst > 1e-4 * max(scale, 1.0):
        raise RuntimeError(f"internal: the training forward differs from the server's by {worst:g}")


def _evaluate(
    split: str,
    subset: data.PreferenceSet,
    captured: LayerInputs,
    tail: lora.Tail,
    trained_head: torch.Tensor,
    untrained_head: torch.Tensor,
) -> SplitResult:
    trained = lora.accuracy(tail, trained_head, captured.states, subset.groups)
    return _evaluated(split, subset, captured, trained, untrained_head)


def _evaluated(
    split: str,
    subset: data.PreferenceSet,
    captured: LayerInputs,
    trained: float,
    untrained_head: torch.Tensor,
) -> SplitResult:
    """``trained`` with both baselines on the same pairs."""
    found = data.pairs(subset.groups)
    untrained = (captured.pooled.float() @ untrained_head.float().T)[:, 0]
    return SplitResult(
        split=split,
        file=subset.name,
        groups=len(subset.groups),
        pairs=len(found),
        trained=trained,
        untrained=pairwise_accuracy(untrained, found),
        longer=pairwise_accuracy(length_scores(subset.texts), found),
    )


def _selection(head: str, config: TrainLoraConfig) -> Selection:
    if head not in config.selection:
        raise ValueError(
            f"no selection for head {head!r}: selection has {sorted(config.selection)}"
        )
    return config.selection[head]


async def _served_difference(
    head: str,
    setup: _Setup,
    adapter: pathlib.Path,
    tool: dict[int, float],
    config: TrainLoraConfig,
) -> float:
    """Load the written adapter as the server does and score the rows of ``tool`` with it:
    the largest difference from the tool's scores."""
    backend = load_head(head, setup.base, adapter, setup.tower)
    rows = list(tool)
    try:
        image = features.placeholder_image()
        texts = [setup.sets[0].texts[r] for r in rows]
        batch = [
            backend.prepare(t, image, max_text_tokens=config.max_text_tokens, truncate=True)
            for t in texts
        ]
        served = await backend.score(batch)
    finally:
        backend.close()
    return max((abs(s - tool[r]) for r, s in zip(rows, served, strict=True)), default=0.0)


def _provenance(head: str, config: TrainLoraConfig, setup: _Setup, trained: lora.Trained) -> str:
    train_set, selection = setup.sets[0], setup.selection
    record = {
        "tool": "align2 train-lora",
        "head": head,
        "train_file": train_set.name,
        "train_sha256": train_set.sha256,
        "template_version": TEMPLATE_VERSION,
        "validation": _validation_record(selection, config),
        "layers": config.layers,
        "r": config.r,
        "lora_alpha": config.alpha,
        # The kept adapter's run: the rate kept from the grid, the seed used (the head's,
        # plus train.seed); with folds, the epochs it was trained for on every image.
        "hyperparameters": {
            **config.train.__dict__,
            "lr": trained.lr,
            "seed": setup.seed,
            **({"epochs": trained.best_epoch} if selection.folds else {}),
        },
        "learning_rates_tried": list(selection.learning_rates),
        "best_epoch": trained.best_epoch,
        # Without the seconds: the file is the same on every rerun. Held-out or out-of-fold
        # accuracy; with folds, the loss is the folds' mean (the kept adapter is then
        # trained on every image for best_epoch epochs).
        "validation_by_epoch": [e.validation for e in trained.epochs],
        "loss_by_epoch": [e.loss for e in trained.epochs[1:]],
        "placeholder_image": features.PLACEHOLDER,
    }
    return json.dumps(record, indent=2, sort_keys=True, default=str) + "\n"


def _validation_record(selection: Selection, config: TrainLoraConfig) -> dict[str, float | int]:
    if selection.folds:
        return {
            "folds_by_image": selection.folds,
            "split_seed": config.split_seed,
            "epochs_per_fold": config.train.epochs,
        }
    return {"fraction_of_images": config.val_fraction, "split_seed": config.split_seed}
