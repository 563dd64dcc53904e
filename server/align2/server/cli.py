"""Server-side subcommands of the ``align2`` command: serve, build-models, train-heads,
train-lora, convert-reward.

Argument parsing and the environment are read here only, then typed config is passed down.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from typing import Any

from align2.server import config as config_module
from align2.server import logs, threads
from align2.server.errors import ConfigError
from align2.server.training import command as train_heads
from align2.server.training import lora_command as train_lora

log = logging.getLogger("align2.server")


def _serve_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the gRPC server (flags override the config file)")
    p.add_argument("--config", help="TOML config file (see docs/configuration.md)")
    p.add_argument("--host", help="address to bind (default [::])")
    p.add_argument("--port", type=int, help="gRPC port; 0 picks a free one (default 50051)")
    p.add_argument("--metrics-port", type=int, help="Prometheus port; 0 free, -1 off (9090)")
    p.add_argument(
        "--metrics-host", help="address the metrics port binds (default: as --host), e.g. $(POD_IP)"
    )
    p.add_argument(
        "--health-port",
        type=int,
        help="plaintext port serving only gRPC health, for probes when TLS is on; 0 free (-1 off)",
    )
    p.add_argument("--cache-dir", help="where embedded models are built (~/.cache/align2)")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR, CRITICAL (default INFO)")
    p.add_argument("--log-format", choices=["json", "text"], help="log lines (default json)")
    p.add_argument("--auth-tokens-file", help="accepted bearer tokens, one per line")
    p.add_argument("--tls-cert-file", help="PEM certificate chain (serves TLS)")
    p.add_argument("--tls-key-file", help="PEM private key")
    p.add_argument("--tls-client-ca-file", help="PEM roots for client certificates (mTLS)")


def _build_parser(sub: Any) -> None:
    p = sub.add_parser("build-models", help="build the embedded default models (cached)")
    p.add_argument("--cache-dir", help="where to build them (~/.cache/align2)")
    p.add_argument("names", nargs="*", help="which ones (default: all)")


def _convert_parser(sub: Any) -> None:
    p = sub.add_parser(
        "convert-reward",
        help="convert an original-LLaVA base + PEFT LoRA reward adapter (the paper's release) "
        "into an align2 reward checkpoint",
    )
    p.add_argument("--base", required=True, help="original-LLaVA base folder (llava-v1.5-7b)")
    p.add_argument("--adapter", required=True, help="PEFT LoRA reward adapter folder")
    p.add_argument("--out", required=True, help="folder to write; must not exist")
    p.add_argument(
        "--vision-tower",
        help="CLIP folder the base's mm_vision_tower names (default: that name, if a folder)",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights of the output (default auto: the base's)",
    )
    p.add_argument(
        "--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR, CRITICAL (default INFO)"
    )


def convert(args: argparse.Namespace) -> int:
    """Run convert-reward; a refused input exits with its message (status 1)."""
    from align2.server.models.convert_reward import ConversionError, convert_reward

    logs.setup(args.log_level, "text")
    _no_progress_bars()
    try:
        out = convert_reward(
            args.base, args.adapter, args.out, vision_tower=args.vision_tower, dtype=args.dtype
        )
    except (ConversionError, FileExistsError) as exc:
        raise SystemExit(f"align2 convert-reward: {exc}") from None
    print(out)
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="align2", description="align2 server commands")
    sub = root.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _build_parser(sub)
    train_heads.add_parser(sub)
    train_lora.add_parser(sub)
    _convert_parser(sub)
    return root


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    flags = {
        "server.host": getattr(args, "host", None),
        "server.port": getattr(args, "port", None),
        "server.metrics_port": getattr(args, "metrics_port", None),
        "server.metrics_host": getattr(args, "metrics_host", None),
        "server.health_port": getattr(args, "health_port", None),
        "server.cache_dir": args.cache_dir or os.environ.get("ALIGN2_CACHE_DIR"),
        "server.log_level": getattr(args, "log_level", None),
        "server.log_format": getattr(args, "log_format", None),
        "security.auth_tokens_file": getattr(args, "auth_tokens_file", None),
        "security.tls_cert_file": getattr(args, "tls_cert_file", None),
        "security.tls_key_file": getattr(args, "tls_key_file", None),
        "security.tls_client_ca_file": getattr(args, "tls_client_ca_file", None),
    }
    return {k: v for k, v in flags.items() if v is not None}


def _no_progress_bars() -> None:
    """Progress bars would interleave with the JSON log lines on stderr."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


async def serve(config: config_module.Config) -> int:
    """Run until SIGTERM/SIGINT, then drain within the grace period: exit code 0. After an
    unrecoverable device error, drain the same way and return 1, so that whatever runs the
    process (Kubernetes, Docker's restart policy, systemd) starts a fresh one: a device in
    that state does not recover within the process."""
    from align2.server.app import App

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    app = App(config)
    threads.apply(app.threads)  # before any model loads (app.start)
    starting = asyncio.create_task(app.start())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait([starting, stopping], return_when=asyncio.FIRST_COMPLETED)
    if starting.done() and starting.exception() is not None:
        await app.stop(grace=0)
        raise starting.exception()  # type: ignore[misc]
    if not starting.done():
        await _exit_while_starting(app, starting)
    failing = asyncio.create_task(app.lifecycle.wait_failed())
    await asyncio.wait([stopping, failing], return_when=asyncio.FIRST_COMPLETED)
    grace = config.server.grace_seconds
    failed = not stopping.done()  # decided now: a SIGTERM while draining does not undo it
    if failed:
        log.critical("unrecoverable device error: draining (grace %.0fs), then exit 1", grace)
    else:
        failing.cancel()
        log.info("signal received: draining (grace %.0fs)", grace)
    await app.stop()
    log.info("stopped")
    return 1 if failed else 0


async def _exit_while_starting(app: Any, starting: asyncio.Task[None]) -> None:
    """SIGTERM before SERVING: nothing has been accepted (health says NOT_SERVING, calls
    get UNAVAILABLE), but a model load runs in a thread that cannot be interrupted and the
    interpreter's exit would wait for it (minutes for a 7B model), past the grace period.
    Close the ports and whatever was loaded, then exit 0 at once: what SIGKILL would do,
    with the ports closed and the log flushed first. Child processes (a vLLM engine that
    is still starting: its EngineCore and workers do not notice their parent's exit and
    would hold their memory, and a GPU's, for good) are killed first."""
    from align2.server.models import scratch

    log.info("signal received while starting: stopping without waiting for the model load")
    starting.cancel()
    await app.stop(grace=0)
    if removed := scratch.remove_unfinished():  # the exit skips the build's own clean-up
        log.info("removed %d unfinished model build folder(s)", removed)
    log.info("stopped")
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    _kill_children()
    os._exit(0)


def _kill_children() -> None:
    """SIGKILL every process this one started, children of children included."""
    import psutil

    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):  # already gone
            child.kill()


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "convert-reward":  # reads no server config
        return convert(args)
    try:
        config = config_module.load(getattr(args, "config", None), _overrides(args))
    except ConfigError as exc:
        return _refused(exc)
    logs.setup(config.server.log_level, config.server.log_format)
    if args.command == "serve":
        threads.bound_spinning()  # before torch is imported (by the next line)
    _no_progress_bars()
    if args.command == "build-models":
        from align2.server.models import embedded

        for name in args.names or embedded.EMBEDDED_NAMES:
            print(embedded.ensure(name, config.cache_path))
        return 0
    if args.command == "train-heads":
        data_env = os.environ.get(train_heads.DATA_ENV)
        return train_heads.run(train_heads.to_config(args, config.cache_path, data_env))
    if args.command == "train-lora":
        data_env = os.environ.get(train_heads.DATA_ENV)
        return train_lora.run(train_lora.to_config(args, config.cache_path, data_env))
    try:
        return asyncio.run(serve(config))
    except ConfigError as exc:
        return _refused(exc)


def _refused(exc: ConfigError) -> int:
    """A configuration that cannot serve: its message (naming the key), exit status 2 (bad
    input, as argparse's usage errors; 1 is an unrecoverable device error)."""
    print(f"align2: {exc}", file=sys.stderr)
    return 2
