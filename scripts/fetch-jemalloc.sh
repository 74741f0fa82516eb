#!/usr/bin/env bash
# Fetch the source of jemalloc that the default build (PVL_JEMALLOC=BUNDLED)
# compiles into libpagedvl.so, from the distribution's own source package:
# apt checks the signed Release file, the Sources index and the .dsc, and this
# script checks the tarball against the .dsc's Checksums-Sha256 once more.
#
#   scripts/fetch-jemalloc.sh [--no-download] [DEST]
#
# DEST defaults to third_party/jemalloc/ (git-ignored), where CMake looks.
# --no-download: only check what DEST holds; never run apt (for machines
# whose packages are managed by hand, e.g. .ci/run with PVL_CI_SKIP_APT=1).
#
# Prints the path of the tarball (jemalloc_<version>.orig.tar.*) on stdout,
# everything else on stderr. When DEST already holds a tarball that matches
# its .dsc, nothing is downloaded and no root is needed. Otherwise, when no
# deb-src entry exists for this release, it adds one (as root, or through
# sudo): /etc/apt/sources.list.d/pagedvl-deb-src.{sources,list}, a copy of the
# machine's own `deb` entries for VERSION_CODENAME with the type changed, so
# the mirror, the components and the signing key stay the ones apt already
# trusts (Debian and Ubuntu alike).
set -euo pipefail

ROOT=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)
DOWNLOAD=1
if [ "${1:-}" = --no-download ]; then
  DOWNLOAD=0
  shift
fi
DEST=$(realpath -m "${1:-$ROOT/third_party/jemalloc}")

log() { echo "fetch-jemalloc: $*" >&2; }

# The newest .dsc in DEST whose orig tarball is present and matches the
# .dsc's SHA-256; prints the tarball's path.
verified_tarball() {
  local dsc tarball have name="" want=""
  [ -d "$DEST" ] || return 1
  dsc=$(find "$DEST" -maxdepth 1 -name 'jemalloc_*.dsc' -printf '%f\n' |
    sort -V | tail -n1)
  [ -n "$dsc" ] || return 1
  # Checksums-Sha256 lines: " <sha256> <size> <file name>".
  read -r want name < <(awk '
    /^Checksums-Sha256:/ { on = 1; next }
    /^[^ ]/ { on = 0 }
    on && $3 ~ /\.orig\.tar\./ { print $1, $3; exit }' "$DEST/$dsc")
  if [ -z "$name" ]; then
    log "$DEST/$dsc names no orig tarball"
    return 1
  fi
  tarball=$DEST/$name
  [ -f "$tarball" ] || return 1
  have=$(sha256sum "$tarball" | awk '{ print $1 }')
  if [ "$have" != "$want" ]; then
    log "$tarball: sha256 $have, but $dsc says $want"
    return 2
  fi
  echo "$tarball"
}

if tarball=$(verified_tarball); then
  log "already there, sha256 matches $(basename "${tarball%%.orig*}")*.dsc"
  echo "$tarball"
  exit 0
fi

if [ "$DOWNLOAD" = 0 ]; then
  log "no verified jemalloc source in $DEST (--no-download): run" \
    "scripts/fetch-jemalloc.sh${1:+ $1} once (it uses apt-get source), or" \
    "configure with -DPVL_JEMALLOC=SYSTEM|OFF"
  exit 1
fi

command -v apt-get >/dev/null 2>&1 || {
  log "no apt-get here: put jemalloc's source tarball somewhere and pass" \
    "-DPVL_JEMALLOC_TARBALL=path to cmake, or use -DPVL_JEMALLOC=SYSTEM|OFF"
  exit 1
}

SUDO=()
as_root() {
  if [ "$(id -u)" -ne 0 ] && [ ${#SUDO[@]} -eq 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
      log "this step needs root (or sudo): $*"
      exit 1
    fi
    SUDO=(sudo)
  fi
  "${SUDO[@]}" "$@"
}

# shellcheck disable=SC1091 # the machine's own file
CODENAME=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
if [ -z "$CODENAME" ]; then
  log "/etc/os-release has no VERSION_CODENAME"
  exit 1
fi

# Where apt reads its source entries (APT_CONFIG may move it).
PARTS=/etc/apt/sources.list.d/
eval "$(apt-config shell PARTS Dir::Etc::sourceparts/d)"

# --no-release-info: list what is configured, downloaded or not yet.
targets() {
  # shellcheck disable=SC2016 # $(FIELD) is apt's syntax, not the shell's
  apt-get indextargets --no-release-info \
    --format '$(TARGET_OF) $(RELEASE) $(SOURCESENTRY)' | sort -u
}

if ! targets | grep -q "^deb-src $CODENAME "; then
  entries=$(targets | awk -v c="$CODENAME" '$1 == "deb" && $2 == c { print $3 }' |
    sort -u)
  if [ -z "$entries" ]; then
    log "no 'deb' entry for $CODENAME in apt's sources: cannot derive deb-src"
    exit 1
  fi
  sources="" list=""
  for entry in $entries; do
    file=${entry%:*} n=${entry##*:}
    case "$file" in
    *.sources)
      # deb822: copy stanza n, a source entry of the same archive.
      sources+=$(awk -v n="$n" -v c="$CODENAME" '
        BEGIN { RS = ""; FS = "\n" }
        NR == n {
          for (i = 1; i <= NF; i++) {
            if ($i ~ /^Types:/) print "Types: deb-src"
            else if ($i ~ /^Suites:/) print "Suites: " c
            else if ($i !~ /^#/) print $i
          }
          exit
        }' "$file")$'\n\n'
      ;;
    *)
      # One-line style: line n, "deb [options] uri suite components".
      list+=$(sed -n "${n}s/^[[:space:]]*deb[[:space:]]/deb-src /p" "$file")$'\n'
      ;;
    esac
  done
  if [ -n "$sources" ]; then
    log "adding ${PARTS}pagedvl-deb-src.sources:"
    printf '%s' "$sources" >&2
    printf '# Added by libpagedvl scripts/fetch-jemalloc.sh.\n%s' "$sources" |
      as_root tee "${PARTS}pagedvl-deb-src.sources" >/dev/null
  fi
  if [ -n "$list" ]; then
    log "adding ${PARTS}pagedvl-deb-src.list:"
    printf '%s' "$list" >&2
    printf '# Added by libpagedvl scripts/fetch-jemalloc.sh.\n%s' "$list" |
      as_root tee "${PARTS}pagedvl-deb-src.list" >/dev/null
  fi
  as_root apt-get update >&2
fi

# A stale or missing Sources index makes `apt-get source` fail: update once
# and try again.
mkdir -p "$DEST"
cd "$DEST"
if ! apt-get source --download-only jemalloc >&2; then
  log "apt-get source failed: updating apt's indexes and trying again"
  as_root apt-get update >&2
  apt-get source --download-only jemalloc >&2
fi

if ! tarball=$(verified_tarball); then
  log "the download in $DEST did not verify"
  exit 1
fi
log "sha256 matches the .dsc"
echo "$tarball"
