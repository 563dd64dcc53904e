"""An independent reference for the paper's reward models: the original LLaVA computation
with the LoRA adapter applied UNMERGED by peft, written here without align2's converter.

What it does is what DCDmllm/Align2LLaVA's loader and forward do: the model is the
reference's structure (``LlamaForSequenceClassification`` = ``model`` + ``score``, with
``model.mm_projector``), loaded from the base's original-layout shards; the
``non_lora_trainables`` keys renamed as the reference loader renames them; the adapter
attached with ``PeftModel.from_pretrained`` and NOT merged (each LoRA layer computes
``base(x) + scaling * B(A(x))``); CLIP's ``hidden_states[mm_vision_select_layer]`` without
CLS through the projector, spliced where ``<image>`` was in the text, tokenised chunk by
chunk as LLaVA's ``tokenizer_image_token`` does; the head on the last position.
"""

from __future__ import annotations

import io
import json
import pathlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from peft import PeftModel
from PIL import Image
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForSequenceClassification,
    LlamaTokenizer,
)

from align2.client.types import Sample, Turn

REL = 1e-4  # fp32: the merged W + s*B@A against peft's x@W + s*(x@A^T)@B^T


@dataclass(frozen=True)
class OriginalSet:
    """One tiny release-format set: CLIP folder, base, and the two reward adapters."""

    clip: pathlib.Path
    base: pathlib.Path
    question: pathlib.Path
    answer: pathlib.Path


def question_text(questions: list[str]) -> str:
    """The reference's question template (``preprocess_qa``, no answer), typed out."""
    cleaned = [q.replace("<image>", "").strip() for q in questions]
    return ("<image>" + "\n" + "\n".join(cleaned)).strip()


def answer_text(question: str, answer: str) -> str:
    """The reference's answer template (``preprocess_qa`` in
    ``reward_model/llava/data/utils.py``), typed out: ``if answer:`` on the raw answer, so
    an empty one takes the question template; the whole prompt stripped at the end."""
    if not answer:
        return question_text([question])
    q = question.replace("<image>", "").strip()
    a = answer.replace("<image>", "").strip()
    prompt = f"Question: {q}\n" + f"Answer: {a}\n"
    return ("<image>" + "\n" + prompt).strip()


class Reference:
    """The reward score of ``adapter`` over ``base`` as the reference code computes it."""

    def __init__(self, base: pathlib.Path, clip: pathlib.Path, adapter: pathlib.Path) -> None:
        config = json.loads((adapter / "config.json").read_text())
        llama = LlamaConfig(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=config["num_attention_heads"],
            num_key_value_heads=config["num_key_value_heads"],
            max_position_embeddings=config["max_position_embeddings"],
            rms_norm_eps=config["rms_norm_eps"],
            num_labels=1,
            pad_token_id=config["pad_token_id"],
        )
        model = LlamaForSequenceClassification(llama)
        hidden, mm_hidden = config["hidden_size"], config["mm_hidden_size"]
        model.model.add_module(
            "mm_projector",
            torch.nn.Sequential(
                torch.nn.Linear(mm_hidden, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden)
            ),
        )
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(base.glob("pytorch_model-*.bin")):
            state |= torch.load(shard, weights_only=True)
        llm = {
            k: v
            for k, v in state.items()
            if k.startswith("model.") and "vision_tower" not in k and "inv_freq" not in k
        }
        missing, unexpected = model.load_state_dict(llm, strict=False)
        assert missing == ["score.weight"] and not unexpected, (missing, unexpected)
        non_lora = torch.load(adapter / "non_lora_trainables.bin", weights_only=True)
        non_lora = {(k[11:] if k.startswith("base_model.") else k): v for k, v in non_lora.items()}
        if any(k.startswith("model.model.") for k in non_lora):
            non_lora = {(k[6:] if k.startswith("model.") else k): v for k, v in non_lora.items()}
        _, unexpected = model.load_state_dict(non_lora, strict=False)
        assert not unexpected, unexpected
        self.peft = PeftModel.from_pretrained(model, adapter).eval()
        self.inner = self.peft.base_model.model  # LoRA layers in place, unmerged
        self.tower = CLIPVisionModel.from_pretrained(clip).eval()
        self.images = CLIPImageProcessorPil.from_pretrained(clip)
        # The reference: AutoTokenizer(use_fast=False) under transformers 4, i.e. the class
        # tokenizer_config.json names (transformers 5's AutoTokenizer follows model_type).
        self.tokenizer = LlamaTokenizer.from_pretrained(base)
        self.layer = config["mm_vision_select_layer"]

    def score(self, text: str, image: Image.Image) -> float:
        """``text`` holds one ``<image>``; ``image`` is preprocessed by the CLIP processor
        alone (align2's ``square`` mode)."""
        with torch.no_grad():
            pixels = self.images(image, return_tensors="pt")["pixel_values"]
            out = self.tower(pixel_values=pixels, output_hidden_states=True)
            features = self.inner.model.mm_projector(out.hidden_states[self.layer][:, 1:])[0]
            before, after = text.split("<image>")
            ids_before = self.tokenizer(before)["input_ids"]  # BOS first
            ids_after = self.tokenizer(after)["input_ids"][1:]  # later chunks lose their BOS
            assert ids_before[0] == self.tokenizer.bos_token_id
            embed = self.inner.model.embed_tokens
            sequence = torch.cat(
                [embed(torch.tensor(ids_before)), features, embed(torch.tensor(ids_after))]
            )
            hidden = self.inner.model(inputs_embeds=sequence[None]).last_hidden_state
            return float(self.inner.score(hidden[0, -1]))

    def merged_any(self) -> bool:
        """Whether peft merged anything (it must not: the reference here is unmerged)."""
        return any(getattr(m, "merged", False) for m in self.peft.modules())


# -- samples and the check shared by the backend and server tests ----------------------------
def samples() -> list[Sample]:
    """Several samples: 1-3 turns, different images, one question with an inline marker."""
    shapes = [(48, 30), (30, 52), (40, 40)]
    out = []
    for i, (w, h) in enumerate(shapes):
        buffer = io.BytesIO()
        Image.effect_noise((w, h), 40 + 20 * i).convert("RGB").save(buffer, format="PNG")
        turns = [
            Turn(f"<image>\nWhat is object {i} on the table? ", f" It is a cup number {i}."),
            Turn("Why is it there?", "Someone left it after breakfast. " * (1 + i)),
            Turn("What colour is it?", "Red."),
        ][: 1 + i]
        out.append(Sample(id=f"s{i}", image=buffer.getvalue(), turns=turns))
    return out


def image_of(sample: Sample) -> Image.Image:
    return Image.open(io.BytesIO(sample.image)).convert("RGB")


def expected_scores(refs: tuple[Reference, Reference], sample: Sample) -> tuple[float, list[float]]:
    question_ref, answer_ref = refs
    image = image_of(sample)
    question = question_ref.score(question_text([t.question for t in sample.turns]), image)
    answers = [answer_ref.score(answer_text(t.question, t.answer), image) for t in sample.turns]
    return question, answers


def assert_matches_reference(
    results: Sequence[Any], refs: tuple[Reference, Reference], batch: list[Sample]
) -> None:
    """Each sample's question score and answer scores equal the references' (fp32).
    ``results``: one per sample, server-side or client-side (same field names)."""
    for sample, result in zip(batch, results, strict=True):
        assert result.error is None
        question, answers = expected_scores(refs, sample)
        assert result.question_score == pytest.approx(question, rel=REL, abs=1e-5)
        assert result.answer_scores == pytest.approx(answers, rel=REL, abs=1e-5)
