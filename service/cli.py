"""`adaptserve` console entry point.

    adaptserve serve [--store DIR] [--backbone DIR] [--port N] ...   run the HTTP server
    adaptserve train ...                                             training.cli.main(argv)
    adaptserve evaluate ...                                          training.cli.evaluate_main(argv)
    adaptserve pet ... / adaptserve zeroshot ...                     training.fewshot_cli.{pet,zeroshot}_main(argv)

`serve` flags mirror `Settings` fields and override `ADAPTSERVE_*` env vars. `train` and
`evaluate` belong to the `training` package and are imported only when asked for, so serving
never imports training code.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Callable, Mapping, Sequence

from pydantic import ValidationError

from service import __version__
from service.logs import warn_always

# Subcommands owned by other packages: name -> (module, function, help). The function gets the
# remaining argv and returns an exit code (or None for 0).
EXTERNAL_COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("training.cli", "main", "train a task and publish its bundle to the store"),
    "evaluate": ("training.cli", "evaluate_main", "evaluate a stored task on a dataset"),
    "pet": ("training.fewshot_cli", "pet_main", "PET: prompt-tuned teachers label unlabelled data, a student is published"),
    "zeroshot": ("training.fewshot_cli", "zeroshot_main", "publish a task from a label list, with no training data"),
}

# `serve` flags: (flag, Settings field, type, help). Defaults live in Settings, not here.
_SERVE_FLAGS: list[tuple[str, str, Callable[[str], object], str]] = [
    ("--store", "store", str, "task store directory"),
    ("--backbone", "backbone", str, "backbone model directory (default: bundled all-MiniLM-L6-v2)"),
    ("--device", "device", str, "auto, cpu, cuda or cuda:N"),
    ("--dtype", "dtype", str, "auto, float32, float16 or bfloat16"),
    ("--host", "host", str, "interface to bind"),
    ("--port", "port", int, "TCP port (0 picks a free one)"),
    ("--max-batch-size", "max_batch_size", int, "most rows in one forward"),
    ("--max-wait-ms", "max_wait_ms", float, "how long a batch waits to fill"),
    ("--max-queue", "max_queue", int, "rows that may wait before requests get 429"),
    ("--request-timeout-s", "request_timeout_s", float, "deadline of a classify request"),
    ("--max-inputs-per-request", "max_inputs_per_request", int, "most inputs in one request"),
    ("--max-chars-per-input", "max_chars_per_input", int, "most characters in one text"),
    ("--max-body-bytes", "max_body_bytes", int, "largest request body"),
    ("--cache-max-bytes", "cache_max_bytes", int, "byte budget of tasks resident on the device"),
    ("--log-level", "log_level", str, "critical, error, warning, info or debug"),
    ("--redis-url", "redis_url", str, "Redis registry + change feed URL (several replicas)"),
    ("--store-backend", "store_backend", str, "local or s3"),
    ("--cache-host-max-bytes", "cache_host_max_bytes", int, "byte budget of tasks kept in host memory"),
]
_FLAG_OF = {field: flag for flag, field, _, _ in _SERVE_FLAGS}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adaptserve", description="Serve, train and evaluate adaptserve tasks.")
    parser.add_argument("--version", action="version", version=f"adaptserve {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    serve = commands.add_parser(
        "serve", help="run the HTTP server", description="Run the HTTP server (one uvicorn worker). "
        "Every flag overrides the matching ADAPTSERVE_* env var."
    )
    for flag, field, kind, help_text in _SERVE_FLAGS:
        serve.add_argument(flag, dest=field, type=_given(kind), default=None, help=f"{help_text} [ADAPTSERVE_{field.upper()}]")
    for name, (_, _, help_text) in EXTERNAL_COMMANDS.items():
        # Listed for --help only: their arguments are parsed by their own package (see main()).
        commands.add_parser(name, help=help_text, add_help=False)
    return parser


def _given(kind: Callable[[str], object]) -> Callable[[str], object]:
    """`kind` for a flag's value, refusing a blank one. A blank environment variable means unset
    (the default), but a flag given blank is most likely an unset shell variable (`--redis-url
    "$REDIS_URL"`): taken as the default it would quietly start a replica on its own local
    registry, so it is an error naming the flag."""
    def parse(value: str) -> object:
        if not value.strip():
            raise argparse.ArgumentTypeError("an empty value; give one, or leave the flag out for the default")
        return kind(value)

    parse.__name__ = getattr(kind, "__name__", "value")  # argparse names the type in its messages
    return parse


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in EXTERNAL_COMMANDS:
        return _run_external(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        try:
            return serve(args)
        except KeyboardInterrupt:
            # SIGINT (Ctrl-C, `docker compose up` stopped in its terminal): uvicorn drains as for
            # SIGTERM, then raises the signal again, which Python turns into a traceback. Exit as a
            # shell reports a process SIGINT stopped (128 + 2), without one.
            return 130
    raise AssertionError(f"unhandled command {args.command!r}")  # argparse rejects unknown ones


def serve(args: argparse.Namespace) -> int:
    from service.errors import ConfigurationError
    from service.settings import Settings, describe_validation_error, unknown_variables

    overrides = {field: getattr(args, field) for _, field, _, _ in _SERVE_FLAGS if getattr(args, field) is not None}
    flags = {field: _FLAG_OF[field] for field in overrides}  # what a message names by its flag
    try:
        settings = Settings(**overrides)
    except ValidationError as err:
        print(f"adaptserve serve: invalid settings:\n{describe_validation_error(err, flags)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for chatty in ("botocore", "boto3", "s3transfer", "urllib3"):
        # Their debug records carry signed request headers (AWS access key ids, signatures, session
        # tokens): debugging adaptserve must not write credentials to its log.
        logging.getLogger(chatty).setLevel(max(logging.INFO, logging.getLogger().level))
    unknown = unknown_variables(os.environ)
    if unknown:  # a warning, not an error: a platform may inject variables meant for others
        warn_always(logging.getLogger("service"),
                    f"ignoring {', '.join(unknown)}: no such setting (a typo? every setting is listed in .env.example)")
    problem = _store_problem(settings, flags) or _backbone_problem(settings, flags)
    if problem:
        print(f"adaptserve serve: {problem}", file=sys.stderr)
        return 2

    sock = _listening_socket(settings.host, settings.port, flags)  # before the backbone loads: fail in a second
    if isinstance(sock, str):
        print(f"adaptserve serve: {sock}", file=sys.stderr)
        return 2

    import uvicorn

    from service.app import create_app
    from service.server import uvicorn_config

    try:
        app = create_app(settings, flags=flags)  # its set-up errors and warnings name flags as given too
    except ConfigurationError as err:
        print(f"adaptserve serve: {err.message}", file=sys.stderr)
        return 2
    # The process's long-lived heap (torch, transformers, the app) out of every later GC pass;
    # here, not in create_app: tests build many apps in one process and must keep collecting.
    import service.engine.engine  # noqa: F401  (torch and transformers: the bulk of that heap)
    from service.memory import FullCollections, freeze_startup_heap

    freeze_startup_heap()
    server = uvicorn.Server(uvicorn_config(app, settings))
    state = app.state.service
    # Fail fast: a backbone that cannot load (or a warmup that fails) stops the process with exit 1,
    # so the kubelet or compose restarts it at once with the error in its log, rather than a server
    # alive and never ready that only a probe's deadline would restart.
    state.on_startup_failure = lambda: setattr(server, "should_exit", True)
    state.on_ready = freeze_startup_heap  # what start-up made since: the backbone, its tokenizer, the warm-up
    state.full_collections = FullCollections(settings.gc_full_interval_s)
    state.full_collections.install()
    server.run(sockets=[sock])
    if state.startup_error is not None:
        print(f"adaptserve serve: startup failed: {state.startup_error}", file=sys.stderr)
        return 1
    return 0


def _named(field: str, flags: Mapping[str, str]) -> str:
    """A `serve` setting as a message names it: as the user gave it (`--port`, or `ADAPTSERVE_PORT`
    if the environment set it), or, for a default, both places it could be changed."""
    from service.settings import ENV_PREFIX, setting_name

    variable = f"{ENV_PREFIX}{field.upper()}"
    if field in flags or variable in {name.upper() for name in os.environ}:  # env names match in any case
        return setting_name(field, flags)
    return f"{_FLAG_OF[field]} / {variable}"


def _listening_socket(host: str, port: int, flags: Mapping[str, str]):
    """The server's socket, bound now, or what is wrong with the host/port settings as one line: a
    host that does not resolve or is not this machine's, a port in use or not ours to take. (uvicorn
    would find these only after the backbone loaded, and exit 3 without naming the setting.)
    `flags`: the settings the command line set, named by their flag."""
    import errno
    import socket

    where, port_name = _named("host", flags), _named("port", flags)
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as err:
        return f"{where}: cannot resolve {host!r} to an address to listen on ({err})"
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            return f"{port_name}: port {port} on {host} is already in use (another server?)"
        if err.errno == errno.EADDRNOTAVAIL:
            return f"{where}: {host} is not an address of this machine"
        if err.errno == errno.EACCES:
            return f"{port_name}: not allowed to listen on port {port} (ports below 1024 need privileges)"
        return f"{where}, {port_name}: cannot listen on {host}:{port} ({err.strerror or err})"
    sock.set_inheritable(True)
    return sock


def _store_problem(settings, flags: Mapping[str, str]) -> str | None:
    """A local store that is not a directory, named as the user gave it (the store itself would
    refuse it too, but cannot know whether a flag or the environment said where it is)."""
    root = settings.store.expanduser()
    if settings.store_backend != "local" or root.is_dir():
        return None
    return (f"{_named('store', flags)}: task store {str(root)!r} is not a directory; create it, or point to an "
            "existing store (a new store is an empty directory)")


def _backbone_problem(settings, flags: Mapping[str, str]) -> str | None:
    """What can never work about the backbone settings, checked before the server starts: a
    missing model path or a GPU that is not there is named here in a second, as the setting that
    was given (other load errors surface once the backbone loads, and stop the server with exit 1).
    `flags`: the settings the command line set, named by their flag."""
    path = settings.backbone
    if path is not None:
        backbone = _named("backbone", flags)
        if path.suffix == ".gguf" and not path.is_file():
            return f"{backbone}: no GGUF file at {str(path)!r}"
        if path.suffix != ".gguf" and not (path / "config.json").is_file():
            what = "is not a directory" if not path.is_dir() else "has no config.json"
            return f"{backbone}: {str(path)!r} {what}; expected a local Hugging Face model folder or a .gguf file"
    if settings.device.startswith("cuda"):
        import torch

        device = _named("device", flags)
        if not torch.cuda.is_available():
            return f"{device}: {settings.device!r}, but PyTorch sees no CUDA device here; use auto or cpu"
        index = int(settings.device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            return f"{device}: {settings.device!r}, but PyTorch sees {torch.cuda.device_count()} CUDA device(s)"
    return None


def _run_external(command: str, argv: list[str]) -> int:
    module_name, function_name, _ = EXTERNAL_COMMANDS[command]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        # Only a missing `training` package is "not installed"; a missing dependency inside it
        # is a real error and keeps its traceback.
        if err.name not in _parents(module_name):
            raise
        print(
            f"adaptserve {command}: the training code ({module_name}) is not available; "
            "install adaptserve with its `training` package to use this command",
            file=sys.stderr,
        )
        return 2
    function = getattr(module, function_name, None)
    if function is None:
        print(f"adaptserve {command}: {module_name} has no {function_name}()", file=sys.stderr)
        return 2
    result = function(argv)
    return int(result or 0)


def _parents(module_name: str) -> set[str]:
    """`a.b.c` -> {"a", "a.b", "a.b.c"}."""
    parts = module_name.split(".")
    return {".".join(parts[: i + 1]) for i in range(len(parts))}


if __name__ == "__main__":
    sys.exit(main())
