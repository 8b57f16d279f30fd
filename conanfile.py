# Conan 2 recipe for kvcache (header-only). From a checkout:  conan create .
# The package is made by kvcache's own CMake install, so it ships the same kvcache-config.cmake
# (find_package(kvcache) -> kvcache::kvcache) and kvcache.pc as any other install.
import os
import re

from conan import ConanFile
from conan.errors import ConanInvalidConfiguration
from conan.tools.build import check_min_cppstd
from conan.tools.cmake import CMake, CMakeToolchain, cmake_layout
from conan.tools.files import load

required_conan_version = ">=2.0"


class KvcacheConan(ConanFile):
    name = "kvcache"
    package_type = "header-library"
    description = "Header-only KV-cache building blocks for LLM inference (CUDA optional)"
    license = "Apache-2.0"
    topics = ("llm", "inference", "kv-cache", "header-only", "cuda")
    # Settings are needed to run CMake in package(); package_id() drops them from the id.
    settings = "os", "arch", "compiler", "build_type"
    exports_sources = "CMakeLists.txt", "LICENSE", "cmake/*", "include/*"
    no_copy_source = True

    def set_version(self):
        # The one version source: include/kvcache/version.hpp (CMake parses the same lines).
        text = load(self, os.path.join(self.recipe_folder, "include", "kvcache", "version.hpp"))
        parts = []
        for part in ("MAJOR", "MINOR", "PATCH"):
            m = re.search(rf"^#define KVCACHE_VERSION_{part} +([0-9]+)", text, re.MULTILINE)
            if not m:
                raise ConanInvalidConfiguration(
                    f"kvcache: cannot parse KVCACHE_VERSION_{part} from include/kvcache/version.hpp")
            parts.append(m.group(1))
        self.version = ".".join(parts)

    def layout(self):
        cmake_layout(self)

    def package_id(self):
        self.info.clear()  # header-only: one package for every configuration

    def validate(self):
        if self.settings.get_safe("compiler.cppstd"):
            check_min_cppstd(self, 20)

    def generate(self):
        tc = CMakeToolchain(self)
        tc.cache_variables["KVCACHE_BUILD_TESTS"] = False
        tc.cache_variables["KVCACHE_BUILD_BENCHMARKS"] = False
        tc.cache_variables["KVCACHE_BUILD_EXAMPLES"] = False
        tc.cache_variables["KVCACHE_CUDA"] = "OFF"
        # Same package whatever the machine: never export kvcache::cuda (the .cuh headers are
        # still shipped; CUDA users link CUDA::cudart themselves).
        tc.cache_variables["CMAKE_DISABLE_FIND_PACKAGE_CUDAToolkit"] = True
        tc.generate()

    def build(self):
        pass  # nothing to compile

    def package(self):
        cmake = CMake(self)
        cmake.configure()
        cmake.install()

    def package_info(self):
        self.cpp_info.bindirs = []
        self.cpp_info.libdirs = []
        # CMake consumers load the kvcache-config.cmake we installed (CMakeDeps generates none);
        # the other generators (PkgConfigDeps, MSBuildDeps, ...) use the fields below.
        self.cpp_info.set_property("cmake_find_mode", "none")
        self.cpp_info.builddirs.append(os.path.join("share", "cmake", "kvcache"))
        self.cpp_info.set_property("pkg_config_name", "kvcache")
        if self.settings.os in ("Linux", "FreeBSD"):
            self.cpp_info.system_libs.append("pthread")
