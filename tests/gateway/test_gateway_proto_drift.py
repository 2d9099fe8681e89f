"""The committed stubs are exactly what protoc makes of protos/ today."""

from __future__ import annotations

from gradserve_services.protogen import STUB_DIR, generate


def test_regenerated_stubs_equal_committed(tmp_path):
    generated = generate(tmp_path)
    assert {path.name for path in generated} == {p.name for p in STUB_DIR.glob("*_pb2*.py")}
    for path in generated:
        assert path.read_bytes() == (STUB_DIR / path.name).read_bytes(), f"{path.name} drifted: run make proto"
