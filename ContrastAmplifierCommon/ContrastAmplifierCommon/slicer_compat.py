"""The one place that decides "inside the Slicer application or headless".

Module files derive their classes from the names exported here: inside Slicer they are the real
``slicer.ScriptedLoadableModule`` classes; under the ``slicer-core`` wheel (tests, plain Python,
batch scripts without Qt) they are stand-ins, so the Logic classes - which hold no Qt code - run
headless against real MRML nodes. :data:`IN_SLICER_APP` tells which.
"""

from __future__ import annotations

import unittest

__all__ = [
    "IN_SLICER_APP",
    "ScriptedLoadableModule",
    "ScriptedLoadableModuleLogic",
    "ScriptedLoadableModuleTest",
    "ScriptedLoadableModuleWidget",
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

    ScriptedLoadableModuleTest = unittest.TestCase
