"""Bearer-token auth (missing and wrong keys refused, health stays open) and TLS."""
import shutil
import subprocess

import grpc
import pytest

from eyas.client import AsyncClient, Client, Unauthenticated, Unavailable
from eyas.serve.background import BackgroundServer
from eyas.serve.config import ServerConfig
from test_serve import build_engine, tiny_config

pytestmark = pytest.mark.timeout(120)

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def engine(tiny_llama_path):
    return build_engine(tiny_config(tiny_llama_path))


@pytest.fixture(scope="module")
def auth_server(engine):
    srv = BackgroundServer(engine, ServerConfig(port=0, api_key=KEY)).start()
    yield srv
    srv.stop(grace=0)


@pytest.mark.parametrize("key", [None, "wrong-key", KEY + "x", ""])
def test_missing_or_wrong_key_is_refused(auth_server, key):
    with Client(auth_server.address, api_key=key, timeout=10) as c:
        with pytest.raises(Unauthenticated):
            c.generate("Hello", max_tokens=2)
        with pytest.raises(Unauthenticated):
            c.model_info()
        with pytest.raises(Unauthenticated):
            c.abort("any")
        assert c.health() == "SERVING"  # probes need no key


def test_right_key_works(auth_server):
    with Client(auth_server.address, api_key=KEY, timeout=30) as c:
        r = c.generate("Hello", max_tokens=4, ignore_eos=True)
        assert len(r.token_ids) == 4 and r.finish_reason == "length"
        assert c.model_info().vocab_size > 0


@pytest.mark.asyncio
async def test_async_client_auth(auth_server):
    async with AsyncClient(auth_server.address, api_key="nope", timeout=10) as c:
        with pytest.raises(Unauthenticated):
            await c.generate("Hello", max_tokens=2)
    async with AsyncClient(auth_server.address, api_key=KEY, timeout=30) as c:
        assert len((await c.generate("Hello", max_tokens=3, ignore_eos=True)).token_ids) == 3


def test_raw_metadata_scheme_is_checked(auth_server):
    from eyas.serve.v1 import generate_pb2 as pb
    from eyas.serve.v1 import generate_pb2_grpc as pb_grpc

    with grpc.insecure_channel(auth_server.address) as ch:
        stub = pb_grpc.GenerationStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=(("authorization", KEY),), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        info = stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=(("authorization", f"Bearer {KEY}"),),
                                 timeout=10)
        assert info.vocab_size > 0


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def test_tls_with_auth(engine, tls_files):
    cert, key = tls_files
    srv = BackgroundServer(engine, ServerConfig(port=0, api_key=KEY, tls_cert=str(cert),
                                                tls_key=str(key))).start()
    try:
        with Client(srv.address, api_key=KEY, tls_root_cert=cert, timeout=30) as c:
            assert len(c.generate("Hello", max_tokens=3, ignore_eos=True).token_ids) == 3
        with Client(srv.address, api_key=KEY, timeout=5) as plain:  # plaintext to a TLS port
            with pytest.raises(Unavailable):
                plain.health()
    finally:
        srv.stop(grace=0)
