"""Optional integrations with other tools; each module imports its tool lazily and is never a hard dependency.

- :mod:`fuse.integrations.lmms_eval`: a ``visionfuse`` model for lmms-eval (real benchmarks where data exist).
"""
