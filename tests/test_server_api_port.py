"""Where `epp serve` puts the project API: sharing the grpcio ext_proc port by default, on
its own --api-port in either transport when one is given, or off with --api-port=0."""

import grpc
import pytest

from epp.handlers.protocol import SERVICE_NAME
from epp.options import parse_args
from epp.server import PickerServer
from proto import epp_api_pb2 as pb
from proto import epp_api_pb2_grpc as pb_grpc


async def list_endpoints(port: int) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        try:
            await pb_grpc.EndpointPickerStub(ch).ListEndpoints(pb.ListEndpointsRequest(), timeout=5)
        except grpc.aio.AioRpcError as e:
            return e.code()
    return grpc.StatusCode.OK


async def ext_proc_served(port: int) -> bool:
    """The ext_proc service answers on `port` (a stream with no message is not UNIMPLEMENTED)."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = ch.stream_stream(f"/{SERVICE_NAME}/Process")(iter(()), timeout=5)
        try:
            async for _ in call:
                pass
        except grpc.aio.AioRpcError as e:
            return e.code() != grpc.StatusCode.UNIMPLEMENTED
    return True


@pytest.mark.parametrize("transport,api_flag,where", [
    ("grpcio", None, "shared"),
    ("grpcio", "own", "own"),
    ("grpcio", "0", "off"),
    ("native", "own", "own"),
    ("native", "0", "off"),
])
async def test_api_port(transport, api_flag, where):
    from devstack.launch import free_port

    api_port = free_port()
    flags = ["--endpoints=127.0.0.1:1", "--grpc-port=0", "--grpc-health-port=0", "--metrics-port=0",
             "--secure-serving=false", "--bind-address=127.0.0.1", f"--ext-proc-transport={transport}"]
    if api_flag is not None:
        flags.append(f"--api-port={api_port if api_flag == 'own' else api_flag}")
    server = PickerServer(parse_args(flags))
    await server.start()
    try:
        assert await ext_proc_served(server.grpc_port)
        on_grpc_port = await list_endpoints(server.grpc_port)
        if where == "shared":
            assert on_grpc_port == grpc.StatusCode.OK and server.api_port == 0
        else:
            assert on_grpc_port != grpc.StatusCode.OK  # never on the ext_proc port
        if where == "own":
            assert server.api_port == api_port and await list_endpoints(api_port) == grpc.StatusCode.OK
            assert f"api={api_port}" in server.ready_line()
        if where == "off":
            assert server.api_port == 0 and "api=off" in server.ready_line()
            assert await list_endpoints(api_port) == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(0)


def test_api_port_flag_help_says_to_keep_it_in_the_cluster(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    assert "expose it only inside the cluster" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit):
        parse_args(["--endpoints=127.0.0.1:1", "--api-port=70000"])
