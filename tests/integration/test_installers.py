"""The installers' quick checks (the slow proof is installers/prove_deb.py): briefcase.toml
is complete and agrees with pyproject.toml and scripts/setup.sh; installers/build.py turns
it into the pyproject.toml Briefcase reads; the installed launcher behaves like python for
Covey's child processes; app/gui/startup_check.py names missing libraries; the CI workflow
builds the three installers."""

from __future__ import annotations

import copy
import importlib.util
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

from app.gui import startup_check
from app.gui.startup_check import Library

pytestmark = pytest.mark.processes

ROOT = Path(__file__).resolve().parents[2]
INSTALLERS = ROOT / "installers"
WORKFLOW = ROOT / ".github" / "workflows" / "installers.yml"


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


build = _load("covey_installers_build", INSTALLERS / "build.py")
prove = _load("covey_installers_prove", INSTALLERS / "prove_deb.py")


@pytest.fixture(scope="module")
def config() -> dict:
    return build.load_config(ROOT / "briefcase.toml")


@pytest.fixture(scope="module")
def pyproject() -> dict:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


# --- briefcase.toml ----------------------------------------------------------------------


def test_briefcase_toml_is_complete(config: dict) -> None:
    assert build.config_problems(config) == []
    name, app = build.the_app(config)
    assert name == "covey"
    assert app["formal_name"] == "Covey"
    assert config["tool"]["briefcase"]["bundle"] == "org.covey"
    for source in app["sources"]:
        assert (ROOT / source / "__init__.py").is_file(), source
    assert {Path(s).name for s in app["sources"]} >= {"app", "swarm", "backends", "resources"}
    assert (ROOT / app["linux"]["system"]["template"] / "cookiecutter.json").is_file()
    assert "macOS" in app and "windows" in app


def test_identity_and_requirements_match_pyproject(config: dict, pyproject: dict) -> None:
    _, app = build.the_app(config)
    assert config["tool"]["briefcase"]["version"] == pyproject["project"]["version"]
    assert sorted(app["requires"]) == sorted(pyproject["project"]["dependencies"])


def test_llama_flags_match_setup_and_keep_rpc_on_everywhere(config: dict) -> None:
    llama = config["tool"]["covey-installers"]["llama-cpp"]
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    setup_flags = re.search(r'^LLAMA_CMAKE_ARGS="([^"]+)"', setup, re.M).group(1)
    setup_version = re.search(r'^LLAMA_VERSION="([^"]+)"', setup, re.M).group(1)
    assert llama["linux"] == setup_flags  # so the wheel setup.sh built is the one shipped
    assert build.requirement_pin(llama["requirement"]) == ("llama-cpp-python", setup_version)
    for target in build.TARGETS:
        assert "-DGGML_RPC=on" in llama[target] and "-DGGML_NATIVE=off" in llama[target]


def test_llama_cache_key_is_setup_sh_key() -> None:
    """The driver finds the wheel scripts/setup.sh built: same key, computed as setup.sh does
    (its `llama_key`, patch hash included)."""
    flags = "-DGGML_RPC=on -DGGML_NATIVE=off -DLLAVA_BUILD=off"
    patches = build.llama_source.patch_hash()
    out = subprocess.run(
        ["bash", "-c", f"printf '%s|%s|%s|%s|%s' 0.3.36 '{flags}' cpython-311 x86_64 "
                       f"\"$({sys.executable} {ROOT}/scripts/llama_source.py patch-hash)\""
                       " | sha256sum | cut -c1-16"],
        capture_output=True, text=True, check=True).stdout.strip()
    assert build.llama_cache_key("0.3.36", flags, "cpython-311", "x86_64", patches) == out
    assert build.llama_cache_key("0.3.36", flags + " -DGGML_NATIVE=on", "cpython-311",
                                 "x86_64", patches) != out
    assert build.llama_cache_key("0.3.36", flags, "cpython-311", "x86_64", "0" * 64) != out
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert '"$ROOT/scripts/llama_source.py" patch-hash' in setup.split("llama_key() {")[1]


def test_deb_depends_cover_what_the_startup_check_names(config: dict) -> None:
    _, app = build.the_app(config)
    depends = build.package_names(app["linux"]["system"]["debian"]["system_runtime_requires"])
    every = startup_check.QT_COMMON + startup_check.QT_XCB + startup_check.QT_WAYLAND
    assert {lib.package for lib in every} <= depends
    assert "libgomp1" in depends  # llama.cpp is built with OpenMP


def test_incomplete_config_is_named(config: dict) -> None:
    broken = copy.deepcopy(config)
    _, app = build.the_app(broken)
    del app["icon"]
    app["sources"] = [s for s in app["sources"] if not s.endswith("covey")]
    broken["tool"]["covey-installers"]["llama-cpp"]["windows"] = "-DGGML_NATIVE=off"
    problems = "\n".join(build.config_problems(broken))
    assert "has no icon" in problems
    assert "no package named 'covey'" in problems
    assert "windows do not turn RPC on" in problems


# --- the translation into Briefcase's pyproject.toml -------------------------------------


def test_translation_passes_briefcase_tables_through(config: dict, tmp_path: Path) -> None:
    original = copy.deepcopy(config)
    wheelhouse = tmp_path / "wheelhouse"
    data = build.briefcase_pyproject(config, build.TARGETS["linux"], wheelhouse)
    assert config == original  # the input is not changed

    assert data["project"] == {
        "name": "covey", "version": "0.1.0",
        "description": config["tool"]["briefcase"]["app"]["covey"]["description"]}
    assert "covey-installers" not in data["tool"]
    app = data["tool"]["briefcase"]["app"]["covey"]
    assert app["icon"] == "icons/linux/app"
    assert app["requirement_installer_args"] == [
        "--find-links", str(wheelhouse), "--only-binary", "llama-cpp-python"]
    # Everything else is briefcase.toml's, unchanged.
    expected = copy.deepcopy(original["tool"]["briefcase"])
    for key in ("icon", "requirement_installer_args"):
        expected["app"]["covey"].pop(key, None)
        app.pop(key)
    assert data["tool"]["briefcase"] == expected


def test_generated_pyproject_reads_back(config: dict, tmp_path: Path) -> None:
    for target in build.TARGETS.values():
        data = build.briefcase_pyproject(config, target, tmp_path)
        assert tomllib.loads(build.toml_dumps(data)) == data


def test_toml_writer_round_trips_awkward_values() -> None:
    data = {"top": 'say "hi"\\', "n": 3, "f": 0.5, "yes": True,
            "t": {"multi": "line one\nline two\tend", "unicode": "café ✓",
                  "list": ["a", "b\"c"], "empty": {}, "dotted.key": "x",
                  "deep": {"deeper": {"k": []}}}}
    assert tomllib.loads(build.toml_dumps(data)) == data
    with pytest.raises(TypeError):
        build.toml_dumps({"bad": [{"table": "in a list"}]})


def test_project_links_every_top_level_entry(config: dict) -> None:
    entries = build.top_level_entries(config)
    assert entries == sorted(["LICENSE", "app", "backends", "installers", "resources", "swarm"])
    assert all((ROOT / e).exists() for e in entries)
    assert (ROOT / build.CHANGELOG).is_file()


def test_icons_per_target(config: dict) -> None:
    _, app = build.the_app(config)
    sizes = [16, 32, 48, 128, 256]
    sources = build.icon_sources(app["icon"], sizes)
    assert all((ROOT / path).is_file() for path in sources.values())

    linux = build.icon_files(build.TARGETS["linux"], app["icon"], sizes)
    assert linux["icons/linux/app-48.png"] == ["resources/icons/hicolor/48x48/apps/covey.png"]
    assert linux["icons/linux/app-scalable.svg"] == ["resources/icons/covey.svg"]
    assert len(linux) == len(sizes) + 1
    mac = build.icon_files(build.TARGETS["macOS"], app["icon"], sizes)
    assert list(mac) == ["icons/macOS/app.icns"] and len(mac["icons/macOS/app.icns"]) == 5
    assert list(build.icon_files(build.TARGETS["windows"], app["icon"], sizes)) == [
        "icons/windows/app.ico"]


def test_linux_template_installs_every_icon_size() -> None:
    template = next((INSTALLERS / "linux-system-template").glob("*/briefcase.toml")).read_text()
    sizes = sorted(int(n) for n in re.findall(r"^icon\.(\d+) =", template, re.M))
    from resources import PNG_SIZES
    assert sizes == sorted(PNG_SIZES)
    assert "icon.scalable" in template


def test_briefcase_commands() -> None:
    for target in build.TARGETS.values():
        create, build_step, package = build.briefcase_commands(target)
        assert create[:3] == ["create", target.platform, target.output_format]
        assert build_step[0] == "build"
        assert package[package.index("-p") + 1] == target.packaging_format
        assert all("--no-input" in step for step in (create, build_step, package))
    assert [t.packaging_format for t in build.TARGETS.values()] == ["deb", "dmg", "msi"]


def test_debian_packages_for_a_linux_build(config: dict) -> None:
    packages = build.debian_packages(config)
    assert packages[:4] == list(build.DEBIAN_BUILD_PACKAGES)
    assert "libgmp-dev" in packages and "libxcb-cursor0" in packages
    assert len(packages) == len(set(packages))


# --- the Linux library check ---------------------------------------------------------------

LDD = """\
\tlinux-vdso.so.1 (0x00007ffd5b1f2000)
\tlibggml.so.0 => /opt/covey/llama_cpp/lib/libggml.so.0 (0x00007f1)
\tlibgomp.so.1 => /lib/x86_64-linux-gnu/libgomp.so.1 (0x00007f2)
\tlibxcb-cursor.so.0 => not found
\t/lib64/ld-linux-x86-64.so.2 (0x00007f3)
"""
READELF = """\
 0x0000000000000001 (NEEDED)             Shared library: [libggml.so.0]
 0x0000000000000001 (NEEDED)             Shared library: [libgomp.so.1]
 0x000000000000000e (SONAME)             Library soname: [libllama.so.0]
"""


def test_parse_ldd_and_readelf() -> None:
    found, missing = build.parse_ldd(LDD)
    assert found == {"libggml.so.0": "/opt/covey/llama_cpp/lib/libggml.so.0",
                     "libgomp.so.1": "/lib/x86_64-linux-gnu/libgomp.so.1",
                     "ld-linux-x86-64.so.2": "/lib64/ld-linux-x86-64.so.2"}
    assert missing == ["libxcb-cursor.so.0"]
    assert build.parse_needed(READELF) == ["libggml.so.0", "libgomp.so.1"]


def test_undeclared_packages_are_named() -> None:
    declared = build.package_names(["python3 (>= 3.11)", "libgl1 | libgl1-mesa-glx",
                                    "libgomp1:amd64"])
    assert declared == {"python3", "libgl1", "libgl1-mesa-glx", "libgomp1"}
    owners = {"libgomp.so.1": "libgomp1", "libbrotlidec.so.1": "libbrotli1",
              "libbrotlicommon.so.1": "libbrotli1", "libGL.so.1": "libgl1"}
    assert build.undeclared(owners, declared) == {
        "libbrotli1": ["libbrotlicommon.so.1", "libbrotlidec.so.1"]}


# --- the installed launcher (installers/covey) ---------------------------------------------


def _launcher(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {"PYTHONPATH": f"{INSTALLERS}:{ROOT}:{tmp_path}", "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "covey", *args], capture_output=True,
                          text=True, env=env, timeout=60, cwd=tmp_path)


def test_launcher_runs_modules_and_code_like_python(tmp_path: Path) -> None:
    """Covey starts its node, engine and workers as `sys.executable -m MODULE ...`; in an
    installed app sys.executable is the launcher, which must do what python does."""
    (tmp_path / "echo_args.py").write_text(
        "import sys\nif __name__ == '__main__':\n    print('argv', sys.argv[1:])\n"
        "    sys.exit(3)\n")
    out = _launcher("-m", "echo_args", "node", "--lan-only", tmp_path=tmp_path)
    assert out.stdout.strip() == "argv ['node', '--lan-only']" and out.returncode == 3
    out = _launcher("-c", "import sys; print(sys.argv)", "x", tmp_path=tmp_path)
    assert out.stdout.strip() == "['-c', 'x']" and out.returncode == 0


def test_launcher_without_python_flags_is_the_covey_command(tmp_path: Path) -> None:
    out = _launcher("--help", tmp_path=tmp_path)
    assert out.returncode == 0 and out.stdout.startswith("usage: covey")
    assert "chat" in out.stdout and "node" in out.stdout


# --- app/gui/startup_check.py ------------------------------------------------------------------

FAKE = Library("libcovey-test-missing.so.7", "covey-test-missing7")


def test_startup_check_names_a_missing_library_and_its_package() -> None:
    required = (Library("libc.so.6", "libc6"), FAKE)
    missing = startup_check.missing_libraries(required, startup_check.can_load)
    assert missing == [FAKE]  # the real loader: libc loads, the fake soname does not
    text = startup_check.message(missing)
    assert "libcovey-test-missing.so.7" in text and "(package covey-test-missing7)" in text
    assert "sudo apt-get install covey-test-missing7" in text
    assert startup_check.message([]) is None


def test_startup_check_lists_all_missing_in_one_command() -> None:
    two = [FAKE, Library("libother.so.1", "other1"), Library("libother2.so.1", "other1")]
    text = startup_check.message(two)
    assert "sudo apt-get install covey-test-missing7 other1\n" in text


def test_startup_check_adapter(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"QT_QPA_PLATFORM": "offscreen"}
    assert startup_check.check(env) is None  # this machine has what Qt needs offscreen
    monkeypatch.setattr(startup_check, "QT_COMMON", (*startup_check.QT_COMMON, FAKE))
    problem = startup_check.check(env)
    assert problem is not None and FAKE.soname in problem


def test_startup_check_follows_the_qt_platform() -> None:
    assert startup_check.qt_platform({}) == "xcb"
    assert startup_check.qt_platform({"WAYLAND_DISPLAY": "wayland-0"}) == "wayland"
    assert startup_check.qt_platform({"QT_QPA_PLATFORM": "offscreen"}) == "offscreen"
    assert startup_check.qt_platform({"QT_QPA_PLATFORM": "wayland;xcb"}) == "wayland"
    xcb = {lib.soname for lib in startup_check.required_libraries("xcb")}
    assert "libxcb-cursor.so.0" in xcb and "libEGL.so.1" in xcb
    headless = {lib.soname for lib in startup_check.required_libraries("offscreen")}
    assert "libxcb-cursor.so.0" not in headless and "libEGL.so.1" in headless
    assert "libwayland-client.so.0" in {
        lib.soname for lib in startup_check.required_libraries("wayland")}


# --- the CI workflow --------------------------------------------------------------------------


def test_workflow_builds_the_three_installers() -> None:
    yaml = pytest.importorskip("yaml")
    workflow = yaml.safe_load(WORKFLOW.read_text())
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads `on` as true
    assert "workflow_dispatch" in triggers
    jobs = workflow["jobs"]
    expected = {"linux": ("ubuntu", "deb"), "macOS": ("macos", "dmg"),
                "windows": ("windows", "msi")}
    for target, (runner, ext) in expected.items():
        job = jobs[target.lower()]
        assert job["runs-on"].startswith(runner)
        runs = " ".join(step.get("run", "") for step in job["steps"])
        assert f"installers/build.py {target}" in runs
        uploads = [s for s in job["steps"] if s.get("uses", "").startswith(
            "actions/upload-artifact@")]
        assert uploads and uploads[0]["with"]["path"] == f"dist/*.{ext}"
        for step in job["steps"]:
            if "uses" in step:
                assert re.search(r"@v\d+$", step["uses"]), step["uses"]
    assert jobs["linux"]["container"] == "debian:bookworm"  # a Debian 12 package


# --- the proof script's plumbing -------------------------------------------------------------


def test_proof_reads_its_values() -> None:
    out = "noise\nPROOF network=off\nPROOF node_chat={\"text\": \"4\"}\nPROOF x=\n"
    assert prove.values(out) == {"network": "off", "node_chat": '{"text": "4"}', "x": ""}
    assert prove.as_user("covey chat").startswith("runuser -u alice -- env -i HOME=/home/alice")
    assert prove.app_until_sigterm_problem({"k_status": "124", "k_node": "stopped"}, "k") is None
    assert "did not keep its window open" in prove.app_until_sigterm_problem(
        {"k_status": "2", "k_node": "stopped"}, "k")
    assert "left its node running" in prove.app_until_sigterm_problem(
        {"k_status": "124", "k_node": "left running"}, "k")


# --- Installed-Size, added to the .deb after Briefcase packs it -----------------------------


def _tiny_deb(tmp_path: Path, compression: str) -> Path:
    tree = tmp_path / "tree"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text(
        "Package: covey-test\nVersion: 1.0\nArchitecture: all\nMaintainer: T <t@t.invalid>\n"
        "Description: test\n test package\n")
    (tree / "usr" / "lib" / "t").mkdir(parents=True)
    (tree / "usr" / "lib" / "t" / "one").write_bytes(b"x")  # 1 KiB
    (tree / "usr" / "lib" / "t" / "more").write_bytes(b"y" * 1025)  # 2 KiB
    (tree / "usr" / "lib" / "t" / "link").symlink_to("one")  # 1
    deb = tmp_path / f"t-{compression}.deb"
    subprocess.run(["dpkg-deb", "-Z", compression, "--root-owner-group", "--build",
                    str(tree), str(deb)], check=True, capture_output=True)
    return deb


def test_installed_size_counts_kib_per_file_and_one_per_entry(tmp_path: Path) -> None:
    deb = _tiny_deb(tmp_path, "xz")
    # usr, usr/lib, usr/lib/t and the link: 1 each; the files: 1 + 2.
    assert build.installed_size_kib(tmp_path / "tree") == 7
    assert deb.exists()


@pytest.mark.parametrize("compression", ["xz", "gzip", "none"])
def test_installed_size_is_added_and_nothing_else_changes(tmp_path: Path,
                                                           compression: str) -> None:
    deb = _tiny_deb(tmp_path, compression)
    out = tmp_path / "out.deb"
    out.write_bytes(build.deb_with_control_field(deb.read_bytes(), "Installed-Size", "7"))

    def dpkg_deb(option: str, path: Path, *fields: str) -> bytes:
        return subprocess.run(["dpkg-deb", option, str(path), *fields], check=True,
                              capture_output=True).stdout

    assert dpkg_deb("-f", out).decode() == dpkg_deb("-f", deb).decode() + "Installed-Size: 7\n"
    assert dpkg_deb("--fsys-tarfile", out) == dpkg_deb("--fsys-tarfile", deb)
    # Set again, the field is replaced, not repeated.
    again = build.deb_with_control_field(out.read_bytes(), "Installed-Size", "9")
    out.write_bytes(again)
    assert dpkg_deb("-f", out).decode().count("Installed-Size") == 1
    assert dpkg_deb("-f", out, "Installed-Size").decode().strip() == "9"


def test_ar_round_trip_and_garbage() -> None:
    members = [(b"odd/".ljust(16) + b"0".ljust(12) + b"0".ljust(6) * 2 + b"100644".ljust(8)
                + b"3".ljust(10) + b"`\n", b"abc"),
               (b"even/".ljust(16) + b"0".ljust(12) + b"0".ljust(6) * 2 + b"100644".ljust(8)
                + b"2".ljust(10) + b"`\n", b"de")]
    data = build.ar_archive(members)
    assert build.ar_members(data) == members
    with pytest.raises(ValueError, match="not an ar archive"):
        build.ar_members(b"PK\x03\x04 a zip file")
    with pytest.raises(ValueError, match="bad ar member header"):
        build.ar_members(data[:40])
    with pytest.raises(ValueError, match="truncated"):
        build.ar_members(data[:70])
    with pytest.raises(ValueError, match="no control member"):
        build.deb_with_control_field(data, "Installed-Size", "1")
