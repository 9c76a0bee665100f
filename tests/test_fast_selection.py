"""`make test-fast`'s selection (tests/conftest.py) names only files and tests that exist, none of them slow."""
import ast
from pathlib import Path

import conftest

TESTS = Path(__file__).resolve().parent


def _test_functions(path: Path) -> set[str]:
    return {node.name for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_")}


def test_every_fast_name_exists():
    for name in conftest.FAST_FILES:
        assert (TESTS / name).is_file(), name
        assert _test_functions(TESTS / name), name
    for node in conftest.FAST_TESTS:
        file, _, func = node.partition("::")
        assert (TESTS / file).is_file() and func in _test_functions(TESTS / file), node
        assert file not in conftest.FAST_FILES, node


def _marks_slow(tree: ast.AST) -> bool:
    """Whether ``tree`` uses ``pytest.mark.slow`` (on a test, or as a file's ``pytestmark``)."""
    return any(isinstance(node, ast.Attribute) and node.attr == "slow" and isinstance(node.value, ast.Attribute)
               and node.value.attr == "mark" for node in ast.walk(tree))


def test_no_fast_test_is_marked_slow():
    assert _marks_slow(ast.parse((TESTS / "test_tuning.py").read_text()))  # the check sees slow tests
    for name in conftest.FAST_FILES:
        assert not _marks_slow(ast.parse((TESTS / name).read_text())), name
    for node in conftest.FAST_TESTS:
        file, _, func = node.partition("::")
        tree = ast.parse((TESTS / file).read_text())
        defs = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == func]
        assert defs and not any(_marks_slow(d) for d in defs[0].decorator_list), node
        assert not any(isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in n.targets)
                       and _marks_slow(n) for n in tree.body), node
