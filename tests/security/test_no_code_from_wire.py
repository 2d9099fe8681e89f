"""Nothing that reaches the service is unpickled or evaluated: a model is data. This scans the source of
the service and the SDK (not a list of files someone remembered to update) for every way Python turns
bytes into objects or code, and for numpy/yaml loaders in their unsafe modes."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted([*ROOT.joinpath("services").rglob("*.py"), *ROOT.joinpath("client").rglob("*.py")])
SOURCES = [path for path in SOURCES if not path.name.endswith(("_pb2.py", "_pb2_grpc.py"))]

UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "marshal", "shelve", "jsonpickle"}
UNSAFE_BUILTINS = {"eval", "exec", "compile", "__import__"}
UNSAFE_YAML = {"load", "unsafe_load", "full_load", "load_all", "unsafe_load_all", "full_load_all"}


def findings(path: Path, root: Path = ROOT) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        where = f"{path.relative_to(root)}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{where} imports {alias.name}" for alias in node.names
                      if alias.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            found.append(f"{where} imports from {node.module}")
        elif isinstance(node, ast.Call):
            function = node.func
            if isinstance(function, ast.Name) and function.id in UNSAFE_BUILTINS:
                found.append(f"{where} calls {function.id}()")
            if (isinstance(function, ast.Attribute) and function.attr in UNSAFE_YAML
                    and isinstance(function.value, ast.Name) and function.value.id == "yaml"):
                found.append(f"{where} calls yaml.{function.attr}()")
            for keyword in node.keywords:
                if (keyword.arg == "allow_pickle" and not
                        (isinstance(keyword.value, ast.Constant) and keyword.value.value is False)):
                    found.append(f"{where} passes allow_pickle other than False")
    return found


def test_sources_were_found():
    names = {path.name for path in SOURCES}
    assert {"servicer.py", "codec.py", "spec.py", "checkpoint.py"} <= names, names


@pytest.mark.parametrize("path", SOURCES, ids=lambda path: str(path.relative_to(ROOT)))
def test_no_unpickling_or_evaluation(path):
    assert findings(path) == []


def test_the_scanner_catches_each_pattern(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text(
        "import pickle\nfrom marshal import loads\nimport yaml, numpy as np\n"
        "eval('1')\nexec('x = 1')\nyaml.load('a: 1')\nnp.load('f.npy', allow_pickle=True)\n"
        "np.load('g.npy', allow_pickle=flag)\nyaml.safe_load('a: 1')\nnp.load('h.npy', allow_pickle=False)\n")
    caught = findings(planted, root=tmp_path)
    assert len(caught) == 7, caught
