"""The small foundation both wings stand on: safe output files and one-line command-line errors.

``mmil`` and ``prunelimit`` both import from here, so neither needs the other for plumbing.
"""
