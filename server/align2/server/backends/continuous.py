"""Continuous batching for a transformers causal LM: one decoding loop on the device thread.

A generation that arrives while others run is prefilled and joins the running batch at the
next step; a row that stops leaves at once; nothing waits for a batch to fill or to finish.
Review choices that arrive meanwhile run as one forward pass between two steps.

Why not transformers' own continuous batching (``model.init_continuous_batching``, 5.19):
its sampling draws from one global generator and ``do_sample`` is one setting for the whole
manager, while align2's contract gives each request its own temperature (0: greedy), top-p
and seed (:mod:`.decoding`). This loop keeps that contract: each row is decoded as in
:func:`.decoding.generate_batch` (left-padded, masked, positions from its first real token,
its own generator), so a row computes what it would alone, up to float rounding between
batch shapes.

How rows of different lengths share one KV cache: when rows join, the running cache and
theirs are left-padded (zeros, masked) to one length and concatenated along the batch;
columns that every row masks are cut from the left after rows leave. Only plain
``DynamicLayer`` caches are merged (full attention: Llama, SmolLM2, Mistral without a
sliding window, ...); :func:`mergeable` says whether a model's cache is one.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from align2.server.backends.base import Decoding
from align2.server.backends.decoding import (
    Decoded,
    draw_token,
    last_logits,
    left_pad,
    positions,
    row_generator,
)
from align2.server.backends.torch_device import BatchAbandoned

log = logging.getLogger(__name__)


@dataclass
class Row:
    """One generation: its prompt ids, settings, budget (most new tokens), and ``done``,
    called once from the loop's thread with the result or the exception that ended it."""

    prompt: Sequence[int]
    decoding: Decoding
    budget: int
    done: Callable[[Decoded | BaseException], None]
    abandoned: threading.Event = field(default_factory=threading.Event)
    result: Decoded = field(default_factory=lambda: Decoded([], finished=False))
    generator: torch.Generator | None = None
    delivered: bool = False

    def finish(self, value: Decoded | BaseException | None = None) -> None:
        """Hand over the result (or ``value``) once; later calls do nothing."""
        if not self.delivered:
            self.delivered = True
            _deliver(self.done, self.result if value is None else value)


@dataclass
class Choice:
    """One review choice: the prompt whose next-token logits it wants."""

    prompt: Sequence[int]
    done: Callable[[torch.Tensor | BaseException], None]


@dataclass
class _Batch:
    """The running rows and their state: cache, mask [B, L], last positions [B, 1] and the
    logits [B, vocab] of each row's next token."""

    rows: list[Row]
    cache: Any
    mask: torch.Tensor
    place: torch.Tensor
    logits: torch.Tensor


class DecodeLoop:
    """The loop (see the module docstring). ``run_on_device`` wraps each model call (the
    backend's inference mode and device-error classification); ``max_rows`` caps the
    running batch (more wait in the inbox, in arrival order)."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        eos_ids: frozenset[int],
        pad_id: int,
        device: torch.device,
        max_rows: int,
        run_on_device: Callable[[Callable[[], Any]], Any],
        name: str,
        abandoning: Callable[[Callable[[], bool]], AbstractContextManager[None]] | None = None,
    ) -> None:
        self._model = model
        self._eos = eos_ids
        self._pad = pad_id
        self._device = device
        self._max_rows = max_rows
        self._on_device = run_on_device
        self._abandoning = abandoning  # Interrupt.abandoning: a prefill nobody waits for stops
        self._lock = threading.Condition()
        self._inbox: list[Row] = []
        self._choices: list[Choice] = []
        self._closed = False
        self.steps = 0
        """Decoding steps run so far (tests read it)."""
        self.joined_running = 0
        """Rows that joined a batch already decoding (tests read it)."""
        self._thread = threading.Thread(target=self._run, name=f"device-{name}", daemon=True)
        self._thread.start()

    # -- any thread ----------------------------------------------------------------------
    def submit(self, item: Row | Choice) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("the decoding loop is closed")
            if not self._thread.is_alive():  # it catches every error; this is a backstop
                raise RuntimeError("the decoding loop's thread has stopped")
            if isinstance(item, Row):
                self._inbox.append(item)
            else:
                self._choices.append(item)
            self._lock.notify()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop after the current step; rows still running or waiting fail."""
        with self._lock:
            self._closed = True
            self._lock.notify()
        self._thread.join()

    # -- the loop's thread ---------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():  # the cache lives across calls: all of them inside
            self._serve()

    def _serve(self) -> None:
        batch: _Batch | None = None
        while True:
            with self._lock:
                while not self._closed and batch is None and not self._inbox and not self._choices:
                    self._lock.wait()
                if self._closed:
                    waiting, self._inbox = self._inbox, []
                    unchosen, self._choices = self._choices, []
                    break
                room = self._max_rows - (len(batch.rows) if batch else 0)
                joining, self._inbox = self._inbox[:room], self._inbox[room:]
                choices, self._choices = self._choices, []
            if choices:
                self._choose(choices)
            try:  # through run_on_device: an error a device sync raises is classified too
                batch = self._on_device(functools.partial(self._step, batch, joining))
            except Exception as exc:  # the step's rows fail; the loop goes on
                for row in (batch.rows if batch else []) + joining:
                    row.finish(exc)
                batch = None
        closed = RuntimeError("the decoding loop closed")
        for row in (batch.rows if batch else []) + waiting:
            row.finish(closed)
        for choice in unchosen:
            _deliver(choice.done, closed)

    def _choose(self, choices: list[Choice]) -> None:
        def forward() -> torch.Tensor:  # the copy to the host inside: it syncs the device
            prompts = [c.prompt for c in choices]
            return last_logits(self._model, prompts, self._pad, self._device).cpu()

        try:
            logits = self._on_device(forward)
        except Exception as exc:
            for choice in choices:
                _deliver(choice.done, exc)
            return
        for choice, row in zip(choices, logits, strict=True):
            _deliver(choice.done, row)

    def _step(self, batch: _Batch | None, joining: list[Row]) -> _Batch | None:
        """Admit ``joining``, pick every row's next token, let finished rows go, run one
        forward pass for the rest. Returns the batch that goes on (None: nothing runs)."""
        joining = [row for row in joining if self._wanted(row, finish_now=True)]
        if joining:
            batch = self._join(batch, joining)
        if batch is None:
            return None
        picked = self._pick(batch)
        keep: list[int] = []
        for slot, (row, token) in enumerate(zip(batch.rows, picked.tolist(), strict=True)):
            if row.delivered:  # failed while picking
                continue
            if token in self._eos:
                row.result.finished = True
                row.finish()
                continue
            row.result.tokens.append(token)
            if len(row.result.tokens) < row.budget and self._wanted(row, finish_now=False):
                keep.append(slot)
            else:
                row.finish()
        if not keep:
            return None
        if len(keep) < len(batch.rows):
            batch = _select(batch, keep, self._device)
            picked = picked[torch.tensor(keep, device=self._device)]
        return self._advance(batch, picked)

    def _join(self, batch: _Batch | None, joining: list[Row]) -> _Batch | None:
        """``batch`` with ``joining`` prefilled and merged in. Where that fails, the
        running rows go on untouched: a non-fatal error (out of memory on a long prompt)
        is retried with each joining row alone, so that it reaches only the row it is
        about; a fatal one fails the joining rows (the device is lost: the core says so)."""
        try:
            new = self._prefill(joining)
            if new is None or batch is None:
                merged = new
            else:  # through run_on_device: out of memory there is classified too
                merged = self._on_device(functools.partial(_merge, batch, new))
        except Exception as exc:
            if len(joining) > 1 and not getattr(exc, "fatal", False):
                for row in joining:
                    batch = self._join(batch, [row])
                return batch
            for row in joining:
                row.finish(exc)
            return batch
        if new is None:  # every joining row was abandoned during its prefill
            return batch
        if batch is not None:
            self.joined_running += len(joining)
        return merged

    def _wanted(self, row: Row, finish_now: bool) -> bool:
        """Still wanted; ``finish_now``: a row not wanted (or with no budget) ends here."""
        if row.budget > 0 and not row.abandoned.is_set():
            return True
        if finish_now:
            row.finish()
        return False

    def _prefill(self, rows: list[Row]) -> _Batch | None:
        """The joining rows' batch; None when every one of them was abandoned during the
        prefill (it stops at the next layer; the running batch is untouched)."""
        for row in rows:
            row.generator = row_generator(row.decoding, self._device)
        ids, mask = left_pad([row.prompt for row in rows], self._pad, self._device)
        place = positions(mask)

        def forward() -> Any:
            return self._model(
                input_ids=ids, attention_mask=mask, position_ids=place, use_cache=True
            )

        def gone() -> bool:
            return all(row.abandoned.is_set() for row in rows)

        watch = self._abandoning(gone) if self._abandoning else contextlib.nullcontext()
        try:
            with watch:
                out = self._on_device(forward)
        except BatchAbandoned:
            for row in rows:
                row.finish()  # nobody reads it: no tokens, unfinished
            return None
        if not mergeable(out.past_key_values):
            raise ValueError("continuous batching needs a plain DynamicCache (full attention)")
        return _Batch(rows, out.past_key_values, mask, place[:, -1:], out.logits[:, -1, :].float())

    def _pick(self, batch: _Batch) -> torch.Tensor:
        """Next token per row: argmax, or the row's own seeded top-p draw. A sampled row
        whose draw cannot be made (logits not finite: on CUDA a device assert; a
        temperature that makes the probabilities NaN) fails alone and leaves; the others
        go on."""
        picked = batch.logits.argmax(dim=-1)
        sampled = [
            (slot, row, row.generator)
            for slot, row in enumerate(batch.rows)
            if row.generator is not None
        ]
        if not sampled:
            return picked
        # One host sync for all sampled rows' checks, not one per row (a step's cost on a GPU).
        finite = torch.isfinite(batch.logits[[slot for slot, _, _ in sampled]]).all(dim=-1)
        for (slot, row, generator), ok in zip(sampled, finite.tolist(), strict=True):
            try:
                if not ok:
                    raise ValueError("a sampled row's logits are not finite: its draw is undefined")
                draw = functools.partial(draw_token, batch.logits[slot], row.decoding, generator)
                picked[slot] = self._on_device(draw)
            except Exception as exc:  # one row fails, the others go on
                row.finish(exc)
        return picked

    def _advance(self, batch: _Batch, picked: torch.Tensor) -> _Batch:
        mask = torch.cat([batch.mask, batch.mask.new_ones((len(batch.rows), 1))], dim=1)
        place = batch.place + 1

        def forward() -> Any:
            return self._model(
                input_ids=picked[:, None],
                attention_mask=mask,
                position_ids=place,
                past_key_values=batch.cache,
                use_cache=True,
            )

        out = self._on_device(forward)
        self.steps += 1
        return _trim(
            _Batch(batch.rows, out.past_key_values, mask, place, out.logits[:, -1, :].float())
        )


def mergeable(cache: Any) -> bool:
    """Is ``cache`` a DynamicCache of plain full-attention layers (which :func:`_merge`
    may pad and concatenate)?"""
    return isinstance(cache, DynamicCache) and all(type(x) is DynamicLayer for x in cache.layers)


def _merge(a: _Batch, b: _Batch) -> _Batch:
    """One batch of ``a``'s rows then ``b``'s: caches and masks left-padded to one length.
    ``a`` changes only once every new tensor is made: a failure (out of memory) leaves it
    as it was, to decode on."""
    length = max(a.mask.shape[1], b.mask.shape[1])

    def joined(x: torch.Tensor, y: torch.Tensor, dim: int) -> torch.Tensor:
        return torch.cat([_pad_left(x, length, dim), _pad_left(y, length, dim)])

    pairs = list(zip(a.cache.layers, b.cache.layers, strict=True))
    keys = [joined(x.keys, y.keys, 2) for x, y in pairs]
    values = [joined(x.values, y.values, 2) for x, y in pairs]
    mask = joined(a.mask, b.mask, 1)
    place, logits = torch.cat([a.place, b.place]), torch.cat([a.logits, b.logits])
    for layer, k, v in zip(a.cache.layers, keys, values, strict=True):
        layer.keys, layer.values = k, v
    return _Batch(a.rows + b.rows, a.cache, mask, place, logits)


def _select(batch: _Batch, keep: list[int], device: torch.device) -> _Batch:
    index = torch.tensor(keep, device=device)
    batch.cache.batch_select_indices(index)
    return _Batch(
        [batch.rows[i] for i in keep],
        batch.cache,
        batch.mask[index],
        batch.place[index],
        batch.logits[index],
    )


def _trim(batch: _Batch) -> _Batch:
    """Cut the leading columns that every row masks (left after longer rows left).

    Each row's real tokens are the rightmost columns (left padding), as many as its prompt
    and the tokens fed so far: counted here, without reading the mask back from the device
    (a second device sync per step)."""
    longest = max(len(row.prompt) + len(row.result.tokens) for row in batch.rows)
    first = batch.mask.shape[1] - longest
    if first <= 0:
        return batch
    for layer in batch.cache.layers:
        layer.keys = layer.keys[:, :, first:]
        layer.values = layer.values[:, :, first:]
    batch.mask = batch.mask[:, first:]
    return batch


def _pad_left(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _deliver(done: Callable[[Any], None], value: Any) -> None:
    try:
        done(value)
    except Exception:  # a caller's callback must not stop the loop
        log.exception("a generation's callback failed")
