"""Process-wide torch settings the transformers backends apply for their device."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from align2.server.backends.torch_device import Interrupt, prepare_device
from align2.server.errors import Unavailable


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


def test_an_interrupt_stops_a_running_forward_at_the_next_layer() -> None:
    entered: list[int] = []

    class Layer(torch.nn.Module):
        def __init__(self, index: int) -> None:
            super().__init__()
            self.index = index

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            entered.append(self.index)
            if self.index == 1:
                interrupt.set()  # as shutdown does from another thread, mid-forward
            return x + 1

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList(Layer(i) for i in range(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.layers:
                x = layer(x)
            return x

    model = Model()
    interrupt = Interrupt(model, "m")
    with pytest.raises(Unavailable, match="model 'm' stopped mid-batch: the server is shutting"):
        model(torch.zeros(1))
    assert entered == [0, 1]  # layer 2 never started
