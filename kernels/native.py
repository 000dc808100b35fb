"""Placeholder: loader of the optional native CPU ops (kernels/csrc, built by CMakeLists.txt)."""


def available() -> bool:
    return False
