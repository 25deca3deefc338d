"""Lay out the extension's files the way 3D Slicer's install step does, from the CMakeLists.txt files alone.

Reads the top-level CMakeLists.txt, follows its ``add_subdirectory()`` calls and, for every
``slicerMacroBuildScriptedModule(NAME .. SCRIPTS .. RESOURCES .. [WITH_SUBDIR] [WITH_GENERIC_TESTS])``,
copies exactly the listed SCRIPTS and RESOURCES into ``<dest>/lib/Slicer-<X.Y>/qt-scripted-modules/``,
as Slicer 5.6/5.8 do (see SLICER_SOURCES.md):

* ``CMake/SlicerMacroBuildScriptedModule.cmake`` calls CTK's ``ctkMacroCompilePythonScript`` with
  ``DESTINATION_DIR <build>/lib/Slicer-X.Y/qt-scripted-modules[/<module source folder name> if WITH_SUBDIR]``
  and ``INSTALL_DIR lib/Slicer-X.Y/qt-scripted-modules``;
* ``ctkMacroCompilePythonScript`` copies each SCRIPTS entry (``.py`` appended when its extension does
  not match ``py``) and each RESOURCES entry to ``DESTINATION_DIR/<path as written>``, byte-compiles
  the scripts, and installs the whole DESTINATION_DIR (its content without WITH_SUBDIR, the
  folder itself with it).

Nothing else is copied: a file the lists do not name is not in a real install either. The
byte-compiled ``.pyc`` files are not written (Python never uses a legacy ``.pyc`` next to its ``.py``).

Plain ``install(FILES|DIRECTORY ... DESTINATION ...)`` calls are applied too (relative to the
extension's install prefix, with Slicer's ``Slicer_INSTALL_*`` / ``Slicer_*_DIR`` variables
defined), as is ``file(GLOB|GLOB_RECURSE ...)``. A SCRIPTS/RESOURCES entry whose path leaves
qt-scripted-modules (``../x``) is copied in Slicer's build tree but not installed: it is left out.

The CMake reader understands what this project's files use: commands, quoted and unquoted
arguments, ``#`` comments, ``${VAR}`` references, ``set()``, ``add_subdirectory()``, ``install()``,
``file(GLOB)`` and the macro call. ``if()`` blocks are not evaluated: every command is applied in
file order. Anything it cannot follow is an error, never silently skipped.

Usage::

    python Testing/InstalledExtension/build_installed_tree.py DEST [--slicer-version 5.8] [--list] [--not-installed]
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import re
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[2]
SCRIPTED_MODULES_SUBDIR = "qt-scripted-modules"
MACRO = "slicermacrobuildscriptedmodule"
MACRO_OPTIONS = ("WITH_GENERIC_TESTS", "WITH_SUBDIR", "VERBOSE")
MACRO_ONE_VALUE = ("NAME",)
MACRO_MULTI_VALUE = ("SCRIPTS", "RESOURCES")


class CMakeListsError(ValueError):
    """A CMakeLists.txt this reader cannot follow, or one Slicer's configure step would reject."""


@dataclass
class ScriptedModule:
    """One ``slicerMacroBuildScriptedModule()`` call, its arguments expanded."""

    name: str
    source_dir: Path
    scripts: list[str]
    resources: list[str]
    with_subdir: bool = False
    with_generic_tests: bool = False
    cmakelists: Optional[Path] = None


@dataclass
class InstallRule:
    """One ``install(FILES|DIRECTORY ...)`` call, arguments expanded."""

    kind: str  # "FILES" or "DIRECTORY"
    sources: list[str]
    destination: str
    source_dir: Path
    patterns: list[tuple[str, bool]] = field(default_factory=list)  # (glob pattern, exclude)
    files_matching: bool = False
    cmakelists: Optional[Path] = None


@dataclass
class InstalledFile:
    source: Path
    relative: str  # path under qt-scripted-modules/
    module: str
    kind: str  # "script" or "resource"


@dataclass
class InstalledTree:
    root: Path  # <dest>
    scripted_modules_dir: Path  # <dest>/lib/Slicer-X.Y/qt-scripted-modules
    modules: list[ScriptedModule]
    files: list[InstalledFile] = field(default_factory=list)
    #: install() calls that put files elsewhere than qt-scripted-modules: path relative to ``root``.
    other_files: list[tuple[Path, str]] = field(default_factory=list)
    #: listed files that are copied in the build tree but not installed (path leaves qt-scripted-modules).
    left_out: list[str] = field(default_factory=list)

    def relative_paths(self) -> list[str]:
        return sorted(f.relative for f in self.files)


# -- a small CMake reader ---------------------------------------------------------------------

_TOKEN = re.compile(r'"(?:\\.|[^"\\])*"|\(|\)|[^\s()"#]+|#[^\n]*|\s+')


def parse_commands(text: str, path: Path = Path("CMakeLists.txt")) -> list[tuple[str, list[tuple[str, bool]]]]:
    """``[(command_name_lowercase, [(argument, quoted), ...]), ...]`` in file order."""
    commands = []
    position = 0
    name: Optional[str] = None
    args: list[tuple[str, bool]] = []
    depth = 0
    for match in _TOKEN.finditer(text):
        if match.start() != position:
            raise CMakeListsError(f"{path}: cannot read {text[position:match.start()]!r}")
        position = match.end()
        token = match.group(0)
        if token.isspace() or token.startswith("#"):
            if token.startswith("#[["):
                raise CMakeListsError(f"{path}: bracket comments are not supported")
            continue
        if name is None:
            if token in "()":
                raise CMakeListsError(f"{path}: unexpected {token!r}")
            name, args, depth = token.lower(), [], 0
            continue
        if token == "(":
            depth += 1
            if depth > 1:
                args.append((token, False))
            continue
        if token == ")":
            depth -= 1
            if depth == 0:
                commands.append((name, args))
                name = None
            else:
                args.append((token, False))
            continue
        if depth == 0:
            raise CMakeListsError(f"{path}: {name} is not followed by '('")
        if token.startswith('"'):
            args.append((token[1:-1].replace('\\"', '"'), True))
        else:
            args.append((token, False))
    if position != len(text):
        raise CMakeListsError(f"{path}: cannot read {text[position:]!r}")
    if name is not None:
        raise CMakeListsError(f"{path}: unterminated call to {name}()")
    return commands


def _expand(value: str, variables: dict[str, list[str]]) -> str:
    pattern = re.compile(r"\$\{(\w+)\}")
    while pattern.search(value):  # innermost first, as CMake does for ${${X}}
        value = pattern.sub(lambda m: ";".join(variables.get(m.group(1), [])), value)
    return value


def _arguments(raw: Sequence[tuple[str, bool]], variables: dict[str, list[str]]) -> list[str]:
    out: list[str] = []
    for value, quoted in raw:
        expanded = _expand(value, variables)
        if quoted:
            out.append(expanded)
        else:
            out.extend(item for item in expanded.split(";") if item != "")
    return out


def _macro_arguments(args: list[str], where: str) -> dict[str, object]:
    parsed: dict[str, object] = {key: False for key in MACRO_OPTIONS}
    parsed.update({key: [] for key in MACRO_MULTI_VALUE})
    current: Optional[str] = None
    unparsed = []
    for arg in args:
        if arg in MACRO_OPTIONS:
            parsed[arg], current = True, None
        elif arg in MACRO_ONE_VALUE or arg in MACRO_MULTI_VALUE:
            current = arg
        elif current in MACRO_ONE_VALUE:
            parsed[current], current = arg, None
        elif current in MACRO_MULTI_VALUE:
            parsed[current].append(arg)  # type: ignore[union-attr]
        else:
            unparsed.append(arg)
    if unparsed:
        raise CMakeListsError(f"{where}: Unknown keywords given to slicerMacroBuildScriptedModule(): {unparsed}")
    if "NAME" not in parsed:
        raise CMakeListsError(f"{where}: NAME is mandatory")
    return parsed


def slicer_variables(slicer_version: str) -> dict[str, list[str]]:
    """The Slicer directory variables an extension's CMakeLists.txt sees (CMake/SlicerDirectories.cmake, Linux)."""
    major, minor = slicer_version.split(".")[:2]
    lib = f"lib/Slicer-{major}.{minor}"
    relative = {
        "Slicer_BIN_DIR": "bin", "Slicer_LIB_DIR": lib, "Slicer_SHARE_DIR": f"share/Slicer-{major}.{minor}",
        "Slicer_QTSCRIPTEDMODULES_LIB_DIR": f"{lib}/{SCRIPTED_MODULES_SUBDIR}",
        "Slicer_QTLOADABLEMODULES_LIB_DIR": f"{lib}/qt-loadable-modules",
        "Slicer_CLIMODULES_LIB_DIR": f"{lib}/cli-modules",
    }
    variables = {"Slicer_VERSION_MAJOR": [major], "Slicer_VERSION_MINOR": [minor], "Slicer_INSTALL_ROOT": ["./"],
                 "Slicer_QTSCRIPTEDMODULES_SUBDIR": [SCRIPTED_MODULES_SUBDIR]}
    for name, value in relative.items():
        variables[name] = [value]
        variables[name.replace("Slicer_", "Slicer_INSTALL_", 1)] = [f"./{value}"]
    return variables


def _install_rule(args: list[str], directory: Path, where: Path) -> InstallRule:
    kind = args[0] if args else ""
    if kind not in ("FILES", "PROGRAMS", "DIRECTORY"):
        raise CMakeListsError(f"{where}: install({kind} ...) is not supported (FILES, PROGRAMS, DIRECTORY are)")
    rule = InstallRule("DIRECTORY" if kind == "DIRECTORY" else "FILES", [], "", directory, cmakelists=where)
    i, current = 1, "sources"
    while i < len(args):
        arg = args[i]
        if arg == "DESTINATION":
            rule.destination, i = args[i + 1], i + 2
            current = ""
            continue
        if arg in ("COMPONENT", "PERMISSIONS", "FILE_PERMISSIONS", "DIRECTORY_PERMISSIONS", "CONFIGURATIONS", "RENAME"):
            if arg == "RENAME":
                raise CMakeListsError(f"{where}: install(... RENAME) is not supported")
            current, i = "skip", i + 1
            continue
        if arg in ("USE_SOURCE_PERMISSIONS", "OPTIONAL", "MESSAGE_NEVER", "EXCLUDE_FROM_ALL"):
            i += 1
            continue
        if arg == "FILES_MATCHING":
            rule.files_matching, i = True, i + 1
            continue
        if arg in ("PATTERN", "REGEX"):
            if arg == "REGEX":
                raise CMakeListsError(f"{where}: install(DIRECTORY ... REGEX) is not supported (PATTERN is)")
            pattern, i = args[i + 1], i + 2
            exclude = i < len(args) and args[i] == "EXCLUDE"
            i += 1 if exclude else 0
            rule.patterns.append((pattern, exclude))
            current = "skip"
            continue
        if current == "sources":
            rule.sources.append(arg)
        elif current != "skip":
            raise CMakeListsError(f"{where}: cannot read install() argument {arg!r}")
        i += 1
    if not rule.destination:
        raise CMakeListsError(f"{where}: install() without DESTINATION")
    return rule


def _file_glob(args: list[str], directory: Path, where: Path) -> tuple[str, list[str]]:
    mode, var, rest = args[0], args[1], args[2:]
    relative_to: Optional[Path] = None
    if rest[:1] == ["RELATIVE"]:
        relative_to, rest = Path(rest[1]), rest[2:]
    if rest[:1] in (["LIST_DIRECTORIES"], ["CONFIGURE_DEPENDS"]):
        raise CMakeListsError(f"{where}: file({mode} ... {rest[0]}) is not supported")
    found = set()
    for pattern in rest:
        base = Path(pattern) if Path(pattern).is_absolute() else directory / pattern
        matches = base.parent.rglob(base.name) if mode == "GLOB_RECURSE" else base.parent.glob(base.name)
        found.update(p for p in matches if p.is_file())
    paths = sorted(found)
    return var, [(p.relative_to(relative_to).as_posix() if relative_to else str(p)) for p in paths]


def read_project(source_root: Path = REPO, slicer_version: str = "5.8",
                 install_rules: Optional[list[InstallRule]] = None) -> list[ScriptedModule]:
    """Every scripted module the project's CMakeLists.txt files declare, in configure order
    (``install()`` calls are appended to ``install_rules`` when given)."""
    modules: list[ScriptedModule] = []
    rules = install_rules if install_rules is not None else []

    def visit(directory: Path, inherited: dict[str, list[str]]) -> None:
        cmakelists = directory / "CMakeLists.txt"
        if not cmakelists.is_file():
            raise CMakeListsError(f"add_subdirectory: {cmakelists} does not exist")
        variables = dict(inherited)  # a subdirectory gets a copy of its parent's scope
        variables["CMAKE_CURRENT_SOURCE_DIR"] = [str(directory)]
        for name, raw in parse_commands(cmakelists.read_text(encoding="utf-8"), cmakelists):
            args = _arguments(raw, variables)
            if name == "set" and args:
                if "PARENT_SCOPE" in args or "CACHE" in args:
                    raise CMakeListsError(f"{cmakelists}: set({args[0]} ... PARENT_SCOPE/CACHE) is not supported")
                variables[args[0]] = args[1:]
            elif name == "unset" and args:
                variables.pop(args[0], None)
            elif name == "add_subdirectory":
                visit((directory / args[0]).resolve(), variables)
            elif name == "install":
                rules.append(_install_rule(args, directory, cmakelists))
            elif name == "file" and args and args[0] in ("GLOB", "GLOB_RECURSE"):
                var, values = _file_glob(args, directory, cmakelists)
                variables[var] = values
            elif name == "file" or name in ("configure_file", "add_custom_command", "add_custom_target"):
                raise CMakeListsError(f"{cmakelists}: {name}({' '.join(args[:2])} ...) is not supported by this reader")
            elif name == MACRO:
                parsed = _macro_arguments(args, str(cmakelists))
                modules.append(ScriptedModule(
                    name=str(parsed["NAME"]), source_dir=directory,
                    scripts=list(parsed["SCRIPTS"]), resources=list(parsed["RESOURCES"]),  # type: ignore[call-overload]
                    with_subdir=bool(parsed["WITH_SUBDIR"]), with_generic_tests=bool(parsed["WITH_GENERIC_TESTS"]),
                    cmakelists=cmakelists,
                ))

    top = {"CMAKE_SOURCE_DIR": [str(Path(source_root).resolve())], **slicer_variables(slicer_version)}
    visit(Path(source_root).resolve(), top)
    return modules


# -- the install layout ----------------------------------------------------------------------


def _check_exists(module: ScriptedModule) -> None:
    """What slicerMacroBuildScriptedModule's sanity check does (a FATAL_ERROR at configure time)."""
    for var, values in (("SCRIPTS", module.scripts), ("RESOURCES", module.resources)):
        for value in values:
            path = Path(value) if Path(value).is_absolute() else module.source_dir / value
            if not path.exists() and not Path(str(path) + ".py").exists():
                raise CMakeListsError(
                    f"{module.cmakelists}: slicerMacroBuildScriptedModule({var}) given nonexistent file or directory '{value}'")


def planned_files(module: ScriptedModule) -> list[InstalledFile]:
    """The files ``module`` installs, relative to qt-scripted-modules/ (ctkMacroCompilePythonScript's copy rules)."""
    _check_exists(module)
    subdir = module.source_dir.name + "/" if module.with_subdir else ""
    files = []
    for script in module.scripts:
        if Path(script).is_absolute():
            raise CMakeListsError(f"{module.cmakelists}: absolute SCRIPTS paths are not supported: {script}")
        extension = "".join(Path(script).suffixes) if "." in Path(script).name else ""
        if not re.search("py", extension):  # if(NOT "${file_ext}" MATCHES "py")
            script += ".py"
        files.append(InstalledFile(module.source_dir / script, subdir + script, module.name, "script"))
    for resource in module.resources:
        if Path(resource).is_absolute():
            raise CMakeListsError(f"{module.cmakelists}: absolute RESOURCES paths are not supported: {resource}")
        files.append(InstalledFile(module.source_dir / resource, subdir + resource, module.name, "resource"))
    return files


def build_installed_tree(dest: Path, slicer_version: str = "5.8", source_root: Path = REPO) -> InstalledTree:
    """Copy the installed files of every scripted module into ``dest/lib/Slicer-<version>/qt-scripted-modules``.

    Raises:
        CMakeListsError: a listed file is missing, two modules install different files at the
            same path, or the CMake files use something this reader does not follow.
    """
    dest = Path(dest)
    target = dest / "lib" / f"Slicer-{slicer_version}" / SCRIPTED_MODULES_SUBDIR
    rules: list[InstallRule] = []
    modules = read_project(source_root, slicer_version, rules)
    tree = InstalledTree(dest, target, modules)
    owners: dict[str, InstalledFile] = {}
    for module in modules:
        for item in planned_files(module):
            normalized = os.path.normpath(item.relative)
            if normalized.startswith(".."):  # copied next to qt-scripted-modules in the build tree, not installed
                tree.left_out.append(f"{module.name}: {item.relative}")
                continue
            item.relative = Path(normalized).as_posix()
            if item.source.is_dir():
                raise CMakeListsError(f"{module.cmakelists}: {item.relative} is a folder (ctk copies files only)")
            previous = owners.get(item.relative)
            if previous is not None and previous.source.read_bytes() != item.source.read_bytes():
                raise CMakeListsError(f"{item.relative} is installed by both {previous.module} and {item.module} "
                                      "with different content (the modules share one qt-scripted-modules folder)")
            owners[item.relative] = item
            out = target / item.relative
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(item.source, out)
            tree.files.append(item)
    for rule in rules:
        _apply_install_rule(rule, tree)
    return tree


def _rule_files(rule: InstallRule) -> list[tuple[Path, str]]:
    """``(source file, path relative to DESTINATION)`` for one install() rule."""
    out: list[tuple[Path, str]] = []
    for source in rule.sources:
        path = Path(source) if Path(source).is_absolute() else rule.source_dir / source
        if rule.kind == "FILES":
            if not path.is_file():
                raise CMakeListsError(f"{rule.cmakelists}: install FILES given no file {source!r}")
            out.append((path, path.name))
            continue
        if not path.is_dir():
            raise CMakeListsError(f"{rule.cmakelists}: install DIRECTORY given no directory {source!r}")
        prefix = "" if source.endswith("/") else path.name + "/"
        for item in sorted(p for p in path.rglob("*") if p.is_file()):
            relative = item.relative_to(path).as_posix()
            matched = [exclude for pattern, exclude in rule.patterns
                       if any(fnmatch.fnmatch(part, pattern) for part in Path(relative).parts)]
            if any(matched) or (rule.files_matching and not matched):
                continue
            out.append((item, prefix + relative))
    return out


def _apply_install_rule(rule: InstallRule, tree: InstalledTree) -> None:
    destination = Path(os.path.normpath(rule.destination))
    if destination.is_absolute() or str(destination).startswith(".."):
        raise CMakeListsError(f"{rule.cmakelists}: install DESTINATION {rule.destination!r} is outside the install prefix")
    for source, relative in _rule_files(rule):
        out = tree.root / destination / relative
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, out)
        inside = out.resolve().is_relative_to(tree.scripted_modules_dir.resolve())
        if inside:
            tree.files.append(InstalledFile(source, out.relative_to(tree.scripted_modules_dir).as_posix(), "install()", "install"))
        else:
            tree.other_files.append((source, out.relative_to(tree.root).as_posix()))


def not_installed(tree: InstalledTree, source_root: Path = REPO) -> list[str]:
    """Files of the module folders and of the top-level ``Resources/`` that the install leaves out
    (CMakeLists.txt files, caches and byte code excluded), relative to ``source_root``."""
    source_root = Path(source_root).resolve()
    installed = {f.source.resolve() for f in tree.files} | {source.resolve() for source, _ in tree.other_files}
    folders = sorted({m.source_dir for m in tree.modules} | {source_root / "Resources"})
    left_out = []
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*")):
            if (not path.is_file() or path.name == "CMakeLists.txt" or "__pycache__" in path.parts
                    or path.suffix in (".pyc", ".pyo")):
                continue
            if path.resolve() not in installed:
                left_out.append(path.relative_to(source_root).as_posix())
    return left_out


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=Path, help="install prefix (gets lib/Slicer-X.Y/qt-scripted-modules/)")
    parser.add_argument("--slicer-version", default="5.8", help="X.Y of lib/Slicer-X.Y (default 5.8)")
    parser.add_argument("--source", type=Path, default=REPO, help="extension source folder (default: this repository)")
    parser.add_argument("--list", action="store_true", help="print every installed path")
    parser.add_argument("--not-installed", action="store_true", help="print the source files the install leaves out")
    args = parser.parse_args(argv)
    try:
        tree = build_installed_tree(args.dest, args.slicer_version, args.source)
    except CMakeListsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{len(tree.files)} files from {len(tree.modules)} modules -> {tree.scripted_modules_dir}")
    if args.list:
        for path in tree.relative_paths():
            print(f"  {path}")
        for _, path in tree.other_files:
            print(f"  (outside qt-scripted-modules) {path}")
    for entry in tree.left_out:
        print(f"left out (path leaves qt-scripted-modules, so only the build tree gets it): {entry}")
    if args.not_installed:
        missing = not_installed(tree, args.source)
        print(f"{len(missing)} source files not installed:")
        for path in missing:
            print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
