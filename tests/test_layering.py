"""The package layout holds: imports at module level, one-way dependencies between packages, one
remote-path test. Read from the source (ast), so a change that breaks the layout fails here."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / 'dbrx_train'
MODULES = sorted(PACKAGE.rglob('*.py'))


def imported(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.module:
        return [node.module]
    return []


def test_no_module_imports_another_inside_a_function():
    found = []
    for path in MODULES:
        for function in ast.walk(ast.parse(path.read_text())):
            if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found += [f'{path.relative_to(PACKAGE)}:{node.lineno} {name}' for node in ast.walk(function)
                          for name in imported(node) if name.startswith('dbrx_train')]
    assert found == []


@pytest.mark.parametrize('package,forbidden', [('evaluation', 'dbrx_train.training'), ('data', 'dbrx_train.model')])
def test_packages_depend_one_way(package, forbidden):
    found = [f'{path.relative_to(PACKAGE)}: {name}' for path in sorted((PACKAGE / package).rglob('*.py'))
             for node in ast.walk(ast.parse(path.read_text())) for name in imported(node)
             if name == forbidden or name.startswith(forbidden + '.')]
    assert found == []


def test_only_uri_tells_a_remote_path():
    found = [str(path.relative_to(PACKAGE)) for path in MODULES if path.name != 'uri.py'
             for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Constant) and node.value == '://']
    assert found == []
