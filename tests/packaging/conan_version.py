#!/usr/bin/env python3
"""Checks that conanfile.py takes its version from include/kvcache/version.hpp, without Conan.

    conan_version.py <source dir> <expected version>

The recipe is loaded against a minimal stand-in for the `conan` package, and its set_version()
is run twice: on the real tree (must give the project version) and on a copy whose header says
9.8.7 (must follow it, so no version is written into the recipe itself).
"""
import importlib.util
import os
import re
import shutil
import sys
import tempfile
import types


class _Anything:
    """Stands for any name the recipe imports that this check does not need."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return _Anything()

    def __getattr__(self, name):
        return _Anything()


class _ConanFile:
    recipe_folder = None
    version = None


def _load(_conanfile, path, encoding="utf-8"):
    with open(path, encoding=encoding) as f:
        return f.read()


def _stub_conan():
    class _Module(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return _Anything

    names = ["conan", "conan.errors", "conan.tools", "conan.tools.build", "conan.tools.cmake",
             "conan.tools.files", "conan.tools.layout", "conan.tools.scm"]
    for name in names:
        sys.modules[name] = _Module(name)
    sys.modules["conan"].ConanFile = _ConanFile
    sys.modules["conan.errors"].ConanInvalidConfiguration = type(
        "ConanInvalidConfiguration", (Exception,), {})
    sys.modules["conan.errors"].ConanException = type("ConanException", (Exception,), {})
    sys.modules["conan.tools.files"].load = _load


def _recipe_version(folder):
    spec = importlib.util.spec_from_file_location(
        "kvcache_conanfile_%d" % id(folder), os.path.join(folder, "conanfile.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    recipes = [c for c in vars(module).values()
               if isinstance(c, type) and issubclass(c, _ConanFile) and c is not _ConanFile]
    if len(recipes) != 1:
        sys.exit("conanfile.py: expected one ConanFile subclass, found %d" % len(recipes))
    recipe = recipes[0]
    if recipe.__dict__.get("version") is not None:
        sys.exit("conanfile.py sets `version = ...`: it must come from version.hpp")
    if not hasattr(recipe, "set_version"):
        sys.exit("conanfile.py has no set_version(): the version must come from version.hpp")
    instance = recipe()
    instance.recipe_folder = folder
    instance.set_version()
    return instance.version


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    source, expected = sys.argv[1], sys.argv[2]
    _stub_conan()

    got = _recipe_version(source)
    if got != expected:
        sys.exit("conanfile.py gives version %r, the project is %s" % (got, expected))

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(os.path.join(source, "conanfile.py"), tmp)
        header = os.path.join("include", "kvcache", "version.hpp")
        os.makedirs(os.path.join(tmp, "include", "kvcache"))
        with open(os.path.join(source, header), encoding="utf-8") as f:
            text = f.read()
        for part, number in (("MAJOR", 9), ("MINOR", 8), ("PATCH", 7)):
            text, n = re.subn(r"^(#define KVCACHE_VERSION_%s +)[0-9]+" % part,
                              r"\g<1>%d" % number, text, flags=re.MULTILINE)
            if n != 1:
                sys.exit("version.hpp: no single KVCACHE_VERSION_%s line" % part)
        with open(os.path.join(tmp, header), "w", encoding="utf-8") as f:
            f.write(text)
        moved = _recipe_version(tmp)
        if moved != "9.8.7":
            sys.exit("conanfile.py ignored a version.hpp that says 9.8.7 (gave %r)" % moved)

    print("conanfile.py: version %s, read from include/kvcache/version.hpp" % got)


if __name__ == "__main__":
    main()
