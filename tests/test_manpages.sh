#!/bin/sh
# test_manpages.sh MANDIR VQKVD VQKVCTL -- the man pages of docs/man render
# without a single groff warning (-ww: every warning category), and document
# what the programs take: each --flag that `vqkvd --help` and `vqkvctl --help`
# print appears in vqkvd(8) and vqkvctl(1), and each key of the file that
# `vqkvd --print-default-config` writes in vqkvd.conf(5). vqkvd's flags, its
# --help and that file all come from the daemon's table of keys
# (daemon/config.c), so every key and flag of the table is checked. Skips
# (77) without groff.
set -eu

mandir=$1 vqkvd=$2 vqkvctl=$3
if ! command -v groff >/dev/null 2>&1; then
    echo "SKIPPED: groff is missing (Debian: apt-get install groff-base)"
    exit 77
fi

status=0
for page in "$mandir"/*.[1-8]; do
    out=$(groff -man -Tutf8 -ww -z "$page" 2>&1)
    if [ -n "$out" ]; then
        echo "FAIL: groff warns about $page:"
        echo "$out"
        status=1
    fi
done

# The page's text with roff's \- turned into plain dashes.
page_text() {
    sed 's/\\-/-/g' "$mandir/$1"
}

# Every word "--flag" in a program's usage must appear in its page.
check_flags() {
    page=$1
    shift
    for flag in $("$@" --help | grep -o -- '--[a-z][a-z-]*' | sort -u); do
        if ! page_text "$page" | grep -Eq -- "$flag([^a-z-]|\$)"; then
            echo "FAIL: $page does not document $flag"
            status=1
        fi
    done
}
check_flags vqkvd.8 "$vqkvd"
check_flags vqkvctl.1 "$vqkvctl"

# The default file lists every key, commented out: "#key = value". The page
# opens an entry with '.BI "key = "'; [quota]'s uid.1000 is its uid.N.
keys=$("$vqkvd" --print-default-config | sed -n 's/^#\([a-z_.0-9]*\) *=.*/\1/p' | sort -u)
if [ -z "$keys" ]; then
    echo "FAIL: vqkvd --print-default-config lists no key"
    status=1
fi
for key in $keys; do
    entry="^\\.BI \"$key = \""
    case $key in
    uid.*) entry='^\.BI uid\. N ' ;;
    esac
    if ! page_text vqkvd.conf.5 | grep -q -- "$entry"; then
        echo "FAIL: vqkvd.conf.5 does not document the key $key"
        status=1
    fi
done
[ "$status" -ne 0 ] || echo "ok: the man pages render cleanly and cover every flag and key"
exit "$status"
