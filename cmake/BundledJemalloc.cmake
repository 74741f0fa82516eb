# PVL_JEMALLOC=BUNDLED: jemalloc compiled from its source tarball into
# libpagedvl.so, so that the library loads through dlopen() anywhere.
#
# Why not the distribution's libjemalloc: Debian builds it with initial-exec
# TLS (a static TLS block of 2.6 kB), and glibc keeps only about 512 bytes of
# static TLS for libraries loaded after start-up, so `dlopen("libpagedvl.so")`
# fails with "cannot allocate memory in static TLS block"; its
# libjemalloc_pic.a has the same TLS model. Here jemalloc is configured with
#   --disable-initial-exec-tls   global-dynamic TLS: any dlopen() works;
#   --with-jemalloc-prefix=pvl__je_   the public API is pvl__je_mallocx...,
#       so the process's malloc/free are never replaced (with a prefix,
#       jemalloc defines no malloc and wraps no __libc_* function). pvl__ is
#       the library's internal prefix; pvl_je_ would match the pvl_[a-z]*
#       that libpagedvl/exports.map exports and that the `nm -D` check of
#       .ci/run lets through, so a leak would go unseen;
#   --with-private-namespace, --without-export   internal symbols prefixed and
#       every symbol hidden, so nothing of jemalloc leaves the .so even
#       before the version script hides it;
#   --disable-stats   nothing reads jemalloc's statistics;
#   --disable-libdl   jemalloc calls pthread_create itself instead of looking
#       up an application wrapper with dlsym (no -ldl on older glibc);
#   --with-lg-page, --with-lg-hugepage   as Debian's package sets them (4 KiB
#       pages on x86, 64 KiB elsewhere so the library also runs on 64 KiB
#       page kernels; 2 MiB huge pages), not whatever the build machine has;
#   --disable-cxx, --disable-shared, --disable-doc   only the C static PIC
#       archive is built (target lib/libjemalloc_pic.a), to keep it short.
# Its settings come from the environment variable PVL__JE_MALLOC_CONF, not
# MALLOC_CONF, so a host that tunes its own jemalloc does not tune ours.
#
# The tarball: -DPVL_JEMALLOC_TARBALL=path, else the newest
# third_party/jemalloc/jemalloc_*.orig.tar.* that scripts/fetch-jemalloc.sh
# put there (Debian's jemalloc source package, i.e. the upstream release).
# When the .dsc that came with it is next to it, its SHA-256 is checked here
# and again by ExternalProject before extraction.
#
# Defines the imported static library pvl_jemalloc (include directory with
# the prefixed jemalloc/jemalloc.h, the archive, its link dependencies).

include(ExternalProject)

set(_pvl_je_hint
  "fetch it with scripts/fetch-jemalloc.sh (apt-get source, as root or via "
  "sudo), or pass -DPVL_JEMALLOC_TARBALL=/path/to/jemalloc-5.3.0.tar.bz2, "
  "or build without the bundled jemalloc: -DPVL_JEMALLOC=SYSTEM (the "
  "distribution's libjemalloc, then libpagedvl.so cannot be dlopen()ed) or "
  "-DPVL_JEMALLOC=OFF (libc malloc)")

if(PVL_JEMALLOC_TARBALL)
  set(_pvl_je_tar "${PVL_JEMALLOC_TARBALL}")
  if(NOT EXISTS "${_pvl_je_tar}")
    message(FATAL_ERROR "PVL_JEMALLOC_TARBALL=${_pvl_je_tar} does not exist: "
                        ${_pvl_je_hint})
  endif()
else()
  file(GLOB _pvl_je_tars
    ${CMAKE_CURRENT_SOURCE_DIR}/third_party/jemalloc/jemalloc_*.orig.tar.*)
  list(FILTER _pvl_je_tars EXCLUDE REGEX "\\.asc$")
  if(NOT _pvl_je_tars)
    message(FATAL_ERROR "PVL_JEMALLOC=BUNDLED (the default) needs jemalloc's "
                        "source tarball in ${CMAKE_CURRENT_SOURCE_DIR}/third_party/jemalloc/: "
                        ${_pvl_je_hint})
  endif()
  list(SORT _pvl_je_tars COMPARE NATURAL)
  list(GET _pvl_je_tars -1 _pvl_je_tar)
endif()
get_filename_component(_pvl_je_tar "${_pvl_je_tar}" ABSOLUTE)

# The .dsc's "Checksums-Sha256" line for this tarball, when there is one.
get_filename_component(_pvl_je_dir "${_pvl_je_tar}" DIRECTORY)
get_filename_component(_pvl_je_name "${_pvl_je_tar}" NAME)
set(_pvl_je_sha "")
file(GLOB _pvl_je_dscs "${_pvl_je_dir}/jemalloc_*.dsc")
foreach(_dsc ${_pvl_je_dscs})
  file(STRINGS "${_dsc}" _lines REGEX "^ [0-9a-f]+ [0-9]+ ")
  foreach(_line ${_lines})
    string(REGEX MATCH "^ ([0-9a-f]+) [0-9]+ (.*)$" _m "${_line}")
    string(LENGTH "${CMAKE_MATCH_1}" _len) # 64: SHA-256 (not SHA-1, MD5)
    if(CMAKE_MATCH_2 STREQUAL _pvl_je_name AND _len EQUAL 64)
      set(_pvl_je_sha ${CMAKE_MATCH_1})
    endif()
  endforeach()
endforeach()
set(_pvl_je_hash_args)
if(_pvl_je_sha)
  file(SHA256 "${_pvl_je_tar}" _pvl_je_have)
  if(NOT _pvl_je_have STREQUAL _pvl_je_sha)
    message(FATAL_ERROR "${_pvl_je_tar}: SHA-256 ${_pvl_je_have}, but its .dsc "
                        "says ${_pvl_je_sha}; delete it and run scripts/fetch-jemalloc.sh")
  endif()
  set(_pvl_je_hash_args URL_HASH SHA256=${_pvl_je_sha})
  message(STATUS "pagedvl: bundled jemalloc from ${_pvl_je_tar} (SHA-256 matches its .dsc)")
else()
  message(STATUS "pagedvl: bundled jemalloc from ${_pvl_je_tar} (no .dsc next to it: not verified)")
endif()

if(CMAKE_SYSTEM_PROCESSOR MATCHES "^(x86_64|AMD64|amd64|i[3-6]86|x86)$")
  set(_pvl_je_lg_page 12)
else()
  set(_pvl_je_lg_page 16)
endif()

# Extracted files get the time of extraction, so a new tarball in an old
# build directory rebuilds every object.
if(POLICY CMP0135)
  cmake_policy(SET CMP0135 NEW)
endif()

set(_pvl_je_prefix ${CMAKE_CURRENT_BINARY_DIR}/jemalloc)
set(_pvl_je_build ${_pvl_je_prefix}/build)
set(_pvl_je_lib ${_pvl_je_build}/lib/libjemalloc_pic.a)
if(CMAKE_GENERATOR MATCHES "Makefiles")
  set(_pvl_je_make "$(MAKE)") # joins the parent's jobserver (-jN)
else()
  find_program(PVL_MAKE_PROGRAM NAMES gmake make REQUIRED)
  include(ProcessorCount)
  ProcessorCount(_pvl_je_jobs)
  if(_pvl_je_jobs LESS 1)
    set(_pvl_je_jobs 2)
  endif()
  set(_pvl_je_make ${PVL_MAKE_PROGRAM} -j${_pvl_je_jobs})
endif()

ExternalProject_Add(pvl_jemalloc_build
  PREFIX ${_pvl_je_prefix}
  SOURCE_DIR ${_pvl_je_prefix}/source
  BINARY_DIR ${_pvl_je_build}
  URL ${_pvl_je_tar}
  ${_pvl_je_hash_args}
  DOWNLOAD_NO_PROGRESS ON
  # -g1: line tables for profilers, without -g3's 30 MB of macro info.
  # --with-version=VERSION: take the version from the tarball, not from
  # `git describe` of the repository the build directory may sit in.
  CONFIGURE_COMMAND ${CMAKE_COMMAND} -E env CC=${CMAKE_C_COMPILER} CFLAGS=-g1
    <SOURCE_DIR>/configure --with-version=VERSION
    --with-jemalloc-prefix=pvl__je_ --with-private-namespace=pvl__jei_
    --without-export --disable-initial-exec-tls --disable-stats --disable-libdl
    --disable-cxx --disable-shared --disable-doc
    --with-lg-page=${_pvl_je_lg_page} --with-lg-hugepage=21
  BUILD_COMMAND ${_pvl_je_make} lib/libjemalloc_pic.a
  INSTALL_COMMAND ""
  BUILD_BYPRODUCTS ${_pvl_je_lib}
  LOG_CONFIGURE ON
  LOG_BUILD ON
  LOG_OUTPUT_ON_FAILURE ON)

# The include directory must exist when the build system is generated.
file(MAKE_DIRECTORY ${_pvl_je_build}/include)
add_library(pvl_jemalloc STATIC IMPORTED)
set_target_properties(pvl_jemalloc PROPERTIES
  IMPORTED_LOCATION ${_pvl_je_lib}
  INTERFACE_INCLUDE_DIRECTORIES ${_pvl_je_build}/include
  INTERFACE_LINK_LIBRARIES "Threads::Threads;${PVL_LIBM}")
add_dependencies(pvl_jemalloc pvl_jemalloc_build)
