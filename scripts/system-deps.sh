#!/usr/bin/env bash
# Debian packages tinyfed uses: the Fashion-MNIST files and, for the browser tests, Chromium.
# Installs only what is missing; needs root or sudo. Usage: system-deps.sh [--browser]
set -u
need=()
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || need+=(dataset-fashion-mnist)
if [ "${1:-}" = "--browser" ] && ! command -v chromium >/dev/null 2>&1; then
  need+=(chromium)
fi
[ ${#need[@]} -eq 0 ] && exit 0
sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"
if ! command -v apt-get >/dev/null 2>&1; then
  echo "system-deps: no apt-get here; install ${need[*]} by hand (see README: data sets)" >&2
  exit 0
fi
echo "system-deps: installing ${need[*]}"
$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null \
  || echo "system-deps: could not install ${need[*]}; tests that need them will skip" >&2
