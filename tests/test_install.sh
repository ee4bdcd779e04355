#!/bin/sh
# test_install.sh BUILD_DIR -- what `cmake --install` leaves, checked the way
# a package build and its users see it. The build is installed with DESTDIR
# into a temporary root (as dh_auto_install does), and then:
#   - every file the README's Install section promises is there;
#   - the units pass `systemd-analyze verify` (their man: references
#     resolved in the installed man pages), the service's ExecStart= names
#     the installed vqkvd, and its exposure stays under 2.0 (README.md);
#   - the sysusers.d and tmpfiles.d entries apply to an empty root;
#   - the installed vqkvd accepts the installed default config;
#   - a C program built with nothing but `pkg-config libvqkv`, once against
#     libvqkv.so and once against libvqkv.a (`pkg-config --static`; libc stays
#     shared), talks to the installed vqkvd.
# tests/CMakeLists.txt passes the configured directories (absolute, as the
# files will name them) and the compiler and flags the library was built
# with, so the ASan build links its client the way it must.
# Skips (77) without systemd-analyze or pkg-config.
set -eu

build=$1
for tool in systemd-analyze pkg-config; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "SKIPPED: $tool is missing (Debian: apt-get install systemd pkgconf)"
        exit 77
    fi
done

tmp=$(mktemp -d)
daemon_pid=""
cleanup() {
    [ -z "$daemon_pid" ] || kill "$daemon_pid" 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT
fail() {
    echo "FAIL: $*" >&2
    exit 1
}

root=$tmp/root
DESTDIR=$root cmake --install "$build" >"$tmp/install.log" || {
    cat "$tmp/install.log"
    fail "cmake --install"
}

# ---- the files -----------------------------------------------------------------
missing=""
for f in \
    "$VQKV_BINDIR/vqkvd" "$VQKV_BINDIR/vqkvctl" "$VQKV_BINDIR/vqkv-demo" \
    "$VQKV_BINDIR/vqkv-benchmark" \
    "$VQKV_LIBDIR/libvqkv.so" "$VQKV_LIBDIR/libvqkv.so.$VQKV_SOVERSION" \
    "$VQKV_LIBDIR/libvqkv.so.$VQKV_VERSION" "$VQKV_LIBDIR/libvqkv.a" \
    "$VQKV_LIBDIR/libvqkv_kernels.so" "$VQKV_LIBDIR/libvqkv_kernels.so.$VQKV_SOVERSION" \
    "$VQKV_LIBDIR/libvqkv_kernels.so.$VQKV_VERSION" "$VQKV_LIBDIR/libvqkv_kernels.a" \
    "$VQKV_LIBDIR/pkgconfig/libvqkv.pc" \
    "$VQKV_INCLUDEDIR/vqkv/vqkv.h" "$VQKV_INCLUDEDIR/vqkv/vqkv_codec.h" \
    "$VQKV_INCLUDEDIR/vqkv/vqkv_errors.h" \
    "$VQKV_SYSCONFDIR/vqkv/vqkvd.conf" \
    "$VQKV_UNITDIR/vqkvd.service" "$VQKV_UNITDIR/vqkvd.socket" \
    "$VQKV_SYSUSERSDIR/vqkv.conf" "$VQKV_TMPFILESDIR/vqkv.conf" \
    "$VQKV_MANDIR/man1/vqkvctl.1" "$VQKV_MANDIR/man5/vqkvd.conf.5" \
    "$VQKV_MANDIR/man8/vqkvd.8"; do
    [ -e "$root$f" ] || missing="$missing $f"
done
[ -z "$missing" ] || fail "not installed:$missing"
for f in vqkvd vqkvctl vqkv-demo vqkv-benchmark; do
    [ -x "$root$VQKV_BINDIR/$f" ] || fail "$VQKV_BINDIR/$f is not executable"
done

# ---- the units -----------------------------------------------------------------
exec_start=$(sed -n 's/^ExecStart=\([^ ]*\).*/\1/p' "$root$VQKV_UNITDIR/vqkvd.service")
[ "$exec_start" = "$VQKV_BINDIR/vqkvd" ] ||
    fail "vqkvd.service runs '$exec_start', not the installed $VQKV_BINDIR/vqkvd"
# verify insists that ExecStart= exists on this machine, and the install is
# in $root: a copy of the units whose ExecStart= points into $root, the only
# change. (--root= would look for systemd's own units in $root too.)
mkdir "$tmp/units"
cp "$root$VQKV_UNITDIR/vqkvd.socket" "$tmp/units/"
sed "s|^ExecStart=$exec_start|ExecStart=$root$exec_start|" "$root$VQKV_UNITDIR/vqkvd.service" \
    >"$tmp/units/vqkvd.service"
if ! MANPATH=$root$VQKV_MANDIR systemd-analyze verify "$tmp/units/vqkvd.socket" \
    "$tmp/units/vqkvd.service" >"$tmp/verify.log" 2>&1 || [ -s "$tmp/verify.log" ]; then
    cat "$tmp/verify.log"
    fail "systemd-analyze verify"
fi
if ! systemd-analyze security --offline=true --threshold=20 "$root$VQKV_UNITDIR/vqkvd.service" \
    >"$tmp/security.log" 2>&1; then
    cat "$tmp/security.log"
    fail "vqkvd.service is exposed above 2.0 (systemd/README.md)"
fi
tail -n 1 "$tmp/security.log"

mkdir -p "$tmp/sys/etc"
systemd-sysusers --root="$tmp/sys" "$root$VQKV_SYSUSERSDIR/vqkv.conf" ||
    fail "systemd-sysusers vqkv.conf"
grep -q '^vqkv:x:[0-9]*:[0-9]*:.*:/usr/sbin/nologin$' "$tmp/sys/etc/passwd" ||
    fail "sysusers made no vqkv system user: $(cat "$tmp/sys/etc/passwd")"
grep -q '^vqkv:x:' "$tmp/sys/etc/group" || fail "sysusers made no vqkv group"
if [ "$(id -u)" -eq 0 ]; then
    systemd-tmpfiles --root="$tmp/sys" --create "$root$VQKV_TMPFILESDIR/vqkv.conf" ||
        fail "systemd-tmpfiles vqkv.conf"
    # mode, then the owner as the root's passwd and group name it
    [ "$(stat -c '%a %u %g' "$tmp/sys/run/vqkv")" = "750 $(grep '^vqkv:' "$tmp/sys/etc/passwd" |
        cut -d: -f3,4 | tr : ' ')" ] ||
        fail "/run/vqkv is $(stat -c '%a %u:%g' "$tmp/sys/run/vqkv"), not 0750 vqkv:vqkv"
else
    echo "NOTE: not root, so the tmpfiles.d entry was not applied (it chowns to vqkv)"
fi

# ---- the daemon and the library -------------------------------------------------
vqkvd=$root$VQKV_BINDIR/vqkvd
vqkvctl=$root$VQKV_BINDIR/vqkvctl
conf=$root$VQKV_SYSCONFDIR/vqkv/vqkvd.conf
# Installed programs find libvqkv_kernels through their RUNPATH, except in a
# /usr install, which has none: there the libdir is the dynamic linker's
# own, and in $root it is not.
if ! readelf -d "$vqkvd" | grep -q RUNPATH; then
    export LD_LIBRARY_PATH="$root$VQKV_LIBDIR"
fi
[ "$("$vqkvd" --check-config --config "$conf")" = ok ] ||
    fail "vqkvd --check-config on the installed $VQKV_SYSCONFDIR/vqkv/vqkvd.conf"

cat >"$tmp/client.c" <<'EOF'
/* client.c SOCKET VERSION -- built against the installed libvqkv only:
 * connects to vqkvd at SOCKET, which must report VERSION, registers an fp16
 * model, keys two blocks and looks them up (none held yet). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <vqkv.h>

static int check(int rc, const char *what, vqkv_client_t *c)
{
    if (rc < 0)
        fprintf(stderr, "%s: %s: %s\n", what, vqkv_client_strerror(rc),
                c != NULL ? vqkv_last_error(c) : "");
    return rc < 0;
}

int main(int argc, char **argv)
{
    vqkv_client_t *c = NULL;
    vqkv_model_t *m;
    vqkv_layout_t layout = {.num_layers = 2, .num_kv_heads = 2, .head_dim = 8,
                            .block_tokens = 4, .dtype = VQKV_DTYPE_F16};
    uint32_t tokens[9] = {1, 2, 3, 4, 5, 6, 7, 8, 9};
    uint8_t keys[3][VQKV_KEY_BYTES];
    size_t n_keys = 0, found = 1;
    vqkv_lease_t lease;
    int bad = argc != 3;

    /* Names for codes from both installed headers, distinct. */
    bad = bad || strcmp(vqkv_strerror(VQKV_EINVAL), vqkv_strerror(VQKV_ENOMEM)) == 0;
    bad = bad || strcmp(vqkv_client_strerror(VQKV_EPERM), vqkv_client_strerror(VQKV_EINVAL)) == 0;
    if (bad) {
        fprintf(stderr, "usage: client SOCKET VERSION, or the error names are wrong\n");
        return 1;
    }
    bad = check(vqkv_connect(argv[1], "install-test", 10000, &c), "connect", c);
    if (!bad && strcmp(vqkv_client_server_version(c), argv[2]) != 0) {
        fprintf(stderr, "vqkvd says version %s, libvqkv.pc %s\n", vqkv_client_server_version(c),
                argv[2]);
        bad = 1;
    }
    bad = bad || check(vqkv_register_model(c, "install-test", &layout, "fp16", &m), "register", c);
    bad = bad || check(vqkv_model_block_keys(m, NULL, tokens, 9, NULL, 0, keys, 3, &n_keys),
                       "block keys", c);
    if (!bad && (n_keys != 2 || memcmp(keys[0], keys[1], VQKV_KEY_BYTES) == 0)) {
        fprintf(stderr, "9 tokens in blocks of 4 gave %zu keys\n", n_keys);
        bad = 1;
    }
    bad = bad || check(vqkv_lookup(c, m, (const uint8_t(*)[VQKV_KEY_BYTES])keys, n_keys, &found,
                                   &lease),
                       "lookup", c);
    if (!bad && found != 0) {
        fprintf(stderr, "an empty vqkvd holds %zu of the blocks\n", found);
        bad = 1;
    }
    vqkv_close(c);
    return bad;
}
EOF

export PKG_CONFIG_PATH="$root$VQKV_LIBDIR/pkgconfig"
export PKG_CONFIG_SYSROOT_DIR="$root"
version=$(pkg-config --modversion libvqkv)
[ "$version" = "$VQKV_VERSION" ] || fail "libvqkv.pc says version $version"
# shellcheck disable=SC2086 # flags are lists of words
$VQKV_CC $VQKV_CFLAGS $(pkg-config --cflags libvqkv) "$tmp/client.c" -o "$tmp/client_shared" \
    $VQKV_LDFLAGS $(pkg-config --libs libvqkv) || fail "linking against libvqkv.so"
# The static link: pkg-config's list as it is, with our two libraries taken
# from their archives.
static_libs=""
for word in $(pkg-config --static --libs libvqkv); do
    case $word in
    -lvqkv | -lvqkv_kernels) word="-Wl,-Bstatic $word -Wl,-Bdynamic" ;;
    esac
    static_libs="$static_libs $word"
done
# shellcheck disable=SC2086
$VQKV_CC $VQKV_CFLAGS $(pkg-config --static --cflags libvqkv) "$tmp/client.c" \
    -o "$tmp/client_static" $VQKV_LDFLAGS $static_libs || fail "linking against libvqkv.a"
if readelf -d "$tmp/client_static" | grep -q 'NEEDED.*libvqkv'; then
    fail "the static client still needs a shared libvqkv"
fi

"$vqkvd" --config "$conf" --socket "$tmp/vqkv.sock" --state-dir "$tmp/state" \
    2>"$tmp/vqkvd.log" &
daemon_pid=$!
until "$vqkvctl" --socket "$tmp/vqkv.sock" health >/dev/null 2>&1; do
    kill -0 "$daemon_pid" 2>/dev/null || {
        cat "$tmp/vqkvd.log"
        fail "the installed vqkvd exited"
    }
    sleep 0.1
done
LD_LIBRARY_PATH="$root$VQKV_LIBDIR" "$tmp/client_shared" "$tmp/vqkv.sock" "$version" ||
    fail "the client linked against libvqkv.so"
"$tmp/client_static" "$tmp/vqkv.sock" "$version" || fail "the client linked against libvqkv.a"

kill -TERM "$daemon_pid"
status=0
wait "$daemon_pid" || status=$?
daemon_pid=""
[ "$status" -eq 0 ] || {
    cat "$tmp/vqkvd.log"
    fail "the installed vqkvd exited $status on SIGTERM"
}

# ---- installed elsewhere: cmake --install --prefix -----------------------------
# Outside /usr, the install follows the prefix it is given: the default
# config under it, vqkvd reading that one, and libvqkv.pc naming it.
relocated=""
if [ "$VQKV_PREFIX" != /usr ]; then
    unset PKG_CONFIG_SYSROOT_DIR
    reloc=$tmp/elsewhere
    cmake --install "$build" --prefix "$reloc" >"$tmp/reloc.log" || {
        cat "$tmp/reloc.log"
        fail "cmake --install --prefix"
    }
    [ -f "$reloc/etc/vqkv/vqkvd.conf" ] || fail "--prefix $reloc: no $reloc/etc/vqkv/vqkvd.conf"
    "$reloc/bin/vqkvd" --help | grep -qF "(default: $reloc/etc/vqkv/vqkvd.conf" ||
        fail "the relocated vqkvd does not read $reloc/etc/vqkv/vqkvd.conf: $("$reloc/bin/vqkvd" --help)"
    [ "$("$reloc/bin/vqkvd" --check-config)" = ok ] || fail "the relocated vqkvd's own config"
    libdir_rel=${VQKV_LIBDIR#"$VQKV_PREFIX"/}
    cflags=$(PKG_CONFIG_PATH="$reloc/$libdir_rel/pkgconfig" pkg-config --cflags libvqkv)
    # shellcheck disable=SC2086 # one word, -I and the directory
    set -- $cflags
    incdir=$(cd "${1#-I}" 2>/dev/null && pwd -P) || fail "libvqkv.pc's $cflags is not a directory"
    [ "$incdir" = "$(cd "$reloc/include/vqkv" && pwd -P)" ] ||
        fail "the relocated libvqkv.pc says $cflags, not $reloc/include/vqkv"
    relocated=", relocated with --prefix"
fi
echo "ok: installed tree, units, sysusers, config, libvqkv.so and libvqkv.a$relocated"
