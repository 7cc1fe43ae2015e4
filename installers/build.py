"""Build Covey's installers with Briefcase, from briefcase.toml.

    python3 installers/build.py linux      # the .deb, on Debian 12 (or another Debian/Ubuntu)
    python3 installers/build.py macOS      # the .dmg, on a Mac
    python3 installers/build.py windows    # the .msi, on Windows

The finished installer is copied to dist/. This module owns everything between
briefcase.toml and Briefcase:

* the translation of briefcase.toml into the pyproject.toml Briefcase reads (Briefcase reads
  nothing else), written into a generated project under build/installers/<target>/project
  whose top-level entries link back to the repository, so every path in briefcase.toml
  means the same there;
* a tools venv with the pinned Briefcase (on Linux made from /usr/bin/python3: a "system"
  package is built with, and for, the system Python);
* the wheelhouse: llama-cpp-python built with the CMAKE_ARGS briefcase.toml gives for the
  OS (RPC on, native CPU flags off) from the source scripts/llama_source.py patches (on
  Linux the wheel scripts/setup.sh already built is reused), plus, where Briefcase installs
  binary wheels only (macOS, Windows), wheels for any requirement PyPI has only as source;
* the app icons in each OS's format, made from resources/icons;
* on Linux, a check that every shared library a bundled binary links to comes from the
  bundle or from a package the .deb depends on.

The Linux build needs nothing from GitHub: the template is installers/linux-system-template
and Briefcase's "system" format uses the system Python (no support package). Only PyPI (and
the Debian mirror, for build dependencies) is used.

Pure functions come first (tests/integration/test_installers.py covers them); the steps that run
programs follow, then main().
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import llama_source  # noqa: E402  (scripts/ is no package; setup.sh runs it as a script)

REPO = Path(__file__).resolve().parent.parent
CONFIG_FILE = REPO / "briefcase.toml"
BUILD_ROOT = REPO / "build" / "installers"
DIST_DIR = REPO / "dist"
CHANGELOG = "installers/CHANGELOG.md"
DRIVER_TABLE = "covey-installers"
# Briefcase wants a changelog and the license next to pyproject.toml.
EXTRA_TOP_LEVEL = ("LICENSE",)


@dataclass(frozen=True)
class Target:
    """One installer: the Briefcase platform, output format and packaging format."""

    name: str  # as on the command line and in [tool.covey-installers.llama-cpp]
    platform: str
    output_format: str
    packaging_format: str
    # Briefcase installs only binary wheels here, so sdist-only requirements are prebuilt.
    binary_only: bool


TARGETS: dict[str, Target] = {
    "linux": Target("linux", "linux", "system", "deb", binary_only=False),
    "macOS": Target("macOS", "macOS", "app", "dmg", binary_only=True),
    "windows": Target("windows", "windows", "app", "msi", binary_only=True),
}


# --- briefcase.toml ----------------------------------------------------------------------


def load_config(path: Path = CONFIG_FILE) -> dict[str, Any]:
    with path.open("rb") as f:
        return tomllib.load(f)


def the_app(config: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """The one app briefcase.toml defines: (name, its table)."""
    apps = config["tool"]["briefcase"]["app"]
    if len(apps) != 1:
        raise ValueError(f"briefcase.toml must define exactly one app, not {sorted(apps)}")
    name = next(iter(apps))
    return name, apps[name]


def config_problems(config: Mapping[str, Any]) -> list[str]:
    """What briefcase.toml lacks for the three installers; empty when it is complete."""
    problems: list[str] = []
    briefcase = config.get("tool", {}).get("briefcase", {})
    for key in ("project_name", "bundle", "version", "license", "license-files", "url",
                "author", "author_email"):
        if key not in briefcase:
            problems.append(f"[tool.briefcase] has no {key}")
    try:
        name, app = the_app(config)
    except (KeyError, ValueError) as e:
        return [*problems, f"no single [tool.briefcase.app.NAME] table ({e})"]
    for key in ("formal_name", "description", "long_description", "icon", "sources",
                "requires"):
        if key not in app:
            problems.append(f"[tool.briefcase.app.{name}] has no {key}")
    if name not in {Path(s).name for s in app.get("sources", [])}:
        problems.append(f"sources has no package named {name!r} (Briefcase starts it)")
    linux = app.get("linux", {}).get("system", {})
    if "template" not in linux:
        problems.append(f"[tool.briefcase.app.{name}.linux.system] has no template")
    if "system_runtime_requires" not in linux.get("debian", {}):
        problems.append(f"[tool.briefcase.app.{name}.linux.system.debian] has no "
                        "system_runtime_requires")
    for platform in ("macOS", "windows"):
        if platform not in app:
            problems.append(f"no [tool.briefcase.app.{name}.{platform}] table")
    driver = config.get("tool", {}).get(DRIVER_TABLE, {})
    if "briefcase" not in driver:
        problems.append(f"[tool.{DRIVER_TABLE}] has no briefcase pin")
    llama = driver.get("llama-cpp", {})
    if llama.get("requirement") not in app.get("requires", []):
        problems.append(f"[tool.{DRIVER_TABLE}.llama-cpp] requirement is not in requires")
    for target in TARGETS:
        if "-DGGML_RPC=on" not in llama.get(target, ""):
            problems.append(f"llama-cpp CMAKE_ARGS for {target} do not turn RPC on")
    return problems


def requirement_pin(requirement: str) -> tuple[str, str]:
    """("llama-cpp-python", "0.3.36") from "llama-cpp-python==0.3.36"."""
    name, sep, version = requirement.partition("==")
    if not sep or not name.strip() or not version.strip():
        raise ValueError(f"{requirement!r} is not pinned with ==")
    return name.strip(), version.strip()


def canonical_name(name: str) -> str:
    """A PEP 503 normalised distribution name ("Covey" -> "covey")."""
    return re.sub(r"[-_.]+", "-", name).lower()


# --- the generated project ----------------------------------------------------------------


def project_table(config: Mapping[str, Any]) -> dict[str, Any]:
    """The [project] table Briefcase's pyproject.toml gets. Briefcase takes name and version
    from it; dependencies stay out (Briefcase would add them to `requires` a second time).
    """
    briefcase = config["tool"]["briefcase"]
    _, app = the_app(config)
    return {
        "name": canonical_name(briefcase["project_name"]),
        "version": briefcase["version"],
        "description": app["description"],
    }


def installer_args(wheelhouse: Path, llama_requirement: str) -> list[str]:
    """pip arguments for Briefcase's requirement install: take llama-cpp-python from the
    wheelhouse, and never build it (a build by pip would have no RPC)."""
    name, _ = requirement_pin(llama_requirement)
    return ["--find-links", str(wheelhouse), "--only-binary", name]


def icon_stem_in_project(target: Target) -> str:
    """Where the generated project keeps the icon files Briefcase looks for."""
    return f"icons/{target.name}/app"


def icon_sources(icon: str, sizes: Iterable[int]) -> dict[str, str]:
    """The repository's icon files for briefcase.toml's `icon` stem: size -> path.

    The stem is "resources/icons/covey": the SVG is covey.svg and each PNG is the hicolor
    render, hicolor/NxN/apps/covey.png, next to it.
    """
    stem = Path(icon)
    sources = {"scalable": f"{icon}.svg"}
    for size in sorted(sizes):
        png = stem.parent / "hicolor" / f"{size}x{size}" / "apps" / f"{stem.name}.png"
        sources[str(size)] = png.as_posix()
    return sources


def icon_files(target: Target, icon: str, sizes: Iterable[int]) -> dict[str, list[str]]:
    """The icon files the generated project needs for `target`: file -> its sources.

    Linux takes the PNGs and the SVG as they are (Briefcase's names: app-16.png ...,
    app-scalable.svg); macOS and Windows want one .icns / .ico made of all the PNGs.
    """
    sources = icon_sources(icon, sizes)
    stem = icon_stem_in_project(target)
    pngs = [path for size, path in sources.items() if size != "scalable"]
    if target.platform == "macOS":
        return {f"{stem}.icns": pngs}
    if target.platform == "windows":
        return {f"{stem}.ico": pngs}
    return {f"{stem}-{size}{Path(path).suffix}": [path] for size, path in sources.items()}


def briefcase_pyproject(config: Mapping[str, Any], target: Target, wheelhouse: Path
                        ) -> dict[str, Any]:
    """briefcase.toml translated into the pyproject.toml Briefcase reads for `target`.

    Everything under [tool.briefcase] passes through unchanged except two things that
    depend on the build machine: the icon (files generated for this target) and the pip
    arguments that point at the wheelhouse. [project] is added; this driver's own table
    is dropped.
    """
    data = copy.deepcopy(dict(config))
    tool = data["tool"]
    driver = tool.pop(DRIVER_TABLE)
    _, app = the_app(data)
    app["icon"] = icon_stem_in_project(target)
    app["requirement_installer_args"] = installer_args(
        wheelhouse, driver["llama-cpp"]["requirement"])
    data["project"] = project_table(config)
    return data


# What building the .deb needs from Debian besides briefcase.toml's lists: the tools
# venv, Briefcase's own checks (python3-dev, build-essential, dpkg-dev) and the library
# check (binutils' readelf, which build-essential brings).
DEBIAN_BUILD_PACKAGES = ("python3-venv", "python3-dev", "build-essential", "dpkg-dev")


def debian_packages(config: Mapping[str, Any]) -> list[str]:
    """Every Debian package a Linux build needs installed. Briefcase checks the runtime
    Depends on the build machine too (`dpkg -s`), so they are in the list."""
    _, app = the_app(config)
    debian = app["linux"]["system"].get("debian", {})
    wanted = [*DEBIAN_BUILD_PACKAGES, *debian.get("system_requires", []),
              *debian.get("system_runtime_requires", [])]
    return list(dict.fromkeys(wanted))


def top_level_entries(config: Mapping[str, Any]) -> list[str]:
    """The repository entries the generated project links to: the first component of every
    source and of the Linux template, and the license files."""
    _, app = the_app(config)
    paths = [*app["sources"], app["linux"]["system"]["template"],
             *config["tool"]["briefcase"].get("license-files", []), *EXTRA_TOP_LEVEL]
    return sorted({Path(p).parts[0] for p in paths})


# --- TOML out (tomllib only reads) --------------------------------------------------------

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        # JSON's string escapes (\" \\ \n \uXXXX) are all valid in a TOML basic string.
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def toml_dumps(data: Mapping[str, Any], _prefix: tuple[str, ...] = ()) -> str:
    """TOML for nested tables of strings, numbers, booleans and lists of those."""
    lines: list[str] = []
    tables = {k: v for k, v in data.items() if isinstance(v, Mapping)}
    for key, value in data.items():
        if key not in tables:
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    out = "\n".join(lines) + ("\n" if lines else "")
    for key, table in tables.items():
        path = (*_prefix, key)
        # A table holding only tables needs no header of its own.
        if not table or any(not isinstance(v, Mapping) for v in table.values()):
            out += f"\n[{'.'.join(_toml_key(p) for p in path)}]\n"
        out += toml_dumps(table, path)
    return out


# --- llama-cpp-python ---------------------------------------------------------------------


def llama_cache_key(version: str, cmake_args: str, cache_tag: str, machine: str,
                    patch_hash: str) -> str:
    """The wheel cache key scripts/setup.sh uses (`llama_key`): a wheel built with other
    flags or patches, for another interpreter or machine, is never picked up."""
    text = f"{version}|{cmake_args}|{cache_tag}|{machine}|{patch_hash}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def llama_cache_dir(version: str, key: str, cache_home: Path) -> Path:
    return cache_home / "covey" / "wheels" / f"llama-cpp-python-{version}-{key}"


# --- the Linux dependency check -----------------------------------------------------------

_LDD_LINE = re.compile(r"^\s*(\S+)\s+=>\s+(not found|\S+)")
_LDD_LOADER = re.compile(r"^\s*(/\S+)\s+\(0x")  # the dynamic loader: "/lib64/ld-linux... (0x...)"


def parse_ldd(text: str) -> tuple[dict[str, str], list[str]]:
    """ldd's output: ({soname: resolved path}, [sonames not found])."""
    found: dict[str, str] = {}
    missing: list[str] = []
    for line in text.splitlines():
        loader = _LDD_LOADER.match(line)
        if loader:
            found[Path(loader.group(1)).name] = loader.group(1)
            continue
        m = _LDD_LINE.match(line)
        if not m:
            continue  # the vdso
        soname, where = m.groups()
        if where == "not found":
            missing.append(soname)
        else:
            found[soname] = where
    return found, missing


_NEEDED_LINE = re.compile(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]")


def parse_needed(text: str) -> list[str]:
    """The libraries an ELF file links to directly, from `readelf -d`'s output."""
    return _NEEDED_LINE.findall(text)


def package_names(depends: Iterable[str]) -> set[str]:
    """Package names in Depends entries: "python3 (>= 3.11)" -> "python3"; for
    alternatives ("a | b") every name counts."""
    names: set[str] = set()
    for entry in depends:
        for alternative in entry.split("|"):
            name = alternative.split("(")[0].split(":")[0].strip()
            if name:
                names.add(name)
    return names


def undeclared(owners: Mapping[str, str], declared: set[str]) -> dict[str, list[str]]:
    """Packages that provide a linked library but are not declared: package -> libraries.

    owners maps each system library a bundled binary links to onto the Debian package
    that ships it.
    """
    result: dict[str, list[str]] = {}
    for library, package in sorted(owners.items()):
        if package not in declared:
            result.setdefault(package, []).append(library)
    return result


# --- Installed-Size, which Briefcase's control file lacks ---------------------------------
# Without it apt announces only the dependencies' size before installing. Only the small
# control member of the .deb (an ar archive) is rewritten; the compressed data member, most
# of the package, is copied as it is, so adding the field costs no recompression.

_AR_MAGIC = b"!<arch>\n"


def installed_size_kib(tree: Path) -> int:
    """The Installed-Size of `tree` (its DEBIAN excluded), in KiB: each regular file's size
    rounded up to a KiB, plus 1 for every other entry (directories, symlinks)."""
    total = 0
    for path in tree.rglob("*"):
        if path.relative_to(tree).parts[0] == "DEBIAN":
            continue
        if path.is_file() and not path.is_symlink():
            total += -(-path.stat().st_size // 1024)
        else:
            total += 1
    return total


def set_control_field(control: str, field: str, value: str) -> str:
    """A Debian control paragraph with `field` set to `value` (replaced or appended)."""
    lines = [line for line in control.rstrip("\n").split("\n")
             if not line.lower().startswith(field.lower() + ":")]
    return "\n".join([*lines, f"{field}: {value}"]) + "\n"


def ar_members(data: bytes) -> list[tuple[bytes, bytes]]:
    """An ar archive's members as (60-byte header, content)."""
    if not data.startswith(_AR_MAGIC):
        raise ValueError("not an ar archive")
    members, at = [], len(_AR_MAGIC)
    while at < len(data):
        header = data[at:at + 60]
        if len(header) != 60 or header[58:60] != b"`\n":
            raise ValueError(f"bad ar member header at byte {at}")
        size = int(header[48:58])
        content = data[at + 60:at + 60 + size]
        if len(content) != size:
            raise ValueError(f"ar member at byte {at} is truncated")
        members.append((header, content))
        at += 60 + size + size % 2  # members start on even offsets
    return members


def ar_archive(members: Iterable[tuple[bytes, bytes]]) -> bytes:
    """ar_members reversed; each header's size field follows its content."""
    out = [_AR_MAGIC]
    for header, content in members:
        out += [header[:48] + str(len(content)).ljust(10).encode() + header[58:], content]
        if len(content) % 2:
            out.append(b"\n")
    return b"".join(out)


def with_control_field(control_tar: bytes, compression: str, field: str, value: str
                       ) -> bytes:
    """The control tarball with `field` set in ./control; every other entry unchanged."""
    out = io.BytesIO()
    with (tarfile.open(fileobj=io.BytesIO(control_tar), mode=f"r:{compression}") as source,
          tarfile.open(fileobj=out, mode=f"w:{compression}",
                       format=tarfile.GNU_FORMAT) as target):
        for info in source.getmembers():
            content = source.extractfile(info) if info.isfile() else None
            if info.name in ("./control", "control"):
                text = set_control_field(content.read().decode(), field, value).encode()
                info.size, content = len(text), io.BytesIO(text)
            target.addfile(info, content)
    return out.getvalue()


def deb_with_control_field(deb: bytes, field: str, value: str) -> bytes:
    """A .deb's bytes with `field` set in its control file."""
    members = ar_members(deb)
    for i, (header, content) in enumerate(members):
        name = header[:16].decode().strip().rstrip("/")
        if name.startswith("control.tar"):
            compression = {"control.tar": "", "control.tar.gz": "gz",
                           "control.tar.xz": "xz"}.get(name)
            if compression is None:
                raise ValueError(f"cannot rewrite {name}")
            members[i] = (header, with_control_field(content, compression, field, value))
            return ar_archive(members)
    raise ValueError("the .deb has no control member")


# --- running things -----------------------------------------------------------------------


def say(text: str) -> None:
    print(f"[installers] {text}", flush=True)


def run(cmd: list[str | Path], cwd: Path | None = None, env: dict[str, str] | None = None
        ) -> None:
    say("$ " + " ".join(str(c) for c in cmd))
    subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, check=True)


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def base_python(target: Target) -> str:
    """The Python that runs Briefcase. A Linux "system" package embeds the system Python,
    and Briefcase insists on being run by exactly that interpreter."""
    return "/usr/bin/python3" if target.platform == "linux" else sys.executable


def tools_venv(target: Target, config: Mapping[str, Any], build_dir: Path) -> Path:
    """A venv with the pinned Briefcase (and Pillow where icons need converting)."""
    venv = build_dir / "tools"
    packages = [config["tool"][DRIVER_TABLE]["briefcase"]]
    if target.platform != "linux":
        packages.append("pillow")
    marker = venv / "covey-tools.json"
    wanted = json.dumps({"python": base_python(target), "packages": packages})
    if marker.is_file() and marker.read_text() == wanted:
        return venv_python(venv)
    shutil.rmtree(venv, ignore_errors=True)
    run([base_python(target), "-m", "venv", venv])
    run([venv_python(venv), "-m", "pip", "install", "-q", "--upgrade", "pip"])
    run([venv_python(venv), "-m", "pip", "install", "-q", *packages])
    marker.write_text(wanted)
    return venv_python(venv)


def python_facts(python: Path) -> tuple[str, str]:
    """(sys.implementation.cache_tag, platform.machine()) of another interpreter."""
    out = subprocess.run(
        [str(python), "-c",
         "import platform, sys; print(sys.implementation.cache_tag, platform.machine())"],
        check=True, capture_output=True, text=True).stdout.split()
    return out[0], out[1]


def build_env(target: Target, config: Mapping[str, Any]) -> dict[str, str]:
    """The environment for building wheels on `target`."""
    env = dict(os.environ)
    if target.platform == "macOS":
        # Tag the wheels for the oldest macOS the app supports, or Briefcase's pip
        # (`--platform macosx_11_0_arm64`) would refuse them.
        _, app = the_app(config)
        env["MACOSX_DEPLOYMENT_TARGET"] = app["macOS"].get("min_os_version", "11.0")
    return env


def llama_wheel(target: Target, config: Mapping[str, Any], python: Path) -> Path:
    """llama-cpp-python's wheel with the OS's CMAKE_ARGS: from the cache scripts/setup.sh
    also uses, else built now (10-20 minutes on 2 cores)."""
    llama = config["tool"][DRIVER_TABLE]["llama-cpp"]
    _, version = requirement_pin(llama["requirement"])
    cmake_args = llama[target.name]
    cache_tag, machine = python_facts(python)
    key = llama_cache_key(version, cmake_args, cache_tag, machine, llama_source.patch_hash())
    wheels = llama_cache_dir(version, key, llama_source.cache_home())
    found = sorted(wheels.glob("llama_cpp_python-*.whl"))
    if found:
        say(f"llama-cpp-python: using {found[0]}")
        return found[0]
    say(f"llama-cpp-python: building {version} with CMAKE_ARGS={cmake_args!r} "
        "(first time only: 10-20 minutes on 2 cores)")
    tmp = wheels.with_name(wheels.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    src = wheels.with_name(wheels.name + ".src")
    source = llama_source.prepare(version, src, llama_source.cache_home(), str(python))
    env = build_env(target, config) | {"CMAKE_ARGS": cmake_args, "FORCE_CMAKE": "1"}
    # --no-cache-dir: pip's wheel cache ignores CMAKE_ARGS and could hand back a wheel
    # built without RPC.
    run([python, "-m", "pip", "wheel", "-q", "--no-cache-dir", "--no-deps", "-w", tmp, source],
        env=env)
    shutil.rmtree(src, ignore_errors=True)
    shutil.rmtree(wheels, ignore_errors=True)
    tmp.rename(wheels)
    return sorted(wheels.glob("llama_cpp_python-*.whl"))[0]


def make_wheelhouse(target: Target, config: Mapping[str, Any], python: Path,
                    build_dir: Path) -> Path:
    """The folder Briefcase's pip finds llama-cpp-python (and on macOS and Windows every
    requirement PyPI has only as source) in."""
    wheelhouse = build_dir / "wheelhouse"
    shutil.rmtree(wheelhouse, ignore_errors=True)
    wheelhouse.mkdir(parents=True)
    shutil.copy2(llama_wheel(target, config, python), wheelhouse)
    if target.binary_only:
        _, app = the_app(config)
        requires = app["requires"] + app.get(target.platform, {}).get("requires", [])
        llama_name, _ = requirement_pin(config["tool"][DRIVER_TABLE]["llama-cpp"]["requirement"])
        run([python, "-m", "pip", "wheel", "-q", "-w", wheelhouse, "--find-links", wheelhouse,
             "--only-binary", llama_name, *requires], env=build_env(target, config))
    return wheelhouse


def link(source: Path, dest: Path) -> None:
    """A symlink where the OS allows one without privileges; a copy on Windows."""
    if os.name == "nt":
        if source.is_dir():
            shutil.copytree(source, dest)
        else:
            shutil.copy2(source, dest)
    else:
        dest.symlink_to(source)


def make_icons(target: Target, config: Mapping[str, Any], project: Path, python: Path) -> None:
    _, app = the_app(config)
    icon_dir = REPO / Path(app["icon"]).parent / "hicolor"
    sizes = sorted(int(p.name.split("x")[0]) for p in icon_dir.glob("*x*")
                   if (p / "apps" / f"{Path(app['icon']).name}.png").is_file())
    for name, sources in icon_files(target, app["icon"], sizes).items():
        dest = project / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if len(sources) == 1 and Path(name).suffix == Path(sources[0]).suffix:
            link(REPO / sources[0], dest)
            continue
        # One multi-size .icns / .ico from the PNGs (Pillow, in the tools venv).
        script = ("import sys; from PIL import Image\n"
                  "imgs = [Image.open(p).convert('RGBA') for p in sys.argv[2:]]\n"
                  "big = max(imgs, key=lambda i: i.width)\n"
                  "big.save(sys.argv[1], sizes=[(i.width, i.height) for i in imgs],"
                  " append_images=[i for i in imgs if i is not big])\n")
        run([python, "-c", script, dest, *(REPO / s for s in sources)])


def lay_out_project(target: Target, config: Mapping[str, Any], project: Path,
                    wheelhouse: Path, python: Path) -> None:
    """The directory Briefcase runs in: pyproject.toml, links to the repository, icons."""
    shutil.rmtree(project, ignore_errors=True)
    project.mkdir(parents=True)
    for entry in top_level_entries(config):
        link(REPO / entry, project / entry)
    link(REPO / CHANGELOG, project / Path(CHANGELOG).name)
    pyproject = briefcase_pyproject(config, target, wheelhouse)
    (project / "pyproject.toml").write_text(
        "# Generated by installers/build.py from briefcase.toml: edit that file instead.\n"
        + toml_dumps(pyproject), encoding="utf-8")
    make_icons(target, config, project, python)


def briefcase_commands(target: Target) -> list[list[str]]:
    """Briefcase's create, build and package steps for `target` (unsigned packages)."""
    where = [target.platform, target.output_format]
    return [
        ["create", *where, "--no-input"],
        ["build", *where, "--no-input"],
        ["package", *where, "-p", target.packaging_format, "--adhoc-sign", "--no-input"],
    ]


def linux_bundle(project: Path, app_name: str) -> Path:
    """The tree Briefcase packs into the .deb (build/<app>/<vendor>/<codename>/<app>-<v>)."""
    bundles = sorted(p for p in (project / "build" / app_name).glob(f"*/*/{app_name}-*")
                     if p.is_dir())
    if len(bundles) != 1:
        raise SystemExit(f"expected one bundle under {project / 'build' / app_name}, "
                         f"found {bundles}")
    return bundles[0]


def is_elf(path: Path) -> bool:
    if not path.is_file() or path.is_symlink():
        return False
    with path.open("rb") as f:
        return f.read(4) == b"\x7fELF"


def dpkg_owner(path: str) -> str | None:
    """The Debian package that ships `path` (trying both sides of the merged /usr)."""
    candidates = [path]
    if path.startswith("/usr/"):
        candidates.append(path[4:])
    else:
        candidates.append("/usr" + path)
    candidates.append(os.path.realpath(path))
    for candidate in candidates:
        out = subprocess.run(["dpkg", "-S", candidate], capture_output=True, text=True)
        if out.returncode == 0:  # "libfoo1:amd64: /usr/lib/..."
            return out.stdout.split(":")[0].strip()
    return None


def check_linux_libraries(bundle: Path, declared: set[str]) -> None:
    """Every library a bundled binary links to comes from the bundle or from a declared
    package: otherwise the .deb would install and then fail to start on a bare system."""
    system: dict[str, str] = {}  # soname -> path, for libraries outside the bundle
    users: dict[str, Path] = {}  # soname -> a binary that links to it, for the message
    problems: list[str] = []
    elves = [p for p in bundle.rglob("*") if is_elf(p)]
    say(f"checking the shared libraries of {len(elves)} binaries in the bundle")
    for elf in elves:
        # Only the direct links count: what those libraries need in turn, their own
        # packages' Depends bring. ldd resolves them the way the loader will.
        needed = parse_needed(subprocess.run(["readelf", "-d", str(elf)], capture_output=True,
                                             text=True).stdout)
        found, _ = parse_ldd(subprocess.run(["ldd", str(elf)], capture_output=True,
                                            text=True).stdout)
        for soname in needed:
            path = found.get(soname)
            if path is None:
                problems.append(f"{elf.relative_to(bundle)} needs {soname}, which is not "
                                "installed on this machine")
            elif not Path(path).resolve().is_relative_to(bundle.resolve()):
                system[soname] = path
                users.setdefault(soname, elf.relative_to(bundle))
    owners: dict[str, str] = {}
    for soname, path in system.items():
        owner = dpkg_owner(path)
        if owner is None:
            problems.append(f"{soname} ({path}) comes from no Debian package")
        else:
            owners[soname] = owner
    for package, libraries in undeclared(owners, declared).items():
        problems.append(f"{package} is not in system_runtime_requires (briefcase.toml) but "
                        f"provides {', '.join(libraries)}, for {users[libraries[0]]}")
    if problems:
        raise SystemExit("[installers] the bundle's libraries are not all provided:\n  "
                         + "\n  ".join(sorted(set(problems))))
    say(f"every linked system library comes from a dependency ({len(owners)} libraries)")


def implicit_depends(python: Path) -> set[str]:
    """The Depends Briefcase adds itself: libc6 and libpython3.X (and, through it, the
    stdlib's own packages)."""
    tag = subprocess.run([str(python), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                         check=True, capture_output=True, text=True).stdout.strip()
    return {"libc6", f"libpython{tag}", f"libpython{tag}-stdlib"}


def build(target: Target, dist: Path) -> Path:
    started = time.monotonic()
    config = load_config()
    problems = config_problems(config)
    if problems:
        raise SystemExit("briefcase.toml is incomplete:\n  " + "\n  ".join(problems))
    app_name, app = the_app(config)
    build_dir = BUILD_ROOT / target.name
    python = tools_venv(target, config, build_dir)
    wheelhouse = make_wheelhouse(target, config, python, build_dir)
    project = build_dir / "project"
    lay_out_project(target, config, project, wheelhouse, python)
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    create, build_step, package = briefcase_commands(target)
    run([python, "-m", "briefcase", *create], cwd=project, env=env)
    run([python, "-m", "briefcase", *build_step], cwd=project, env=env)
    if target.platform == "linux":
        declared = package_names(app["linux"]["system"]["debian"]["system_runtime_requires"])
        check_linux_libraries(linux_bundle(project, app_name),
                              declared | implicit_depends(python))
    run([python, "-m", "briefcase", *package], cwd=project, env=env)
    made = [p for p in (project / "dist").iterdir()
            if p.suffix == f".{target.packaging_format}"]
    if len(made) != 1:
        raise SystemExit(f"expected one .{target.packaging_format} in {project / 'dist'}, "
                         f"found {made}")
    dist.mkdir(parents=True, exist_ok=True)
    final = dist / made[0].name
    if target.packaging_format == "deb":
        kib = installed_size_kib(linux_bundle(project, app_name))
        final.write_bytes(deb_with_control_field(made[0].read_bytes(), "Installed-Size",
                                                 str(kib)))
        say(f"Installed-Size: {kib} KiB")
    else:
        shutil.copy2(made[0], final)
    minutes = (time.monotonic() - started) / 60
    say(f"built {final} ({final.stat().st_size / 2**20:.0f} MiB) in {minutes:.1f} min")
    return final


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("target", choices=sorted(TARGETS))
    parser.add_argument("--dist", type=Path, default=DIST_DIR,
                        help=f"where the installer goes (default: {DIST_DIR})")
    parser.add_argument("--print-pyproject", action="store_true",
                        help="print the pyproject.toml Briefcase would get, and stop")
    parser.add_argument("--print-debian-packages", action="store_true",
                        help="print the Debian packages a linux build needs, and stop")
    args = parser.parse_args(argv)
    target = TARGETS[args.target]
    if args.print_debian_packages:
        print(" ".join(debian_packages(load_config())))
        return 0
    if args.print_pyproject:
        wheelhouse = BUILD_ROOT / target.name / "wheelhouse"
        print(toml_dumps(briefcase_pyproject(load_config(), target, wheelhouse)), end="")
        return 0
    try:
        build(target, args.dist)
    except subprocess.CalledProcessError as e:
        print(f"[installers] failed: {' '.join(map(str, e.cmd))} (exit {e.returncode})",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
