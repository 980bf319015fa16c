"""The committed protobuf code is what proto/generate.py produces, for this runtime."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest
from google.protobuf import __version__ as protobuf_version

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "telematics" / "v1"
PROTOS = sorted((ROOT / "proto" / "telematics" / "v1").glob("*.proto"))


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("proto_generate", ROOT / "proto" / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("gen")
    files = load_generator().generate(out)
    return {p.name: p.read_bytes() for p in files}


def test_every_proto_has_committed_code() -> None:
    assert PROTOS
    for proto in PROTOS:
        stem = proto.stem
        assert (COMMITTED / f"{stem}_pb2.py").is_file()
        assert (COMMITTED / f"{stem}_pb2.pyi").is_file()


def test_generated_file_set_matches_committed(generated: dict[str, bytes]) -> None:
    committed = {p.name for p in COMMITTED.glob("*_pb2.py*")}
    assert set(generated) == committed
    assert len(generated) == 2 * len(PROTOS)


@pytest.mark.parametrize(
    "name", sorted(p.name for p in COMMITTED.glob("*_pb2.py*"))
)
def test_committed_code_is_not_stale(generated: dict[str, bytes], name: str) -> None:
    committed = (COMMITTED / name).read_bytes()
    assert generated[name] == committed, (
        f"telematics/v1/{name} is stale: run `python proto/generate.py` and commit"
    )


@pytest.mark.parametrize("name", sorted(p.name for p in COMMITTED.glob("*_pb2.py")))
def test_gencode_not_newer_than_runtime(name: str) -> None:
    text = (COMMITTED / name).read_text()
    match = re.search(r"^# Protobuf Python Version: (\S+)$", text, re.MULTILINE)
    assert match, f"{name} has no 'Protobuf Python Version' line"
    gencode = version_tuple(match.group(1))
    assert len(gencode) == 3
    assert gencode <= version_tuple(protobuf_version), (
        f"{name} was generated for protobuf {match.group(1)}, runtime is {protobuf_version}"
    )
