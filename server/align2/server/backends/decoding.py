"""Batched decoding for a transformers causal LM: our own loop over the KV cache.

Why not ``model.generate``: one batch carries requests of different calls, each with its
own max_new_tokens, temperature, top-p and seed; ``generate`` applies one setting to the
whole batch and draws from torch's global RNG.

Contract of :func:`generate_batch`:

- prompts are LEFT-padded (the next token of every row is then at the last position) and
  masked, with position ids counted from each row's first real token, so a row computes
  what it would alone (greedy outputs do not depend on batch-mates, up to float rounding
  differences between batch shapes, which can flip an exact tie);
- each row stops at its own EOS (not part of the result), at its own token budget, or
  once its ``abandoned`` event is set (nobody waits for it: its tokens so far, unfinished);
  a row that stops leaves the batch (its KV cache rows are dropped), so the rest run
  narrower;
- temperature 0 is greedy (argmax); above 0 a row samples from softmax(logits / T) cut to
  its top-p mass, with its own ``torch.Generator`` seeded from its ``seed``, consumed only
  by that row: the same seed and prompt give the same draws whatever the batch-mates
  (caveat: only as far as their logits are bitwise equal, see above).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from align2.server.backends.base import Decoding


@dataclass
class Decoded:
    """One row's new tokens (without the EOS) and whether it ended at its EOS."""

    tokens: list[int]
    finished: bool


def left_pad(
    sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad id lists into [B, L] ids and attention mask on ``device``."""
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, longest - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[row, longest - len(seq) :] = 1
    return ids.to(device), mask.to(device)


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids counted from each row's first real token (0 on the padding)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def last_logits(
    model: torch.nn.Module, prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> torch.Tensor:
    """Float32 logits [B, vocab] of the token after each prompt (one forward, no cache)."""
    ids, mask = left_pad(prompts, pad_id, device)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False)
    return out.logits[:, -1, :].float()


def generate_batch(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    settings: Sequence[Decoding],
    budgets: Sequence[int],
    *,
    eos_ids: frozenset[int],
    pad_id: int,
    device: torch.device,
    abandoned: Sequence[threading.Event | None] | None = None,
) -> list[Decoded]:
    """Decode every prompt (see the module contract). ``budgets``: per row, the most new
    tokens (its max_new_tokens, cut to what the model's length allows); 0 gives nothing.
    ``abandoned``: per row, an event that stops the row when set (checked every step)."""
    results = [Decoded([], finished=False) for _ in prompts]
    stops = list(abandoned) if abandoned is not None else [None] * len(prompts)

    def wanted(row: int) -> bool:
        stop = stops[row]
        return stop is None or not stop.is_set()

    live = [row for row, budget in enumerate(budgets) if budget > 0 and wanted(row)]
    if not live:
        return results
    generators = [row_generator(settings[row], device) for row in range(len(prompts))]
    ids, mask = left_pad([prompts[row] for row in live], pad_id, device)
    place = positions(mask)
    out = model(input_ids=ids, attention_mask=mask, position_ids=place, use_cache=True)
    cache, logits = out.past_key_values, out.logits[:, -1, :].float()
    while True:
        picked = _pick(logits, [settings[r] for r in live], [generators[r] for r in live])
        keep: list[int] = []
        for slot, (row, token) in enumerate(zip(live, picked.tolist(), strict=True)):
            if token in eos_ids:
                results[row].finished = True
            else:
                results[row].tokens.append(token)
                if len(results[row].tokens) < budgets[row] and wanted(row):
                    keep.append(slot)
        if not keep:
            return results
        if len(keep) < len(live):  # drop finished rows from the batch and its cache
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            mask, place, picked = mask[index], place[index], picked[index]
            live = [live[slot] for slot in keep]
        mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=1)
        place = place[:, -1:] + 1
        out = model(
            input_ids=picked[:, None],
            attention_mask=mask,
            position_ids=place,
            past_key_values=cache,
            use_cache=True,
        )
        cache, logits = out.past_key_values, out.logits[:, -1, :].float()


def row_generator(decoding: Decoding, device: torch.device) -> torch.Generator | None:
    """A row's own generator, seeded from its ``seed``; None for a greedy row."""
    if decoding.temperature <= 0:
        return None
    return torch.Generator(device=device).manual_seed(decoding.seed)


def _pick(
    logits: torch.Tensor,
    settings: Sequence[Decoding],
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """Next token per row [B]: argmax for greedy rows, a seeded top-p draw for the others.

    Raises ValueError, before any draw, when a sampled row's logits are not finite: its
    draw would fail, and on CUDA ``multinomial`` fails with a device-side assert, after
    which the device is unusable (the server would go NOT_SERVING for one row). As a plain
    error the batch is retried in halves and only that row fails (core/batcher.py). With
    finite logits and a temperature of at least 0.01 (config.decoding_problem) the draw
    is always defined. One check per step for all sampled rows."""
    sampled = [row for row, generator in enumerate(generators) if generator is not None]
    if sampled and not bool(torch.isfinite(logits[sampled]).all()):
        raise ValueError("a sampled row's logits are not finite: its draw is undefined")
    picked = logits.argmax(dim=-1)
    for row, (decoding, generator) in enumerate(zip(settings, generators, strict=True)):
        if generator is not None:
            picked[row] = draw_token(logits[row], decoding, generator)
    return picked


def draw_token(
    logits: torch.Tensor, decoding: Decoding, generator: torch.Generator
) -> torch.Tensor:
    """One draw from softmax(logits / temperature), restricted to the top-p nucleus."""
    probs = torch.softmax(logits / decoding.temperature, dim=-1)
    if decoding.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep a token while the mass before it is below top_p (the top token always stays).
        outside = sorted_probs.cumsum(-1) - sorted_probs >= decoding.top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator)[0]
