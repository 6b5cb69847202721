"""Operating the gRPC service: reflection, the API key, TLS, the CLI client, and health
following worker liveness (last: it kills a worker and waits for its replacement)."""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
import ray
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from prometheus_client.parser import text_string_to_metric_families

from proto.pdserve.v1 import generation_pb2 as pb
from proto.pdserve.v1 import generation_pb2_grpc as pb_grpc
from router import cli
from router.server import GrpcServer
from router.server_config import ServerConfig

if TYPE_CHECKING:
    from tests.e2e.grpc_fixtures import LiveService

pytest_plugins = ["tests.e2e.grpc_fixtures"]

SERVICE = "pdserve.v1.Generation"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def reflect(channel: grpc.Channel, request: reflection_pb2.ServerReflectionRequest,
            metadata: tuple[tuple[str, str], ...]) -> reflection_pb2.ServerReflectionResponse:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    [response] = stub.ServerReflectionInfo(iter([request]), metadata=metadata, timeout=10)
    return response


class _Auth(grpc.UnaryUnaryClientInterceptor, grpc.StreamStreamClientInterceptor,
            grpc.UnaryStreamClientInterceptor):
    """Adds the bearer token to every call of a channel (as grpcurl's -H does)."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.metadata = metadata

    def _with(self, details):  # type: ignore[no-untyped-def]
        return details._replace(metadata=tuple(details.metadata or ()) + self.metadata)

    def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return continuation(self._with(details), request)

    def intercept_unary_stream(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return continuation(self._with(details), request)

    def intercept_stream_stream(self, continuation, details, requests):  # type: ignore[no-untyped-def]
        return continuation(self._with(details), requests)


def test_reflection_lists_and_describes_the_service(live: LiveService) -> None:
    listed = reflect(live.channel, reflection_pb2.ServerReflectionRequest(list_services=""),
                     live.auth)
    names = {s.name for s in listed.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health"} <= names
    found = reflect(live.channel, reflection_pb2.ServerReflectionRequest(
        file_containing_symbol=SERVICE), live.auth)
    fdp = descriptor_pb2.FileDescriptorProto.FromString(
        found.file_descriptor_response.file_descriptor_proto[0])
    assert fdp.name == "pdserve/v1/generation.proto"
    [service] = fdp.service
    assert [m.name for m in service.method] == ["Generate", "GetModelInfo", "GetServerInfo",
                                                "DrainWorker"]


def test_a_client_without_the_proto_can_generate(live: LiveService) -> None:
    """What grpcurl does: learn the types through reflection, then call."""
    channel = grpc.intercept_channel(grpc.insecure_channel(live.target), _Auth(live.auth))
    with channel:
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        method = pool.FindServiceByName(SERVICE).FindMethodByName("Generate")
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        call = channel.unary_stream(f"/{SERVICE}/Generate",
                                    request_serializer=request_cls.SerializeToString,
                                    response_deserializer=response_cls.FromString)
        request = request_cls(prompt="The capital of France is")
        request.sampling.max_tokens = 3
        responses = list(call(request, timeout=60))
    assert responses[-1].usage.completion_tokens == 3


@pytest.mark.parametrize("metadata", [(), (("authorization", "Bearer wrong"),),
                                      (("authorization", "not-a-bearer-token"),)],
                         ids=["missing", "wrong", "malformed"])
def test_every_call_needs_the_api_key(live: LiveService, metadata: tuple) -> None:
    calls: list[Callable[[], object]] = [
        lambda: list(live.stub.Generate(pb.GenerateRequest(prompt="hi"), metadata=metadata,
                                        timeout=10)),
        lambda: live.stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=metadata, timeout=10),
        lambda: live.stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=metadata,
                                        timeout=10),
        lambda: reflect(live.channel, reflection_pb2.ServerReflectionRequest(list_services=""),
                        metadata),
    ]
    refused_before = unauthenticated_generates(live)
    for call in calls:
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "API key" in info.value.details()
    # Counted like any Generate outcome (the other calls are not requests).
    assert unauthenticated_generates(live) == refused_before + 1
    # Health stays open: probes and load balancers cannot send credentials.
    health = health_pb2_grpc.HealthStub(live.channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == SERVING


def unauthenticated_generates(live: LiveService) -> float:
    with urllib.request.urlopen(live.metrics_url, timeout=10) as r:
        for family in text_string_to_metric_families(r.read().decode()):
            for s in family.samples:
                if (s.name == "pdserve_requests_total"
                        and s.labels.get("code") == "UNAUTHENTICATED"):
                    return s.value
    return 0.0


def test_cli_info_and_generate(live: LiveService, capsys: pytest.CaptureFixture[str]) -> None:
    flags = ["--target", live.target, "--api-key", live.api_key]
    assert cli.main(["info", *flags]) == 0
    assert '"model_id": "smollm2-135m"' in capsys.readouterr().out
    assert cli.main(["generate", "What is the capital of France?", "--chat",
                     "--max-tokens", "8", "--temperature", "0", *flags]) == 0
    out = capsys.readouterr()
    assert "Paris" in out.out and "prompt tokens" in out.err


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: cannot make a test certificate")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem"),
                    "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    return d / "cert.pem", d / "key.pem"


def test_tls(live: LiveService, self_signed: tuple[Path, Path],
             capsys: pytest.CaptureFixture[str]) -> None:
    """A second, TLS-only server in front of the same router."""
    cert, key = self_signed
    config = ServerConfig(host="127.0.0.1", port=0, metrics_port=None, api_key=live.api_key,
                          tls_cert=str(cert), tls_key=str(key))

    async def start() -> GrpcServer:
        server = GrpcServer(live.router, config, live.service.metrics)
        await server.start()
        return server

    server = live.run(start())
    target = f"127.0.0.1:{server.port}"
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with grpc.secure_channel(target, creds) as channel:
            info = pb_grpc.GenerationStub(channel).GetModelInfo(
                pb.GetModelInfoRequest(), metadata=live.auth, timeout=10)
        assert info.model_id == "smollm2-135m"
        assert cli.main(["generate", "Hello", "--max-tokens", "3", "--target", target,
                         "--tls-ca", str(cert), "--api-key", live.api_key]) == 0
        assert "3 generated" in capsys.readouterr().err
        with grpc.insecure_channel(target) as plain, pytest.raises(grpc.RpcError) as err:
            pb_grpc.GenerationStub(plain).GetModelInfo(pb.GetModelInfoRequest(),
                                                       metadata=live.auth, timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        live.run(server.stop())


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


def _scrape(live: LiveService) -> str:
    with urllib.request.urlopen(live.metrics_url, timeout=10) as r:
        return r.read().decode()


def test_health_follows_worker_liveness(live: LiveService) -> None:
    health = health_pb2_grpc.HealthStub(live.channel)

    def status(service: str = "") -> int:
        return health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

    assert status() == SERVING and status(SERVICE) == SERVING
    decode = next(h for h in live.router.workers() if h.role == "decode" and h.alive)
    up = f'pdserve_worker_up{{role="decode",worker="{decode.worker_id}"}}'
    assert f"{up} 1.0" in _scrape(live)

    ray.kill(decode.actor, no_restart=True)
    _wait_for(lambda: status() == NOT_SERVING, 20, "NOT_SERVING after the decode worker died")
    assert status(SERVICE) == NOT_SERVING
    # A request while the replacement starts waits for it (never UNAVAILABLE while one
    # is coming): it is served, or its deadline passes first.
    try:
        responses = live.generate(pb.GenerateRequest(
            prompt="hi", sampling=pb.SamplingParams(max_tokens=2)), timeout=30)
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED, e.details()
    else:
        assert responses[-1].usage.completion_tokens == 2
    assert f"{up} 0.0" in _scrape(live)  # the dead worker reads 0, not a vanished series

    _wait_for(lambda: status() == SERVING, 180, "SERVING once a new decode worker is up")
    replacement = [h for h in live.router.workers() if h.role == "decode" and h.alive]
    assert [h.worker_id for h in replacement] != [decode.worker_id]
    responses = live.generate(pb.GenerateRequest(prompt="The capital of France is",
                                                 sampling=pb.SamplingParams(max_tokens=3)))
    assert responses[-1].usage.completion_tokens == 3
