"""List what in the project's Python files needs Python > 3.9 or numpy >= 2 (3D Slicer 5.6/5.8: Python 3.9.10, numpy 1.26).

A static scan (any Python 3.9+ runs it; nothing is imported or fixed):

1. syntax: ``compile()`` of every file, when run by a Python 3.9 (``--python`` starts one);
2. constructs a 3.9 parser accepts but 3.9 cannot run:
   * PEP 604 unions (``X | None``) evaluated at run time: outside annotations, in annotations of
     a file without ``from __future__ import annotations``, and in the parameter annotations of
     a file that imports typer (typer evaluates them with ``typing.get_type_hints``);
   * call keywords added in 3.10+ (``zip(strict=)``, ``dataclass(slots=/kw_only=/match_args=)``,
     ``field(kw_only=)``, ``TemporaryDirectory(ignore_cleanup_errors=)``, ``glob(root_dir=)``,
     ``bisect_*(key=)``, ``Popen(process_group=)``, ``rmtree(onexc=)``, ...);
   * standard-library names added in 3.10+ (``itertools.pairwise``, ``typing.TypeAlias``,
     ``types.NoneType``, ``datetime.UTC``, ``enum.StrEnum``, ``tomllib``, ...);
3. numpy names that exist from numpy 2.0 only (``np.trapezoid``, ``np.concat``, ``np.bool``, ...).

Usage::

    python Testing/InstalledExtension/py39_scan.py [PATH ...] [--python ~/.pyenv/versions/3.9.18/bin/python]

Default paths: the four packages' folders and the three module files. Exit status 1 when anything is found.
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[2]
DEFAULT_PATHS = [
    "ContrastAmplifierCommon/ContrastAmplifierCommon",
    "ContrastAmplifier/ContrastAmplifierLib",
    "ContrastAmplifierTraining/ContrastAmplifierTrainingLib",
    "LesionReader/LesionReaderLib",
    "ContrastAmplifier/ContrastAmplifier.py",
    "ContrastAmplifierTraining/ContrastAmplifierTraining.py",
    "LesionReader/LesionReader.py",
]

#: (module, attribute) -> Python version that added it.
NEW_STDLIB_NAMES: dict[tuple[str, str], str] = {
    **{("itertools", n): v for n, v in (("pairwise", "3.10"), ("batched", "3.12"))},
    **{("typing", n): "3.10" for n in ("TypeAlias", "ParamSpec", "ParamSpecArgs", "ParamSpecKwargs", "Concatenate",
                                       "TypeGuard", "is_typeddict")},
    **{("typing", n): "3.11" for n in ("Self", "Never", "LiteralString", "assert_never", "assert_type", "reveal_type",
                                       "Required", "NotRequired", "Unpack", "TypeVarTuple", "dataclass_transform",
                                       "get_overloads", "clear_overloads")},
    **{("typing", n): "3.12" for n in ("override", "TypeAliasType")},
    **{("types", n): "3.10" for n in ("NoneType", "EllipsisType", "NotImplementedType", "UnionType")},
    ("datetime", "UTC"): "3.11",
    **{("enum", n): "3.11" for n in ("StrEnum", "ReprEnum", "verify", "member", "nonmember", "global_enum",
                                     "EnumCheck", "FlagBoundary", "property")},
    **{("contextlib", n): v for n, v in (("aclosing", "3.10"), ("chdir", "3.11"))},
    **{("math", n): v for n, v in (("cbrt", "3.11"), ("exp2", "3.11"), ("sumprod", "3.12"))},
    ("hashlib", "file_digest"): "3.11",
    ("operator", "call"): "3.11",
    ("inspect", "get_annotations"): "3.10",
    **{("sys", n): "3.10" for n in ("stdlib_module_names", "orig_argv")},
    ("importlib.metadata", "packages_distributions"): "3.10",
    **{("statistics", n): "3.10" for n in ("correlation", "covariance", "linear_regression")},
    ("logging", "getLevelNamesMapping"): "3.11",
    **{("asyncio", n): "3.11" for n in ("TaskGroup", "timeout", "Runner")},
    ("dataclasses", "KW_ONLY"): "3.10",
    ("re", "NOFLAG"): "3.11",
    ("random", "binomialvariate"): "3.12",
}
NEW_MODULES = {"tomllib": "3.11", "wsgiref.types": "3.11"}
NEW_BUILTINS = {"aiter": "3.10", "anext": "3.10", "ExceptionGroup": "3.11", "BaseExceptionGroup": "3.11",
                "EncodingWarning": "3.10"}
#: Path/str/int methods and attributes (matched by attribute name only: reported as "check").
NEW_METHODS = {"hardlink_to": "3.10", "bit_count": "3.10", "is_junction": "3.12"}
#: (called name, keyword) -> version.
NEW_KEYWORDS: dict[tuple[str, str], str] = {
    ("zip", "strict"): "3.10",
    **{("dataclass", k): "3.10" for k in ("slots", "kw_only", "match_args")},
    ("dataclass", "weakref_slot"): "3.11",
    ("field", "kw_only"): "3.10",
    ("TemporaryDirectory", "ignore_cleanup_errors"): "3.10",
    ("NamedTemporaryFile", "delete_on_close"): "3.12",
    **{("glob", k): "3.10" for k in ("root_dir", "dir_fd")},
    **{("iglob", k): "3.10" for k in ("root_dir", "dir_fd")},
    **{(f, "key"): "3.10" for f in ("bisect", "bisect_left", "bisect_right", "insort", "insort_left", "insort_right")},
    ("Popen", "process_group"): "3.11",
    ("run", "process_group"): "3.11",
    ("rmtree", "onexc"): "3.12",
    ("realpath", "strict"): "3.10",
}
#: numpy names that exist from 2.0 (or 2.1) only: AttributeError under Slicer's numpy 1.26.
NUMPY2_NAMES = {
    **{n: "2.0" for n in ("trapezoid", "concat", "isdtype", "permute_dims", "matrix_transpose", "vecdot", "astype",
                          "acos", "asin", "atan", "atan2", "acosh", "asinh", "atanh", "pow", "bitwise_left_shift",
                          "bitwise_right_shift", "bitwise_invert", "unique_all", "unique_counts", "unique_inverse",
                          "unique_values", "long", "ulong", "bool")},
    **{n: "2.1" for n in ("unstack", "cumulative_sum", "cumulative_prod")},
}
NUMPY2_LINALG = {n: "2.0" for n in ("matrix_norm", "vector_norm", "vecdot", "matrix_transpose", "outer", "diagonal",
                                    "trace", "cross", "svdvals")}
TYPE_NAMES = {"int", "float", "str", "bytes", "bool", "complex", "list", "dict", "tuple", "set", "frozenset",
              "type", "object", "Path", "None"}


def _is_typeish(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant) and node.value is None:
        return True
    if isinstance(node, ast.Name):  # a class name (CamelCase), not a CONSTANT flag
        return node.id in TYPE_NAMES or (node.id[:1].isupper() and not node.id.isupper())
    if isinstance(node, ast.Attribute):
        return node.attr[:1].isupper() and not node.attr.isupper()
    if isinstance(node, ast.Subscript):
        return _is_typeish(node.value)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _is_typeish(node.left) and _is_typeish(node.right)
    return False


def _dotted(node: ast.AST) -> Optional[str]:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


class Scanner(ast.NodeVisitor):
    def __init__(self, path: Path, tree: ast.Module) -> None:
        self.path = path
        self.findings: list[tuple[int, str]] = []
        self.future_annotations = any(isinstance(n, ast.ImportFrom) and n.module == "__future__"
                                      and any(a.name == "annotations" for a in n.names) for n in tree.body)
        self.uses_typer = any(isinstance(n, (ast.Import, ast.ImportFrom)) and (
            (isinstance(n, ast.Import) and any(a.name == "typer" for a in n.names))
            or (isinstance(n, ast.ImportFrom) and (n.module or "").startswith("typer"))) for n in ast.walk(tree))
        self.aliases: dict[str, str] = {}  # local name -> module (or module.attr)
        self.annotation_nodes: set[int] = set()
        self.param_annotation_nodes: set[int] = set()
        for node in ast.walk(tree):
            for ann in self._annotations_of(node):
                for sub in ast.walk(ann):
                    self.annotation_nodes.add(id(sub))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and self._is_typer_command(node):
                args = node.args
                for arg in args.posonlyargs + args.args + args.kwonlyargs + [a for a in (args.vararg, args.kwarg) if a]:
                    if arg.annotation is not None:
                        for sub in ast.walk(arg.annotation):
                            self.param_annotation_nodes.add(id(sub))

    @staticmethod
    def _is_typer_command(node: ast.AST) -> bool:
        """Decorated with ``@<app>.command(...)``/``@<app>.callback(...)``: typer reads its parameters' annotations."""
        for decorator in getattr(node, "decorator_list", []):
            target = decorator.func if isinstance(decorator, ast.Call) else decorator
            if isinstance(target, ast.Attribute) and target.attr in ("command", "callback"):
                return True
        return False

    @staticmethod
    def _annotations_of(node: ast.AST) -> Iterable[ast.AST]:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            for arg in args.posonlyargs + args.args + args.kwonlyargs + [a for a in (args.vararg, args.kwarg) if a]:
                if arg.annotation is not None:
                    yield arg.annotation
            if node.returns is not None:
                yield node.returns
        elif isinstance(node, ast.AnnAssign):
            yield node.annotation

    def add(self, node: ast.AST, message: str) -> None:
        self.findings.append((getattr(node, "lineno", 0), message))

    # imports: remember aliases, flag new modules/names
    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.aliases[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else alias.name.split(".")[0]
            if alias.name in NEW_MODULES:
                self.add(node, f"import {alias.name} (module added in Python {NEW_MODULES[alias.name]})")
        self.generic_visit(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        if module in NEW_MODULES:
            self.add(node, f"from {module} import ... (module added in Python {NEW_MODULES[module]})")
        for alias in node.names:
            version = NEW_STDLIB_NAMES.get((module, alias.name))
            if version:
                self.add(node, f"from {module} import {alias.name} (added in Python {version})")
            self.aliases[alias.asname or alias.name] = f"{module}.{alias.name}"
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        dotted = _dotted(node)
        if dotted:
            head, _, rest = dotted.partition(".")
            module = self.aliases.get(head, head)
            full = f"{module}.{rest}" if rest else module
            mod, _, attr = full.rpartition(".")
            version = NEW_STDLIB_NAMES.get((mod, attr))
            if version:
                self.add(node, f"{dotted} (added in Python {version})")
            if mod == "numpy" and attr in NUMPY2_NAMES:
                self.add(node, f"{dotted} (numpy >= {NUMPY2_NAMES[attr]} only; Slicer 5.8 ships numpy 1.26.4)")
            if mod == "numpy.linalg" and attr in NUMPY2_LINALG:
                self.add(node, f"{dotted} (numpy >= {NUMPY2_LINALG[attr]} only; Slicer 5.8 ships numpy 1.26.4)")
            if attr in NEW_METHODS:
                self.add(node, f".{attr} (added in Python {NEW_METHODS[attr]})")
        self.generic_visit(node)

    def visit_Name(self, node: ast.Name) -> None:
        if node.id in NEW_BUILTINS and isinstance(node.ctx, ast.Load):
            self.add(node, f"{node.id} (builtin added in Python {NEW_BUILTINS[node.id]})")
        self.generic_visit(node)

    def visit_BinOp(self, node: ast.BinOp) -> None:
        if isinstance(node.op, ast.BitOr) and _is_typeish(node.left) and _is_typeish(node.right):
            in_annotation = id(node) in self.annotation_nodes
            in_param = id(node) in self.param_annotation_nodes
            if not in_annotation:
                self.add(node, f"`{ast.unparse(node)}` evaluated at run time (PEP 604 union: Python 3.10)")
            elif not self.future_annotations:
                self.add(node, f"annotation `{ast.unparse(node)}` without `from __future__ import annotations` (Python 3.10)")
            elif self.uses_typer and in_param:
                self.add(node, f"parameter annotation `{ast.unparse(node)}` in a typer file: typer evaluates it (Python 3.10)")
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        name = _dotted(node.func) or ""
        short = name.rpartition(".")[2]
        for keyword in node.keywords:
            version = NEW_KEYWORDS.get((short, keyword.arg or ""))
            if version:
                self.add(node, f"{name}({keyword.arg}=...) (keyword added in Python {version})")
        if short in ("isinstance", "issubclass") and len(node.args) == 2 and isinstance(node.args[1], ast.BinOp):
            self.add(node, f"{name}(..., {ast.unparse(node.args[1])}) (union types in isinstance: Python 3.10)")
        if short == "get_type_hints":
            self.add(node, "typing.get_type_hints(): evaluates annotations (PEP 604 / 3.10 names fail on 3.9)")
        if short == "fromisoformat" and node.args and isinstance(node.args[0], ast.Constant) and str(node.args[0].value).endswith("Z"):
            self.add(node, "fromisoformat('...Z') (a 'Z' suffix needs Python 3.11)")
        if name in ("traceback.print_exception", "traceback.format_exception") and len(node.args) == 1 and not node.keywords:
            self.add(node, f"{name}(exc) with one argument (Python 3.10)")
        self.generic_visit(node)

    def visit_Match(self, node: ast.AST) -> None:  # only reached when parsed by 3.10+
        self.add(node, "match statement (Python 3.10)")
        self.generic_visit(node)


def python_files(paths: Iterable[str], root: Path) -> list[Path]:
    files: list[Path] = []
    for item in paths:
        path = (root / item) if not Path(item).is_absolute() else Path(item)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*.py") if "__pycache__" not in p.parts)
        elif path.is_file():
            files.append(path)
    return files


def compile_with(python: str, files: list[Path]) -> list[str]:
    code = ("import sys\nfor p in sys.argv[1:]:\n    try:\n        compile(open(p,'rb').read(), p, 'exec', dont_inherit=True)\n"
            "    except SyntaxError as e:\n        print(f'{p}:{e.lineno}: syntax ({sys.version.split()[0]}): {e.msg}')\n")
    proc = subprocess.run([python, "-I", "-c", code, *map(str, files)], capture_output=True, text=True)
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", default=DEFAULT_PATHS)
    parser.add_argument("--root", type=Path, default=REPO, help="folder the default paths are relative to")
    parser.add_argument("--python", help="a Python 3.9 interpreter: also compile every file with it")
    args = parser.parse_args(argv)
    files = python_files(args.paths, args.root)
    lines: list[str] = []
    if args.python:
        lines += compile_with(args.python, files)
    for path in files:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        except SyntaxError as exc:
            lines.append(f"{path}:{exc.lineno}: syntax: {exc.msg}")
            continue
        scanner = Scanner(path, tree)
        scanner.visit(tree)
        rel = path.relative_to(args.root) if args.root in path.parents else path
        lines += [f"{rel}:{line}: {message}" for line, message in sorted(set(scanner.findings))]
    print("\n".join(lines) if lines else f"nothing found in {len(files)} files")
    return 1 if lines else 0


if __name__ == "__main__":
    sys.exit(main())
