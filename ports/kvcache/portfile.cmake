# Overlay port for kvcache (header-only). From a checkout:
#   vcpkg install kvcache --overlay-ports=<checkout>/ports
# It builds the checkout this port sits in. A registry port fetches a release instead; replace
# the SOURCE_PATH line below with:
#   vcpkg_from_github(
#     OUT_SOURCE_PATH SOURCE_PATH
#     REPO <owner>/kvcache
#     REF "v${VERSION}"
#     SHA512 <sha512 of the release archive>
#     HEAD_REF main)
# (and keep ports/kvcache/vcpkg.json's "version" equal to include/kvcache/version.hpp; the
# kvcache tests check that).
get_filename_component(SOURCE_PATH "${CMAKE_CURRENT_LIST_DIR}/../.." ABSOLUTE)

# Header-only: one configuration is enough, and there is nothing to put under debug/.
set(VCPKG_BUILD_TYPE release)

# Without the cuda feature kvcache::cuda is never exported, whatever the machine has installed.
vcpkg_check_features(OUT_FEATURE_OPTIONS FEATURE_OPTIONS
  INVERTED_FEATURES
    cuda CMAKE_DISABLE_FIND_PACKAGE_CUDAToolkit)

vcpkg_cmake_configure(
  SOURCE_PATH "${SOURCE_PATH}"
  OPTIONS
    ${FEATURE_OPTIONS}
    -DKVCACHE_BUILD_TESTS=OFF
    -DKVCACHE_BUILD_BENCHMARKS=OFF
    -DKVCACHE_BUILD_EXAMPLES=OFF
    -DKVCACHE_CUDA=OFF
    -DKVCACHE_INSTALL_CMAKEDIR=share/kvcache)
vcpkg_cmake_install()

# The config is already in share/kvcache (vcpkg's place for it): the fix-up only rewrites paths.
vcpkg_cmake_config_fixup(CONFIG_PATH share/kvcache)
vcpkg_fixup_pkgconfig()

file(REMOVE_RECURSE "${CURRENT_PACKAGES_DIR}/debug/include" "${CURRENT_PACKAGES_DIR}/debug/share")
# The LICENSE our install puts in share/doc is replaced by vcpkg's copyright file.
file(REMOVE_RECURSE "${CURRENT_PACKAGES_DIR}/share/doc")

file(INSTALL "${CMAKE_CURRENT_LIST_DIR}/usage" DESTINATION "${CURRENT_PACKAGES_DIR}/share/${PORT}")
vcpkg_install_copyright(FILE_LIST "${SOURCE_PATH}/LICENSE")
