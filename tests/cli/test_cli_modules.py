"""The parser leaves out a subcommand or suite module the install lacks, and fails loudly on one
that is there but cannot be imported."""

import sys

import pytest

from gradserve_services.cli.modules import present_modules


@pytest.fixture
def package(tmp_path, monkeypatch):
    root = tmp_path / "clipkg"
    root.mkdir()
    (root / "__init__.py").write_text("")
    (root / "here.py").write_text("VALUE = 1\n")
    (root / "broken.py").write_text("import clipkg_dependency_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "clipkg"
    for name in [name for name in sys.modules if name == "clipkg" or name.startswith("clipkg.")]:
        del sys.modules[name]


def test_a_missing_module_is_left_out(package):
    found = list(present_modules(package, ["absent", "here"]))
    assert [name for name, _ in found] == ["here"] and found[0][1].VALUE == 1


def test_a_module_whose_own_import_fails_raises(package):
    with pytest.raises(ModuleNotFoundError, match="clipkg_dependency_not_installed"):
        list(present_modules(package, ["here", "broken"]))


def test_every_subcommand_and_suite_of_this_install_is_found():
    from gradserve_services.cli import SUBCOMMAND_MODULES
    from gradserve_services.cli.bench import SUITES

    assert [name for name, _ in present_modules("gradserve_services.cli", SUBCOMMAND_MODULES)] == \
        list(SUBCOMMAND_MODULES)
    assert [name for name, _ in present_modules("gradserve_services.bench", SUITES)] == list(SUITES)
