"""The ratio benchmarks, one folder per study (see README.md); shared helpers in ``common``.

A package so that every script imports ``benchmarks.common`` and its study's modules the same
way, whether run as a file from the repository root or imported by the tests.
"""
