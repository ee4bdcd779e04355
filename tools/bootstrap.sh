#!/bin/sh
# Installs what vqkv needs to build and test on Debian 12, and nothing that
# is already there. Runs apt-get as root, through sudo when not root.
set -eu
# golang-github-pierrec-lz4-dev ships the public-domain text the fidelity tools read.
pkgs="build-essential cmake pkg-config git libuv1-dev libprotobuf-c-dev protobuf-c-compiler
      libmsgpack-dev libcmocka-dev libsystemd-dev libjson-c-dev libssl-dev python3 python3-venv
      golang-github-pierrec-lz4-dev"
missing=""
for p in $pkgs; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
as_root=""
[ "$(id -u)" -eq 0 ] || as_root="sudo"
$as_root apt-get update -qq
DEBIAN_FRONTEND=noninteractive $as_root apt-get install -y -qq --no-install-recommends $missing
