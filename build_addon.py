#!/usr/bin/env python3
"""Build the Fit Implicit extension: dist/fit_implicit-<version>-<platform>.zip.

    python build_addon.py                      # all platforms, pyzmq wheels from PyPI
    python build_addon.py --platforms linux-x64
    python build_addon.py --no-wheels          # offline development build, one zip, no pyzmq

Steps: copy blender_addon/ into a staging folder, vendor the top-level ``shared`` package as
``shared/`` inside it (blender_addon/_shared.py imports it from there), add unmodified pyzmq
wheels from PyPI (cp311 for Blender 4.2-5.0, cp312-abi3 for Blender 5.1+ on Python 3.13; cached
under dist/wheel-cache so that reruns work offline), list them and the platforms in the staged
blender_manifest.toml, then validate and build with Blender's extension command line tool,
taken from the bpy wheel (or --blender-ext).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent
ADDON_DIR = ROOT / "blender_addon"
SHARED_DIR = ROOT / "shared"
PYZMQ = "pyzmq==27.*"

# Blender platform -> (pip --platform tag, test that a cached wheel's platform tag fits).
PLATFORMS: dict[str, tuple[str, callable]] = {
    "linux-x64": ("manylinux_2_28_x86_64", lambda t: "linux" in t and t.endswith("x86_64")),
    "windows-x64": ("win_amd64", lambda t: t == "win_amd64"),
    "macos-arm64": ("macosx_11_0_arm64", lambda t: t.startswith("macosx") and t.endswith(("arm64", "universal2"))),
    "macos-x64": ("macosx_10_15_x86_64", lambda t: t.startswith("macosx") and t.endswith(("x86_64", "universal2"))),
}
# (pip arguments, test on the wheel's python and abi tags)
PYTHONS = (
    (["--python-version", "3.11", "--implementation", "cp"], lambda py, abi: py == "cp311" and abi == "cp311"),
    (["--python-version", "3.12", "--implementation", "cp", "--abi", "abi3"],
     lambda py, abi: abi == "abi3" and py in ("cp312", "cp311", "cp310")),
)
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo", ".pytest_cache")


class BuildError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[build_addon] {msg}", flush=True)


# --------------------------------------------------------------------------------------------
def find_extension_cli(explicit: str | None = None) -> Path:
    """blender_ext.py from the installed bpy wheel (bpy/<version>/scripts/addons_core/bl_pkg/cli)."""
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise BuildError(f"--blender-ext {path} does not exist")
        return path
    spec = importlib.util.find_spec("bpy")
    if spec is None or not spec.submodule_search_locations:
        raise BuildError("Blender's extension tool was not found: install the bpy wheel "
                         "(pip install bpy==5.0.1) or pass --blender-ext PATH/TO/blender_ext.py")
    for base in spec.submodule_search_locations:
        found = sorted(Path(base).glob("*/scripts/addons_core/bl_pkg/cli/blender_ext.py"))
        if found:
            return found[-1]
    raise BuildError("bpy is installed but has no scripts/addons_core/bl_pkg/cli/blender_ext.py")


def _wheel_tags(path: Path) -> tuple[str, str, str]:
    parts = path.name[:-4].split("-")
    return parts[-3], parts[-2], parts[-1]


def _cached_wheel(cache: Path, platform: str, python_test) -> Path | None:
    fits_platform = PLATFORMS[platform][1]
    for wheel in sorted(cache.glob("pyzmq-27.*.whl"), reverse=True):
        py, abi, plat = _wheel_tags(wheel)
        if python_test(py, abi) and any(fits_platform(t) for t in plat.split(".")):
            return wheel
    return None


def fetch_wheels(platforms: list[str], cache: Path) -> list[Path]:
    """The pyzmq wheels for ``platforms`` and both Python flavours, from the cache or PyPI."""
    cache.mkdir(parents=True, exist_ok=True)
    wheels: list[Path] = []
    for platform in platforms:
        for pip_args, python_test in PYTHONS:
            wheel = _cached_wheel(cache, platform, python_test)
            if wheel is None:
                cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--quiet",
                       "--only-binary=:all:", "--no-deps", *pip_args, "--platform", PLATFORMS[platform][0],
                       "--dest", str(cache), PYZMQ]
                log(f"downloading {PYZMQ} for {platform} {' '.join(pip_args[:2])}")
                proc = subprocess.run(cmd, capture_output=True, text=True)
                wheel = _cached_wheel(cache, platform, python_test)
                if proc.returncode != 0 or wheel is None:
                    raise BuildError(
                        f"could not download {PYZMQ} for {platform} ({' '.join(pip_args)}): "
                        f"{(proc.stderr or proc.stdout).strip()[-600:]}\n"
                        "Is PyPI reachable? For an offline development build use --no-wheels.")
            if wheel not in wheels:
                wheels.append(wheel)
    return wheels


def stage(staging: Path, wheels: list[Path], platforms: list[str]) -> Path:
    """blender_addon + vendored shared + wheels, with the manifest completed."""
    if staging.exists():
        shutil.rmtree(staging)
    shutil.copytree(ADDON_DIR, staging, ignore=IGNORE)
    for leftover in ("shared", "wheels"):       # never ship stale copies from the source tree
        if (staging / leftover).exists():
            shutil.rmtree(staging / leftover)
    shutil.copytree(SHARED_DIR, staging / "shared", ignore=IGNORE)
    if wheels:
        (staging / "wheels").mkdir()
        for w in wheels:
            shutil.copy2(w, staging / "wheels" / w.name)
    manifest = staging / "blender_manifest.toml"
    manifest.write_text(complete_manifest(manifest.read_text(), [f"./wheels/{w.name}" for w in wheels],
                                          platforms if wheels else []))
    tomllib.loads(manifest.read_text())     # still valid TOML
    return staging


def complete_manifest(text: str, wheels: list[str], platforms: list[str]) -> str:
    """Set the top-level ``wheels`` and ``platforms`` keys (replacing any), before the first table."""
    text = re.sub(r"(?ms)^(wheels|platforms)\s*=\s*\[.*?\]\s*\n", "", text)
    lines = []
    if platforms:
        lines.append(f"platforms = {json.dumps(platforms)}")
    if wheels:
        lines.append("wheels = [\n" + "".join(f"  {json.dumps(w)},\n" for w in wheels) + "]")
    if not lines:
        return text
    block = "\n".join(lines) + "\n\n"
    m = re.search(r"(?m)^\[", text)
    return text[: m.start()] + block + text[m.start():] if m else text + "\n" + block


def run_cli(cli: Path, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(cli), *args], capture_output=True, text=True)
    out = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        raise BuildError(f"blender_ext {args[0]} failed:\n{out}")
    return out


def build(out: Path, platforms: list[str], with_wheels: bool, cli: Path | None = None,
          wheel_cache: Path | None = None) -> list[Path]:
    """Build and validate; returns the zip files written."""
    cli = cli or find_extension_cli()
    manifest = tomllib.loads((ADDON_DIR / "blender_manifest.toml").read_text())
    ext_id, version = manifest["id"], manifest["version"]
    out.mkdir(parents=True, exist_ok=True)
    wheels = fetch_wheels(platforms, wheel_cache or out / "wheel-cache") if with_wheels else []
    staging = stage(out / "staging" / ext_id, wheels, platforms)
    log(run_cli(cli, "validate", str(staging)))
    if wheels:
        zips = [out / f"{ext_id}-{version}-{p.replace('-', '_')}.zip" for p in platforms]
    else:
        zips = [out / f"{ext_id}-{version}.zip"]
    for z in zips:
        z.unlink(missing_ok=True)
    args = ["build", "--source-dir", str(staging), "--output-dir", str(out)]
    if wheels:
        args.append("--split-platforms")
    log(run_cli(cli, *args))
    for z in zips:
        if not z.exists():
            raise BuildError(f"the build did not write {z}")
        run_cli(cli, "validate", str(z))
        log(f"built and validated {z.relative_to(ROOT) if z.is_relative_to(ROOT) else z}")
    return zips


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "dist"), help="output folder (default: dist)")
    ap.add_argument("--platforms", default=",".join(PLATFORMS),
                    help=f"comma-separated, of: {', '.join(PLATFORMS)} (default: all)")
    ap.add_argument("--no-wheels", action="store_true",
                    help="offline development build without pyzmq wheels (one zip for all platforms)")
    ap.add_argument("--wheel-cache", help="folder of downloaded wheels (default: OUT/wheel-cache)")
    ap.add_argument("--blender-ext", help="path to Blender's blender_ext.py (default: from the bpy wheel)")
    args = ap.parse_args(argv)
    platforms = [p.strip() for p in args.platforms.split(",") if p.strip()]
    unknown = [p for p in platforms if p not in PLATFORMS]
    if unknown or not platforms:
        ap.error(f"unknown platform(s) {unknown}; choose from {', '.join(PLATFORMS)}")
    try:
        build(Path(args.out).resolve(), platforms, not args.no_wheels, find_extension_cli(args.blender_ext),
              Path(args.wheel_cache).resolve() if args.wheel_cache else None)
    except BuildError as exc:
        print(f"build_addon: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
