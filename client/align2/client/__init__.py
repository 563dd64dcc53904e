"""align2 client: score and restyle LLaVA-format instruction data on an align2 server.

    from align2.client import CurationClient, Sample, Turn, read_llava, write_llava

    with CurationClient("localhost:50051") as client:
        samples = read_llava("data.json", image_folder="images/")
        results = client.score(samples)
        aligned = client.align(samples)  # the inner LLM restyles, then reviews
        write_llava([a.sample for a in aligned if a.ok], "aligned.json")
        # as a generator produces them: keep the best (per task type), restyle the kept
        kept = [r.sample for r in client.curate(generate(), align=True) if r.kept]

Needs only grpcio and protobuf. The gRPC-facing names are imported on first use, so that
``align2.client.types`` and ``align2.client.llava`` (pure Python, also used by the server
core) can be imported without importing grpc.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from align2.client.llava import iter_llava, read_llava, write_llava
from align2.client.types import ImageMarker, Sample, Turn, choose_candidates

if TYPE_CHECKING:
    from align2.client.aio import AsyncCurationClient
    from align2.client.channel import RetryPolicy
    from align2.client.results import (
        AlignCallInfo,
        AlignedTurn,
        AlignReply,
        AlignResult,
        CallInfo,
        CandidateScores,
        CurateResult,
        ItemError,
        ModelRef,
        ProtocolError,
        ScoreReply,
        ScoreResult,
        TemplateRef,
        Timing,
        TokenCounts,
    )
    from align2.client.resume import ResumePolicy
    from align2.client.sync import CurationClient

_LAZY = {
    "CurationClient": "align2.client.sync",
    "AsyncCurationClient": "align2.client.aio",
    "RetryPolicy": "align2.client.channel",
    "ResumePolicy": "align2.client.resume",
    "AlignCallInfo": "align2.client.results",
    "AlignedTurn": "align2.client.results",
    "AlignReply": "align2.client.results",
    "AlignResult": "align2.client.results",
    "CallInfo": "align2.client.results",
    "CandidateScores": "align2.client.results",
    "CurateResult": "align2.client.results",
    "ItemError": "align2.client.results",
    "ModelRef": "align2.client.results",
    "ProtocolError": "align2.client.results",
    "ScoreReply": "align2.client.results",
    "ScoreResult": "align2.client.results",
    "TemplateRef": "align2.client.results",
    "Timing": "align2.client.results",
    "TokenCounts": "align2.client.results",
}

__all__ = [
    "AlignCallInfo",
    "AlignReply",
    "AlignResult",
    "AlignedTurn",
    "AsyncCurationClient",
    "CallInfo",
    "CandidateScores",
    "CurateResult",
    "CurationClient",
    "ImageMarker",
    "ItemError",
    "ModelRef",
    "ProtocolError",
    "ResumePolicy",
    "RetryPolicy",
    "Sample",
    "ScoreReply",
    "ScoreResult",
    "TemplateRef",
    "Timing",
    "TokenCounts",
    "Turn",
    "choose_candidates",
    "iter_llava",
    "read_llava",
    "write_llava",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this hook
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
