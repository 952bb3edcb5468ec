"""The committed generated modules must be what `make proto` produces from protos/."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ("replicator_pb2.py", "replicator_pb2.pyi", "replicator_pb2_grpc.py")


def test_generated_modules_match_protos(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'protos'}",
         f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}",
         str(ROOT / "protos/replicator/v1/replicator.proto")],
        check=True,
    )
    for name in GENERATED:
        fresh = (tmp_path / "replicator/v1" / name).read_text()
        committed = (ROOT / "replicator/v1" / name).read_text()
        assert fresh == committed, f"replicator/v1/{name} is stale: run `make proto`"
