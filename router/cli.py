"""The `pdserve` command.

    pdserve serve [flags]        start Ray (or join --ray-address), the workers, the gRPC
                                 server and the metrics endpoint; print how to query it
    pdserve serve --demo         ... then stream a demo chat answer through the gRPC API
                                 and keep serving (--demo-exit: stop after it)
    pdserve generate "text" [--chat] [--max-tokens N] [--temperature T]
                                 stream an answer from a running server
    pdserve info                 the served model and the deployment, as JSON
    pdserve drain WORKER         take one worker out of rotation: its requests continue
                                 elsewhere, a replacement starts (rolling restarts)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import faulthandler
import logging
import os
import resource
import signal
import sys
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

import grpc

from engine.config import ConfigError
from router import client as pdclient
from router.config import RouterConfig
from router.errors import KVSpecMismatch
from router.server_config import API_KEY_ENV
from router.settings import Settings, add_serve_flags, settings_from_args

log = logging.getLogger("pdserve")
T = TypeVar("T")
DEMO_QUESTION = "What is the capital of France? Answer in one sentence."
STOPPED_BEFORE_UP = "stopped by a signal before the service was up"  # tests look for it
WORKER_NICENESS = 0  # what Ray gives the workers when pdserve starts Ray (see init_ray)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        # The benchmarks have their own CLI and import the router, never the other way
        # round: hand the process over to them.
        os.execv(sys.executable, [sys.executable, "-m", "bench.cli", *argv[1:]])
    args = parser().parse_args(argv)
    return int(args.func(args))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pdserve", description="Disaggregated prefill/decode "
                                "LLM serving on Ray.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("bench", help="load generator and benchmark suite (pdserve bench -h)",
                   add_help=False)

    serve = sub.add_parser("serve", help="run the gRPC service")
    add_serve_flags(serve)
    serve.add_argument("--demo", action="store_true",
                       help="once up, send a demo chat request through the gRPC API and "
                            "stream the answer here, then keep serving")
    serve.add_argument("--demo-exit", action="store_true",
                       help="like --demo, then shut down (a self-check)")
    serve.set_defaults(func=cmd_serve)

    gen = sub.add_parser("generate", help="stream a completion from a running server")
    gen.add_argument("text", help="the prompt (or, with --chat, the user's message)")
    gen.add_argument("--chat", action="store_true",
                     help="send TEXT as a user message; the model's chat template applies")
    gen.add_argument("--system", default=None, help="with --chat: a system message first")
    gen.add_argument("--max-tokens", type=int, default=None,
                     help="most tokens to generate (server default: 256)")
    gen.add_argument("--temperature", type=float, default=None,
                     help="0 is greedy (server default: 1)")
    _client_flags(gen)
    gen.set_defaults(func=cmd_generate)

    info = sub.add_parser("info", help="print the served model and the deployment (JSON)")
    _client_flags(info)
    info.set_defaults(func=cmd_info)

    drain = sub.add_parser("drain", help="take a worker out of rotation and replace it")
    drain.add_argument("worker_id", help="a worker id as `pdserve info` lists it")
    _client_flags(drain)
    drain.set_defaults(func=cmd_drain)
    return p


def _client_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=pdclient.DEFAULT_TARGET,
                   help=f"server address (default: {pdclient.DEFAULT_TARGET})")
    p.add_argument("--api-key", default=None, help=f"bearer token (default: ${API_KEY_ENV})")
    p.add_argument("--tls-ca", default=None, metavar="PEM",
                   help="connect with TLS, trusting this CA (or self-signed certificate)")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="deadline of the call")


# -- serve ----------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    raise_fd_limit()  # a descriptor per open stream; Ray's processes inherit the limit
    # Until serve() takes the signals over, nothing is started: a stop is just an exit.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _stopped_before_start)
    try:
        settings = settings_from_args(args)
    except ConfigError as e:
        print(f"pdserve serve: {e}", file=sys.stderr)
        return 2
    return asyncio.run(serve(settings, demo=args.demo or args.demo_exit,
                             keep_serving=not args.demo_exit))


async def serve(settings: Settings, demo: bool = False, keep_serving: bool = True) -> int:
    # Imported here: `pdserve generate/info` need neither Ray nor the router.
    import ray

    from router.service import Service, print_usage
    from router.worker_handle import WORKER_GONE, one_line

    rc = settings.router
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def take_signals() -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)

    # A signal while ray.init blocks the loop is noted, and acted on once it returns:
    # the start below is then cancelled at once.
    take_signals()
    init_ray_driver(rc)
    service = Service(rc, settings.server)
    status = 0
    try:
        log.info("starting %s on %s", _describe(rc), rc.ray_address or "a local Ray")
        try:
            await _unless_stopped(service.start(), stop)
        except (OSError, KVSpecMismatch) as e:  # a taken port; workers that disagree
            print(f"pdserve serve: {e}", file=sys.stderr)
            return 1
        except WORKER_GONE as e:  # a worker died loading, again and again (the log has why)
            log.error("a worker could not start", exc_info=True)
            print(f"pdserve serve: a worker could not start: {one_line(e)}", file=sys.stderr)
            return 1
        print_usage(service)
        if demo:
            status = await _unless_stopped(run_demo(service.target, settings), stop)
        if keep_serving:
            print("serving; Ctrl-C to stop", flush=True)
            await stop.wait()
    except _Stopped:
        log.info(STOPPED_BEFORE_UP)
    finally:
        await service.stop()
        ray.shutdown()
    return status


def _stopped_before_start(signum: int, frame: Any) -> None:
    log.info(STOPPED_BEFORE_UP)
    raise SystemExit(0)


def raise_fd_limit() -> None:
    """The soft file-descriptor limit up to the hard one (often 1024 against 1M): a
    server holding thousands of streams needs a descriptor for each."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard and hard != resource.RLIM_INFINITY:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as e:
            log.warning("could not raise the open-files limit from %d: %s", soft, e)


class _Stopped(Exception):
    """SIGTERM/SIGINT came while serve() was still starting up (or running its demo)."""


async def _unless_stopped(work: Coroutine[Any, Any, T], stop: asyncio.Event) -> T:
    """``work``, unless the stop signal comes first: then it is cancelled and _Stopped
    raised. A start that waits for workers (model loads; a role no node can host yet)
    would otherwise hold the signal until it ended, which may be never."""
    task = asyncio.ensure_future(work)
    signalled = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, signalled}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        signalled.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    raise _Stopped


def init_ray_driver(rc: RouterConfig) -> None:
    """init_ray for `pdserve serve`, leaving SIGTERM to the caller's handler throughout.
    Left to itself, ray.init takes SIGTERM over while it starts Ray: first abseil's
    failure handler, which aborts the process (exit 134), then handlers that exit
    midway; either way the Ray processes started so far are orphaned. So the router's
    driver goes without the abseil handler (a crash still shows its Python traceback:
    faulthandler; workers keep theirs, Ray reads the flag in each process), and Ray's
    own handlers are not put in while it starts (pdserve's replace them after anyway).
    Both are Ray internals: tests/e2e/test_sigterm_drain.py fails if they move."""
    import ray._private.ray_constants as ray_constants
    import ray._private.utils as ray_utils

    ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True
    with contextlib.suppress(ValueError):  # stderr without a file (captured in tests)
        faulthandler.enable()
    keep = ray_utils.set_sigterm_handler
    ray_utils.set_sigterm_handler = lambda _handler: None
    try:
        init_ray(rc)
    finally:
        ray_utils.set_sigterm_handler = keep


def init_ray(rc: RouterConfig) -> None:
    """Join a cluster, or start Ray here with enough CPUs for the workers asked for (an
    actor that cannot be placed would wait forever; oversubscribing a small machine is
    the better failure for a local run)."""
    import ray

    if ray.is_initialized():
        return
    if rc.ray_address:
        ray.init(address=rc.ray_address, log_to_driver=True)
        return
    from runtime.config import ray_cpus

    n = sum(rc.num_workers(role) for role in rc.roles)
    # A one-node Ray offers the custom resources the workers ask for (--*-resources),
    # so the same flags work locally as on a labelled cluster.
    custom: dict[str, float] = {}
    for role in rc.roles:
        for name, qty in rc.worker_resources(role).items():
            custom[name] = custom.get(name, 0.0) + qty * rc.num_workers(role)
    # address="local": a new instance even if `ray start` left a cluster on this machine
    # (ray.init() would join that one). worker_niceness 0: Ray starts its workers at
    # nice 15 by default so that its driver stays responsive, but here the workers *are*
    # the service: at nice 15 they lose the CPU to any ordinary process on the node
    # (a log shipper, a build) while the router, which needs little, would win it.
    ray.init(address="local",
             num_cpus=max(os.cpu_count() or 1,
                          ray_cpus(n, rc.gpus_per_worker, rc.threads_per_worker)),
             resources=custom or None, include_dashboard=False, log_to_driver=True,
             _system_config={"worker_niceness": WORKER_NICENESS})


def _describe(rc: RouterConfig) -> str:
    where = f"{rc.gpus_per_worker:g} GPU each" if rc.gpus_per_worker else "CPU"
    shape = (f"{rc.workers} colocated worker(s)" if rc.mode == "colocated" else
             f"{rc.prefill_workers} prefill + {rc.decode_workers} decode worker(s)")
    return f"{shape} of {rc.engine.model} ({where})"


async def run_demo(target: str, settings: Settings) -> int:
    """A chat request through the real gRPC API, streamed to the terminal."""
    s = settings.server
    # A self-signed certificate is its own CA; a CA-issued one is trusted by the system.
    creds = pdclient.credentials(s.tls_cert) if s.tls else None
    channel = (grpc.aio.secure_channel(target, creds) if creds is not None
               else grpc.aio.insecure_channel(target))
    request = pdclient.generate_request(DEMO_QUESTION, chat=True, max_tokens=64,
                                        temperature=0.0)
    print(f"\ndemo> {DEMO_QUESTION}", flush=True)
    last = None
    try:
        async with channel:
            stub = pdclient.pb_grpc.GenerationStub(channel)
            async for r in stub.Generate(request, metadata=pdclient.metadata(s.api_key)):
                sys.stdout.write(r.text)
                sys.stdout.flush()
                last = r
    except grpc.aio.AioRpcError as e:
        print(f"\ndemo failed: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    print()
    if last is not None:
        print(pdclient.summary(last) + "\n", flush=True)
    return 0


# -- client commands ------------------------------------------------------------------------
def cmd_generate(args: argparse.Namespace) -> int:
    request = pdclient.generate_request(args.text, chat=args.chat, max_tokens=args.max_tokens,
                                        temperature=args.temperature, system=args.system)
    with _client(args) as c:
        pdclient.print_stream(c.generate(request))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    with _client(args) as c:
        print('{"model": ' + pdclient.to_json(c.model_info()) + ',\n "server": '
              + pdclient.to_json(c.server_info()) + "}")
    return 0


def cmd_drain(args: argparse.Namespace) -> int:
    with _client(args) as c:
        r = c.drain_worker(args.worker_id)
    print(f"drained {args.worker_id}: {r.num_requests_moved} request(s) moved")
    return 0


@contextlib.contextmanager
def _client(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    c = pdclient.Client(args.target, args.api_key, args.tls_ca, args.timeout)
    try:
        yield c
    except grpc.RpcError as e:
        print(f"\npdserve: {e.code().name}: {e.details()}", file=sys.stderr)  # type: ignore[attr-defined]
        raise SystemExit(1) from None
    finally:
        c.close()


if __name__ == "__main__":
    sys.exit(main())
