"""Shared plumbing of the SlicerContrastAmplifier modules: no science here.

Atomic writes (:mod:`.atomicfile`), output-path checks (:mod:`.outputs`), progress and cancel
(:mod:`.progress`), child processes (:mod:`.process`), first-use pip installs
(:mod:`.dependencies`), the console-script error path (:mod:`.cliapp`) and the one place that
decides "inside Slicer or headless" (:mod:`.slicer_compat`). The three modules' Libs import it;
it imports none of them.
"""
