"""
Reading loss code out of a local git snapshot of a reference repository, at run time.

Nothing of the reference repositories is stored in d2kd: :func:`git_show` reads a file from a
snapshot (a git directory, bare or not) that whoever runs ``tools/parity/make_fixtures.py``
fetched, and :func:`load_defs` compiles only the named top-level functions / classes (their
decorators dropped, so no registry or mmcv import is needed) into a namespace the caller
provides (``torch``, ``F``, ``nn`` and stubs). :func:`load_statements` does the same for a run
of statements inside a method, for code that is written inline rather than as a function.
"""

import ast
import subprocess
from typing import Dict, Iterable, List, Optional


def git_show(git_dir: str, path: str, rev: str = "HEAD") -> str:
    """Text of ``path`` at ``rev`` in the snapshot ``git_dir``."""
    return subprocess.run(
        ["git", f"--git-dir={git_dir}", "show", f"{rev}:{path}"], check=True, capture_output=True, text=True
    ).stdout


def git_head(git_dir: str, rev: str = "HEAD") -> str:
    """The commit hash of ``rev`` in the snapshot."""
    return subprocess.run(
        ["git", f"--git-dir={git_dir}", "rev-parse", rev], check=True, capture_output=True, text=True
    ).stdout.strip()


def _top_level(tree: ast.Module, name: str) -> ast.stmt:
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name:
            return node
    raise KeyError(f"No top-level function or class named {name!r}.")


def _method(tree: ast.Module, cls: str, name: str) -> ast.FunctionDef:
    for node in _top_level(tree, cls).body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
    raise KeyError(f"No method {cls}.{name}.")


def _strip_decorators(node):
    node.decorator_list = []
    return node


def load_defs(source: str, names: Iterable[str], namespace: Dict, filename: str = "<reference>") -> Dict:
    """
    Compile the named definitions of ``source`` into ``namespace`` and return it.

    ``names`` are top-level names (``"KLDivergence"``) or ``"Class.method"``: a method is
    compiled as a plain function (its first argument is whatever ``self`` the caller passes).
    A class is compiled with the bases it names, which must resolve in ``namespace``.
    """
    tree = ast.parse(source, filename=filename)
    nodes: List[ast.stmt] = []
    for name in names:
        if "." in name:
            cls, meth = name.split(".", 1)
            nodes.append(_strip_decorators(_method(tree, cls, meth)))
        else:
            node = _top_level(tree, name)
            _strip_decorators(node)
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, ast.FunctionDef):
                        _strip_decorators(item)
            nodes.append(node)
    module = ast.Module(body=nodes, type_ignores=[])
    ast.fix_missing_locations(module)
    exec(compile(module, filename, "exec"), namespace)
    return namespace


def load_statements(
    source: str, cls: Optional[str], func: str, first_target: str, count: int, filename: str = "<reference>"
):
    """
    A code object of ``count`` consecutive statements of ``cls.func`` (or the top-level
    ``func``), starting with the assignment to ``first_target`` (e.g. ``"mask_batch"``).
    Run it with ``exec(code, namespace)`` after putting the variables it reads in ``namespace``.
    """
    tree = ast.parse(source, filename=filename)
    fn = _method(tree, cls, func) if cls else _top_level(tree, func)
    body = fn.body
    for i, stmt in enumerate(body):
        if isinstance(stmt, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == first_target for t in stmt.targets
        ):
            module = ast.Module(body=body[i : i + count], type_ignores=[])
            ast.fix_missing_locations(module)
            return compile(module, filename, "exec")
    raise KeyError(f"No assignment to {first_target!r} in {func}.")
