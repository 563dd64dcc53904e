"""Process-wide torch settings the transformers backends apply for their device."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from align2.server.backends.torch_device import prepare_device


@pytest.fixture
def cudnn_sdp() -> Iterator[None]:
    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(True)
    yield
    torch.backends.cuda.enable_cudnn_sdp(before)


@pytest.mark.usefixtures("cudnn_sdp")
def test_cuda_turns_off_cudnn_attention_and_keeps_the_other_kernels() -> None:
    prepare_device(torch.device("cuda"))
    assert not torch.backends.cuda.cudnn_sdp_enabled()
    assert torch.backends.cuda.flash_sdp_enabled()
    assert torch.backends.cuda.mem_efficient_sdp_enabled()


@pytest.mark.usefixtures("cudnn_sdp")
def test_cpu_changes_nothing() -> None:
    prepare_device(torch.device("cpu"))
    assert torch.backends.cuda.cudnn_sdp_enabled()
