"""The one place that decides "inside the Slicer application or headless".

Module files derive their classes from the names exported here: inside Slicer they are the real
``slicer.ScriptedLoadableModule`` classes; under the ``slicer-core`` wheel (tests, plain Python,
batch scripts without Qt) they are stand-ins, so the Logic classes - which hold no Qt code - run
headless against real MRML nodes. :data:`IN_SLICER_APP` tells which.
"""

from __future__ import annotations

import pathlib
import typing
import unittest
from typing import Any

__all__ = [
    "IN_SLICER_APP",
    "HAS_PARAMETER_NODE_WRAPPER",
    "Choice",
    "Default",
    "ScriptedLoadableModule",
    "ScriptedLoadableModuleLogic",
    "ScriptedLoadableModuleTest",
    "ScriptedLoadableModuleWidget",
    "WithinRange",
    "parameterNodeWrapper",
    "tr",
]

try:  # inside the Slicer application (Qt and the scripted-module machinery are there)
    from slicer.ScriptedLoadableModule import (
        ScriptedLoadableModule,
        ScriptedLoadableModuleLogic,
        ScriptedLoadableModuleTest,
        ScriptedLoadableModuleWidget,
    )

    IN_SLICER_APP = True
except ImportError:  # headless: the Logic works, the GUI classes are inert
    IN_SLICER_APP = False

    # The stand-ins take the names of the classes imported above (hence mypy's no-redef ignores).
    class ScriptedLoadableModule:  # type: ignore[no-redef]
        """Stand-in for ``ScriptedLoadableModule`` outside Slicer: keeps ``parent``, shows nothing."""

        def __init__(self, parent: object = None) -> None:
            self.parent = parent

    class ScriptedLoadableModuleWidget:  # type: ignore[no-redef]
        """Stand-in for ``ScriptedLoadableModuleWidget`` outside Slicer (the GUI is never built there)."""

        def __init__(self, parent: object = None) -> None:
            self.parent = parent

    class ScriptedLoadableModuleLogic:  # type: ignore[no-redef]
        """Stand-in for ``ScriptedLoadableModuleLogic`` outside Slicer.

        Mirrors the real class's parameter-node behaviour: one singleton
        ``vtkMRMLScriptedModuleNode`` per module in ``slicer.mrmlScene``.
        """

        def __init__(self, parent: object = None) -> None:
            self.parent = parent
            self.moduleName = self.__class__.__name__
            if self.moduleName.endswith("Logic"):
                self.moduleName = self.moduleName[: -len("Logic")]
            self.isSingletonParameterNode = True

        def getParameterNode(self):  # -> slicer.vtkMRMLScriptedModuleNode
            """Return this module's parameter node in ``slicer.mrmlScene``, creating it if needed."""
            import slicer

            scene = getattr(slicer, "mrmlScene", None)
            if scene is None:
                raise RuntimeError("No MRML scene: outside the Slicer application set slicer.mrmlScene first.")
            node = scene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
            if node is None:
                node = scene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
                node.UnRegister(None)
                node.SetSingletonTag(self.moduleName)
                node.SetAttribute("ModuleName", self.moduleName)
                node.SetName(scene.GenerateUniqueName(self.moduleName))
                node = scene.AddNode(node)
            return node

    class ScriptedLoadableModuleTest(unittest.TestCase):  # type: ignore[no-redef]
        """Stand-in for ``ScriptedLoadableModuleTest`` outside Slicer: a ``unittest.TestCase`` with
        the helpers Slicer's class adds (``delayDisplay`` logs instead of showing a message box,
        ``takeScreenshot`` does nothing: there is no view), so a module's self-test runs headless."""

        def delayDisplay(self, message: str, requestedDelay: Any = None, msec: Any = None) -> None:
            import logging

            logging.info(message)

        def takeScreenshot(self, name: str, description: str, type: int = -1) -> None:
            pass


# -- Typed parameter nodes ------------------------------------------------------------------------
# Inside Slicer (5.3+) ``slicer.parameterNodeWrapper`` binds every annotated field of a parameter
# class to the module's vtkMRMLScriptedModuleNode and, through ``connectGui``, to the .ui widget
# whose ``SlicerParameterName`` property names it. The slicer-core wheel does not ship it (it
# imports Qt), so headless runs get the stand-in below: same decorator, same annotations, same
# storage in the node as Slicer's serializers (Base/Python/slicer/parameterNodeWrapper/
# serializers.py: ``str(value)`` for numbers, strings and paths, "True"/"False" for bools, a node
# reference for MRML nodes), and no GUI binding.

try:
    from slicer.parameterNodeWrapper import Choice, Default, WithinRange, parameterNodeWrapper

    HAS_PARAMETER_NODE_WRAPPER = True
except ImportError:
    HAS_PARAMETER_NODE_WRAPPER = False

    class WithinRange:  # type: ignore[no-redef]
        """Validator: ``minimum <= value <= maximum`` (Slicer's message)."""

        def __init__(self, minimum: float, maximum: float) -> None:
            self.minimum, self.maximum = minimum, maximum

        def validate(self, value: Any) -> None:
            if not self.minimum <= value <= self.maximum:
                raise ValueError(f"Value must be within range [{self.minimum}, {self.maximum}], is {value}")

    class Choice:  # type: ignore[no-redef]
        """Validator: the value is one of ``choices``."""

        def __init__(self, choices: Any) -> None:
            self.choices = tuple(choices)

        def validate(self, value: Any) -> None:
            if value not in self.choices:
                raise ValueError(f"Value is {value}, but must be in one of the following: {self.choices}")

    class Default:  # type: ignore[no-redef]
        """Annotation giving a field's default value."""

        def __init__(self, value: Any) -> None:
            self.value = value

    def _is_node_type(kind: Any) -> bool:
        import slicer

        return isinstance(kind, type) and issubclass(kind, slicer.vtkMRMLNode)

    def _field(name: str, kind: Any, validators: list, default: Any) -> property:
        def read(self: Any) -> Any:
            node = self.parameterNode
            if _is_node_type(kind):
                return node.GetNodeReference(name)
            text = node.GetParameter(name)
            if kind is bool:
                return text == "True"
            if kind in (int, float, str) or (isinstance(kind, type) and issubclass(kind, pathlib.PurePath)):
                return kind(text)
            raise TypeError(f"parameter {name!r}: type {kind!r} has no headless serializer")

        def write(self: Any, value: Any) -> None:
            for validator in validators:
                validator.validate(value)
            node = self.parameterNode
            if _is_node_type(kind):
                node.SetParameter(name, "")
                node.SetNodeReferenceID(name, value.GetID() if value is not None else None)
            elif kind is bool:
                node.SetParameter(name, "True" if value else "False")
            else:
                node.SetParameter(name, str(value))

        return property(read, write, doc=f"{name}: {kind!r} (default {default!r})")

    def _implicit_default(kind: Any) -> Any:
        if kind is bool:
            return False
        if kind in (int, float):
            return kind(0)
        if kind is str:
            return ""
        if isinstance(kind, type) and issubclass(kind, pathlib.PurePath):
            return kind()
        return None

    def parameterNodeWrapper(classtype: Any = None) -> Any:  # noqa: N802 (Slicer's name)
        """Headless ``@parameterNodeWrapper``: typed access to a ``vtkMRMLScriptedModuleNode``."""

        def wrap(cls: Any) -> Any:
            hints = typing.get_type_hints(cls, include_extras=True)
            fields = {}
            for name, hint in hints.items():
                kind, extras = hint, []
                if typing.get_origin(hint) is typing.Annotated:
                    kind, *extras = typing.get_args(hint)
                default = getattr(cls, name, None) if name in vars(cls) else None
                for extra in extras:
                    if isinstance(extra, Default):
                        default = extra.value
                if name not in vars(cls) and not any(isinstance(e, Default) for e in extras):
                    default = _implicit_default(kind)
                validators = [e for e in extras if hasattr(e, "validate")]
                fields[name] = (kind, default)
                setattr(cls, name, _field(name, kind, validators, default))

            def __init__(self: Any, parameterNode: Any) -> None:  # noqa: N803 (Slicer's name)
                self.parameterNode = parameterNode
                for name, (kind, default) in fields.items():
                    if not parameterNode.HasParameter(name) and not (_is_node_type(kind) and parameterNode.GetNodeReference(name)):
                        setattr(self, name, default)

            def connectGui(self: Any, gui: Any) -> Any:  # noqa: N802
                raise RuntimeError("connectGui needs the Slicer application (Qt widgets)")

            cls.__init__ = __init__
            cls.connectGui = connectGui
            cls.allParameters = dict(fields)
            return cls

        return wrap(classtype) if classtype is not None else wrap


# -- Translatable strings: module files do ``from ContrastAmplifierCommon.slicer_compat import tr as _``.
# Slicer's ``tr`` takes its translation context from the caller's file, so it is re-exported as is.
try:
    from slicer.i18n import tr
except ImportError:  # slicer-core has no translations: the text itself

    def tr(text: str) -> str:
        """The text untranslated (outside the Slicer application)."""
        return text
