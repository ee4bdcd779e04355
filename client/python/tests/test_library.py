"""Where the package finds libvqkv (vqkv._native.find_library), place by place.

Every place is redirected into the test's temporary directory (pkg-config's
search path, ctypes.util.find_library, the system libdirs, the checkout's
build trees), so what is installed on the machine running the tests
decides nothing and no root is needed. Libraries there are empty files:
find_library only looks for them, lib() alone loads one.
"""

from __future__ import annotations

import ctypes.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vqkv import _native

ROOT = Path(__file__).resolve().parents[3]
PC = """prefix=${pcfiledir}/../..
libdir=${prefix}/lib

Name: libvqkv
Description: test
Version: 0.1.0
Libs: -L${libdir} -lvqkv
"""


class Places:
    """The redirected places, each empty until a test puts a library there."""

    def __init__(self, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.tmp = tmp
        self.monkeypatch = monkeypatch
        self.prefix = tmp / "prefix"
        self.system = [tmp / "usr-local-lib", tmp / "usr-lib"]
        self.builds = [tmp / tree / "client" / "libvqkv.so" for tree in ("build", "build-release")]
        self.ld_cache: str | None = None
        monkeypatch.delenv("VQKV_LIBRARY", raising=False)
        # PKG_CONFIG_LIBDIR replaces pkg-config's default path: an installed libvqkv.pc stays unseen.
        monkeypatch.setenv("PKG_CONFIG_LIBDIR", str(tmp / "no-pc"))
        monkeypatch.setenv("PKG_CONFIG_PATH", str(self.prefix / "lib" / "pkgconfig"))
        monkeypatch.setattr(ctypes.util, "find_library", lambda name: self.ld_cache)
        monkeypatch.setattr(_native, "_SYSTEM_LIBDIRS", self.system)
        monkeypatch.setattr(_native, "_CHECKOUT_LIBRARIES", self.builds)

    def add(self, path: Path) -> str:
        """An empty file at path, standing for a library."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        return str(path)

    def add_pc(self) -> Path:
        """A relocatable libvqkv.pc under the prefix, as cmake --install writes it; where its library goes."""
        pc = self.prefix / "lib" / "pkgconfig" / "libvqkv.pc"
        pc.parent.mkdir(parents=True)
        pc.write_text(PC)
        return self.prefix / "lib" / "libvqkv.so.0"


@pytest.fixture
def places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Places:
    return Places(tmp_path, monkeypatch)


def needs_pkg_config() -> None:
    if shutil.which("pkg-config") is None:
        pytest.skip("pkg-config is not installed")


def test_vqkv_library_wins_and_is_taken_as_given(places: Places) -> None:
    needs_pkg_config()
    places.add(places.add_pc())
    places.ld_cache = "libvqkv.so.0"
    places.add(places.system[0] / "libvqkv.so.0")
    places.monkeypatch.setenv("VQKV_LIBRARY", "/nowhere/libvqkv.so")
    assert _native.find_library() == "/nowhere/libvqkv.so"  # lib() reports a path that fails to load


def test_pkg_config_comes_before_the_linker_cache_and_the_libdirs(places: Places) -> None:
    needs_pkg_config()
    want = places.add(places.add_pc())
    places.ld_cache = "libvqkv.so.0"
    places.add(places.system[0] / "libvqkv.so.0")
    assert _native.find_library() == want
    # Only the development link there: that one.
    os.remove(want)
    dev = places.add(places.prefix / "lib" / "libvqkv.so")
    assert _native.find_library() == dev
    # A .pc whose libdir has no library: on to the next place.
    os.remove(dev)
    assert _native.find_library() == "libvqkv.so.0"


def test_then_the_linker_cache_the_libdirs_and_the_build_trees(places: Places) -> None:
    """Everything but pkg-config present, taken away place by place."""
    places.ld_cache = "libvqkv.so.0"
    files = [
        places.add(places.system[0] / "libvqkv.so.0"),
        places.add(places.system[0] / "libvqkv.so"),
        places.add(places.system[1] / "libvqkv.so.0"),
        places.add(places.system[1] / "libvqkv.so"),
        *(places.add(build) for build in places.builds),
    ]
    assert _native.find_library() == "libvqkv.so.0"
    places.ld_cache = None
    for path in files:
        assert _native.find_library() == path
        os.remove(path)
    with pytest.raises(_native.LibraryNotFoundError):
        _native.find_library()


def test_not_found_says_where_it_looked_and_what_to_do(places: Places) -> None:
    with pytest.raises(_native.LibraryNotFoundError) as e:
        _native.find_library()
    message = str(e.value)
    looked = [str(d / name) for d in places.system for name in ("libvqkv.so.0", "libvqkv.so")]
    looked += map(str, places.builds)
    for place in ["$VQKV_LIBRARY", "pkg-config", "ctypes.util.find_library", *looked]:
        assert place in message
    if shutil.which("pkg-config") is not None:
        assert f"PKG_CONFIG_PATH='{places.prefix / 'lib' / 'pkgconfig'}'" in message
    assert "cmake --install" in message and "set VQKV_LIBRARY" in message
    assert isinstance(e.value, OSError)


def test_without_pkg_config(places: Places) -> None:
    places.monkeypatch.setenv("PATH", str(places.tmp / "empty-bin"))
    with pytest.raises(_native.LibraryNotFoundError, match="pkg-config cannot run"):
        _native.find_library()
    build = places.add(places.builds[0])
    assert _native.find_library() == build


def test_this_checkout_s_build_trees() -> None:
    """The tests import the package from src/ of this repository: its build trees are searched."""
    assert _native._CHECKOUT_LIBRARIES == [
        ROOT / "build" / "client" / "libvqkv.so",
        ROOT / "build-release" / "client" / "libvqkv.so",
    ]


def test_a_process_without_vqkv_library_loads_it_through_pkg_config(tmp_path: Path) -> None:
    """The real library, installed by symlink under a prefix pkg-config is pointed at."""
    needs_pkg_config()
    built = os.environ.get("VQKV_LIBRARY", "")
    if not os.path.isfile(built):
        pytest.skip("VQKV_LIBRARY must name the built libvqkv (ctest sets it)")
    lib = tmp_path / "prefix" / "lib"
    (lib / "pkgconfig").mkdir(parents=True)
    (lib / "pkgconfig" / "libvqkv.pc").write_text(PC)
    (lib / "libvqkv.so.0").symlink_to(os.path.realpath(built))
    env = {k: v for k, v in os.environ.items() if k != "VQKV_LIBRARY"}
    env["PKG_CONFIG_PATH"] = str(lib / "pkgconfig")
    env["PYTHONPATH"] = str(ROOT / "client" / "python" / "src")
    code = "import vqkv, vqkv._native as n; n.lib(); print(n.find_library())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(lib / "libvqkv.so.0")
