"""The committed generated code matches proto/eyas/v1/generate.proto; server config parsing."""
import re
from pathlib import Path

import pytest

from eyas.errors import ConfigError
from eyas.serve.config import ServerConfig
from util_scripts import load_script

REPO = Path(__file__).resolve().parents[1]
GENERATED = REPO / "eyas" / "serve" / "v1"


def load_gen():
    return load_script("proto/gen.py", "proto_gen")


def test_generated_code_matches_proto(tmp_path):
    pytest.importorskip("grpc_tools")
    import grpc_tools

    committed = re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", (GENERATED / "generate_pb2_grpc.py").read_text())
    tools_version = getattr(grpc_tools, "__version__", None)
    if tools_version is None:
        from importlib.metadata import version
        tools_version = version("grpcio-tools")
    if committed and committed.group(1) != tools_version:
        pytest.skip(f"grpcio-tools {tools_version} differs from the one that generated the code "
                    f"({committed.group(1)}); regenerate with `python proto/gen.py`")
    written = load_gen().generate(tmp_path)
    assert {p.name for p in written} == {f"{name}{suffix}" for name in ("generate_pb2", "worker_pb2")
                                         for suffix in (".py", "_grpc.py", ".pyi")}
    for path in written:
        assert path.read_text() == (GENERATED / path.name).read_text(), \
            f"{path.name} is stale: run `python proto/gen.py`"


def test_generated_modules_import_from_the_package():
    from eyas.serve.v1 import generate_pb2, generate_pb2_grpc

    text = (GENERATED / "generate_pb2_grpc.py").read_text()
    assert "from eyas.serve.v1 import generate_pb2" in text
    assert "'eyas.v1.Generation'" in text  # the proto service name is untouched
    service = generate_pb2.DESCRIPTOR.services_by_name["Generation"]
    assert service.full_name == "eyas.v1.Generation"
    assert {m.name for m in service.methods} == {"Generate", "GetModelInfo", "Abort"}
    assert generate_pb2.DESCRIPTOR.name == "eyas/v1/generate.proto"
    assert generate_pb2_grpc.GenerationStub is not None


def test_server_config_validation(tmp_path):
    assert ServerConfig().address == "127.0.0.1:50051"
    assert ServerConfig(max_tokens_cap=1000).effective_max_tokens_cap(256) == 256
    assert ServerConfig().effective_max_tokens_cap(256) == 256
    assert ServerConfig(max_tokens_cap=64).effective_max_tokens_cap(256) == 64
    for bad in (dict(port=70000), dict(max_pending=0), dict(grace_period=-1), dict(api_key=" "),
                dict(tls_cert=str(tmp_path / "c.pem")), dict(max_tokens_cap=0), dict(default_max_tokens=0)):
        with pytest.raises(ConfigError):
            ServerConfig(**bad)
    with pytest.raises(ConfigError, match="unknown server config keys"):
        ServerConfig.from_dict({"prot": 1})


def test_example_config_parses():
    from eyas.config import EngineConfig

    path = REPO / "configs" / "serve-smollm2.yaml"
    server = ServerConfig.from_yaml(path)
    engine = EngineConfig.from_yaml(path)
    assert server.host == "127.0.0.1" and server.port == 50051
    assert engine.model == "smollm2-135m-instruct"
