#!/bin/sh
# Builds consumer.c the way a Makefile user would, with pkg-config against the installed
# (and possibly moved) prefix, then runs it on a fixture model.
#
#   consumer.sh PACKAGE PREFIX WORK_DIR MODEL TOKENIZER CC [EXTRA_FLAGS...]
#
# PACKAGE is etllm (libetllm.so) or etllm-static (libetllm.a).
set -eu
package=$1 prefix=$2 work=$3 model=$4 tokenizer=$5 cc=$6
shift 6
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$work"

# Only the installed prefix: no system or user .pc file may stand in for it.
PKG_CONFIG_PATH="$prefix/lib/pkgconfig"
PKG_CONFIG_LIBDIR="$prefix/lib/pkgconfig"
export PKG_CONFIG_PATH PKG_CONFIG_LIBDIR

version=$(pkg-config --modversion "$package")
libdir=$(pkg-config --variable=libdir "$package")
# The .pc file is relocatable: its libdir is the prefix it was found in.
if [ "$(cd "$libdir" && pwd -P)" != "$(cd "$prefix/lib" && pwd -P)" ]; then
  echo "pkg-config libdir $libdir is not $prefix/lib" >&2
  exit 1
fi

# -Wl,--as-needed first, as some distributions' compilers do by default: the libraries that
# only register kernels and backends must be kept anyway.
# shellcheck disable=SC2046 # word splitting of pkg-config's output is intended
"$cc" -std=c11 -Wall -Wextra -Werror "$@" "$here/consumer.c" -o "$work/consumer-$package" \
  -Wl,--as-needed $(pkg-config --cflags --libs "$package") -Wl,-rpath,"$libdir"
"$work/consumer-$package" "$model" "$tokenizer" "$version"
