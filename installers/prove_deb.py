"""Prove the Linux package: build it, install it into a fresh Debian 12, use it offline.

    sudo python3 installers/prove_deb.py              # build, then prove (about 9 min here)
    sudo python3 installers/prove_deb.py --deb dist/covey_0.1.0-1~debian-bookworm_amd64.deb

Too slow for every CI run; run it after changing briefcase.toml, installers/ or the
dependencies. Needs root (debootstrap, chroot, namespaces), debootstrap (installed if
missing) and the Debian mirror /etc/apt/sources.list names. In order:

1. builds the .deb with installers/build.py (unless --deb is given);
2. makes a fresh Debian 12 (bookworm) root with `debootstrap --variant=minbase` and adds a
   user, alice;
3. `apt-get install ./covey_*.deb` (the only step with network: it fetches the Depends);
4. with NO network (a new network namespace with only loopback, up): runs as alice
   `covey token new`, starts `covey node`, asks `covey chat "What is 2+2?"` through the
   node and then on its own, stops the node, opens the desktop app offscreen through
   installers/app_smoke.py and quits it, then runs plain `covey` for 20 s offscreen and
   stops it with SIGTERM (as a logout does), checking it stopped the node it started;
5. checks the install tree was not written to and the user's data is under
   ~/.local/share/covey;
6. starts Xvfb on this machine and, still offline, opens the app on it (Qt's xcb
   platform with only the package's Depends), saves a screenshot to
   build/installers/x11-window.png, and stops plain `covey` with SIGTERM again; then
   moves libxcb-cursor.so.0 aside and checks `covey` names it and its package;
7. upgrades to a newer version (the same package repacked as the next version, with no
   network) and checks the user's data is byte-for-byte unchanged and chat still works;
8. removes, then purges the package and checks the user's data stays.

It prints the package size, the install size, the time from `apt-get install` to the
first answered chat, and how long the whole proof took. The test root stays in
build/installers/prove-root for inspection (deleted at the start of the next run).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
BUILD_DIR = REPO / "build" / "installers"
DEFAULT_ROOT = BUILD_DIR / "prove-root"
USER = "alice"
DATA = f"/home/{USER}/.local/share/covey"
USER_DATA_FILES = ("swarm.json", "node-key.json", "conversations.db")
QUESTION = "What is 2+2?"


def say(text: str) -> None:
    print(f"[prove] {text}", flush=True)


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=True, text=True, **kwargs)


def debian_mirror() -> str:
    """The Debian mirror this machine's apt uses (deb822 or one-line sources)."""
    texts = [Path("/etc/apt/sources.list")] + sorted(Path("/etc/apt/sources.list.d").glob("*"))
    for path in texts:
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        # "URIs: http://deb.debian.org/debian" or "deb [opts] http://.../debian bookworm main"
        m = re.search(r"(?m)^(?:URIs:\s*|deb\s+(?:\[[^\]]*\]\s*)?)(\S+/debian)/?(?:\s|$)", text)
        if m:
            return m.group(1)
    return "http://deb.debian.org/debian"


def mounts_under(root: Path) -> list[str]:
    prefix = str(root.resolve())
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p == prefix or p.startswith(prefix + "/")]


def fresh_root(root: Path, mirror: str) -> float:
    """debootstrap a minimal bookworm into root; returns the seconds it took."""
    if root.exists():
        # Never delete through a live mount (a bound /dev would take the host's with it).
        if mounts_under(root):
            raise SystemExit(f"{root} has mounts under it: {mounts_under(root)}")
        shutil.rmtree(root)
    if not shutil.which("debootstrap"):
        run(["apt-get", "install", "-y", "-qq", "debootstrap"])
    started = time.monotonic()
    say(f"debootstrap bookworm (minbase) from {mirror}")
    run(["debootstrap", "--variant=minbase", "bookworm", str(root), mirror],
        stdout=subprocess.DEVNULL)
    shutil.copy2("/etc/resolv.conf", root / "etc" / "resolv.conf")
    (root / "etc" / "apt" / "sources.list").write_text(
        f"deb {mirror} bookworm main\ndeb {mirror} bookworm-updates main\n")
    return time.monotonic() - started


def in_root(root: Path, script: str, network: bool, x11: bool = False
            ) -> subprocess.CompletedProcess[str]:
    """Run a bash script as root inside the test system, in its own mount and PID
    namespaces (so /proc and the processes it starts vanish with it) and, unless
    `network`, in a new network namespace whose only interface is loopback. With `x11`,
    the host's X server sockets (/tmp/.X11-unix) are visible inside."""
    root_q = shlex.quote(str(root))
    setup = (f"mount -t proc proc {root_q}/proc && "
             f"mount -t tmpfs tmpfs {root_q}/dev/shm && "
             f"mount -t tmpfs tmpfs {root_q}/tmp && "
             f"mount -t sysfs sysfs {root_q}/sys && ")
    if x11:
        setup += (f"mkdir -p {root_q}/tmp/.X11-unix && "
                  f"mount --bind /tmp/.X11-unix {root_q}/tmp/.X11-unix && ")
    if not network:
        setup = "ip link set lo up && " + setup
    inner = setup + f"exec chroot {root_q} /bin/bash -euo pipefail -c {shlex.quote(script)}"
    cmd = ["unshare", "--mount", "--pid", "--fork", "--kill-child"]
    if not network:
        cmd.append("--net")
    return subprocess.run([*cmd, "/bin/sh", "-c", inner], text=True, capture_output=True)


def checked(result: subprocess.CompletedProcess[str], what: str) -> str:
    if result.returncode != 0:
        print(result.stdout[-6000:], result.stderr[-6000:], sep="\n", file=sys.stderr)
        raise SystemExit(f"[prove] FAILED: {what} (exit {result.returncode})")
    return result.stdout


def as_user(command: str) -> str:
    """A shell command line that runs `command` as the test user with a clean login env."""
    env = (f"env -i HOME=/home/{USER} USER={USER} LOGNAME={USER} PATH=/usr/bin:/bin "
           f"LANG=C.UTF-8 XDG_RUNTIME_DIR=/tmp/{USER}-run")
    return f"runuser -u {USER} -- {env} {command}"


def values(output: str) -> dict[str, str]:
    """The `PROOF key=value` lines the in-root scripts print."""
    return dict(m.groups() for m in re.finditer(r"(?m)^PROOF (\w+)=(.*)$", output))


def user_data_hashes(root: Path) -> dict[str, str]:
    data = root / DATA.lstrip("/")
    return {name: hashlib.sha256((data / name).read_bytes()).hexdigest()
            for name in USER_DATA_FILES}


def repack_as_next_version(deb: Path, work: Path) -> tuple[Path, str]:
    """The same package with the next patch version: what an update looks like to dpkg."""
    tree = work / "repack"
    shutil.rmtree(tree, ignore_errors=True)
    run(["dpkg-deb", "-R", str(deb), str(tree)])
    control = tree / "DEBIAN" / "control"
    text = control.read_text()
    version = re.search(r"(?m)^Version: (\S+)$", text).group(1)
    major, minor, patch = (re.match(r"(\d+)\.(\d+)\.(\d+)", version).groups())
    newer = f"{major}.{minor}.{int(patch) + 1}"
    control.write_text(text.replace(f"Version: {version}", f"Version: {newer}"))
    out = work / f"covey_{newer}_test.deb"
    # gzip -1: only this test installs it, and xz would take minutes.
    run(["dpkg-deb", "-Zgzip", "-z1", "--root-owner-group", "--build", str(tree), str(out)],
        stdout=subprocess.DEVNULL)
    shutil.rmtree(tree)
    return out, newer


def build_deb() -> Path:
    run([sys.executable, str(HERE / "build.py"), "linux"])
    debs = sorted((REPO / "dist").glob("covey_*.deb"), key=lambda p: p.stat().st_mtime)
    return debs[-1]


# --- the scripts that run inside the test system ---------------------------------------------

def install_script(deb_name: str) -> str:
    return f"""
export DEBIAN_FRONTEND=noninteractive
start=$(date +%s.%N)
log=/var/log/covey-install.log
apt-get install -y --no-install-recommends /var/cache/{deb_name} > $log 2>&1 \\
    || {{ tail -n 30 $log; exit 1; }}
echo "PROOF install_started=$start"
echo "PROOF install_done=$(date +%s.%N)"
echo "PROOF extra_space=$(grep -o 'After this operation, .* will be used' $log | head -1)"
# Briefcase's control file has no Installed-Size, so add up the package's own files.
echo "PROOF installed_size_kib=$(dpkg-query -L covey | while IFS= read -r f; do \\
    [ -f "$f" ] && [ ! -L "$f" ] && printf '%s\\0' "$f"; done \\
    | du -ck --files0-from=- | tail -n 1 | cut -f1)"
echo "PROOF covey_path=$(command -v covey)"
echo "PROOF desktop_file=$(ls /usr/share/applications/*covey*.desktop)"
echo "PROOF icons=$(ls /usr/share/icons/hicolor/*/apps/covey.* | wc -l)"
touch /var/tmp/covey-installed.marker
"""


# The user's XDG_RUNTIME_DIR (as_user sets it); each in_root call starts with an empty /tmp.
RUNTIME_DIR = (f"mkdir -p /tmp/{USER}-run && chown {USER} /tmp/{USER}-run "
               f"&& chmod 700 /tmp/{USER}-run")


def app_smoke_script(env: str, smoke: str, key: str) -> str:
    """Open and quit the app through installers/app_smoke.py; prints PROOF {key}=APP ..."""
    return f"""
app=$({as_user(f"{env} timeout 180 covey -c {shlex.quote(smoke)}")} 2>/tmp/app.err) \\
    || {{ cat /tmp/app.err; exit 1; }}
echo "PROOF {key}=$app"
"""


def app_until_sigterm_script(env: str, seconds: int, key: str) -> str:
    """Run plain `covey` until timeout's SIGTERM (what a logout sends); prints PROOF
    {key}_status (124: it was still running) and {key}_node (did it stop its node?)."""
    return f"""
set +e
{as_user(f"{env} timeout {seconds} covey")} > /tmp/gui.out 2>&1
status=$?
set -e
echo "PROOF {key}_status=$status"
if grep -q -e Traceback -e "cannot start" /tmp/gui.out; then cat /tmp/gui.out; exit 1; fi
if [ -f {DATA}/api.json ]; then echo "PROOF {key}_node=left running"
else echo "PROOF {key}_node=stopped"; fi
"""


def app_until_sigterm_problem(found: Mapping[str, str], key: str) -> str | None:
    """What went wrong in app_until_sigterm_script's run, if anything."""
    if found.get(f"{key}_status") != "124":
        return f"`covey` did not keep its window open ({key})"
    if found.get(f"{key}_node") != "stopped":
        return f"`covey` stopped by SIGTERM left its node running ({key})"
    return None


def offline_use_script(smoke: str) -> str:
    """Everything a user does first, with no network; prints PROOF lines."""
    a = as_user
    # Any connection out must fail: this tries the Debian mirror's name.
    probe = a("covey -c 'import socket; socket.create_connection((\"deb.debian.org\", 80), 5)'")
    return f"""
{RUNTIME_DIR}
# The network really is gone: only loopback exists and is up.
echo "PROOF interfaces=$(ls /sys/class/net 2>/dev/null | tr '\\n' ' ' || true)"
if {probe} >/dev/null 2>&1
then echo "PROOF network=on"; exit 1; else echo "PROOF network=off"; fi

token=$({a("covey token new")})
{a('covey node --token "$token" --lan-only')} > /tmp/node.log 2>&1 &
node_start=$(date +%s.%N)
for i in $(seq 1 240); do [ -f {DATA}/api.json ] && break; sleep 0.5; done
[ -f {DATA}/api.json ] || {{ cat /tmp/node.log; exit 1; }}
echo "PROOF node_started=$node_start"
echo "PROOF node_api_at=$(date +%s.%N)"
node_pid=$(sed -n 's/.*"pid": *\\([0-9]*\\).*/\\1/p' {DATA}/api.json)

reply=$({a(f'covey chat "{QUESTION}" --max-tokens 16 --temperature 0 --route local --json')})
echo "PROOF first_chat_done=$(date +%s.%N)"
echo "PROOF node_chat=$reply"

plain=$({a(f'covey chat "{QUESTION}" --max-tokens 16 --temperature 0')} 2>&1)
echo "PROOF plain_chat=$(echo "$plain" | tr '\\n' ' ')"

kill -TERM "$node_pid"
for i in $(seq 1 60); do kill -0 "$node_pid" 2>/dev/null || break; sleep 0.5; done
if kill -0 "$node_pid" 2>/dev/null; then echo "PROOF node_stop=still running"; exit 1; fi
[ -f {DATA}/api.json ] && echo "PROOF node_stop=left api.json" || echo "PROOF node_stop=clean"
{app_smoke_script("QT_QPA_PLATFORM=offscreen", smoke, "app_smoke")}
{app_until_sigterm_script("QT_QPA_PLATFORM=offscreen", 20, "gui_20s")}

# Nothing wrote into the install tree; the user's data is in the home directory.
marker=/var/tmp/covey-installed.marker
echo "PROOF written_in_install_tree=$(find /usr/lib/covey /usr/bin/covey -newer $marker | wc -l)"
echo "PROOF user_data=$(ls {DATA} | tr '\\n' ' ')"
"""


def x11_script(smoke: str, display: str) -> str:
    """The app on a real X server (Xvfb on the host), still offline: Qt's xcb platform
    with only the system libraries the package depends on. Prints PROOF lines."""
    shot = "/tmp/x11.png"
    return f"""
{RUNTIME_DIR}
{app_smoke_script(f"DISPLAY={display} COVEY_SMOKE_SCREENSHOT={shot}", smoke, "x11_smoke")}
cp {shot} /var/tmp/covey-x11.png
{app_until_sigterm_script(f"DISPLAY={display}", 15, "x11_gui")}

# A machine missing a library Qt's xcb platform needs: a message naming it and its package,
# not a Qt crash dump. The library is moved aside, then put back.
lib=$(ls /usr/lib/x86_64-linux-gnu/libxcb-cursor.so.0*)
mkdir -p /var/tmp/aside && mv $lib /var/tmp/aside/
set +e
{as_user(f"DISPLAY={display} timeout 60 covey")} > /tmp/missing.out 2>&1
status=$?
set -e
mv /var/tmp/aside/* /usr/lib/x86_64-linux-gnu/
echo "PROOF missing_lib_status=$status"
echo "PROOF missing_lib_message=$(tr '\\n' ' ' < /tmp/missing.out)"
"""


def on_x11(root: Path, smoke: str) -> dict[str, str]:
    """Start Xvfb on the host, run x11_script in the test system, keep its screenshot."""
    if not shutil.which("Xvfb"):
        run(["apt-get", "install", "-y", "-qq", "xvfb"])
    number = 42
    while Path(f"/tmp/.X11-unix/X{number}").exists():
        number += 1
    xvfb = subprocess.Popen(["Xvfb", f":{number}", "-screen", "0", "1280x800x24",
                             "-nolisten", "tcp"], stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if Path(f"/tmp/.X11-unix/X{number}").exists():
                break
            time.sleep(0.1)
        result = in_root(root, x11_script(smoke, f":{number}"), network=False, x11=True)
        found = values(checked(result, "opening the app on X11"))
    finally:
        xvfb.terminate()
        xvfb.wait()
    shot = BUILD_DIR / "x11-window.png"
    shutil.copy2(root / "var" / "tmp" / "covey-x11.png", shot)
    found["screenshot"] = str(shot.relative_to(REPO))
    return found


def after_upgrade_script() -> str:
    return f"""
echo "PROOF version=$(dpkg-query -W -f='${{Version}}' covey)"
reply=$({as_user(f'covey chat "{QUESTION}" --max-tokens 16 --temperature 0')} 2>&1)
echo "PROOF chat_after_upgrade=$(echo "$reply" | tr '\\n' ' ')"
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--deb", type=Path, help="prove this .deb instead of building one")
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT,
                        help=f"where the test system goes (default: {DEFAULT_ROOT})")
    parser.add_argument("--mirror", default=None, help="Debian mirror (default: apt's)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: debootstrap, chroot and namespaces need it")
    proof_started = time.monotonic()
    load_before = Path("/proc/loadavg").read_text().split()[0]

    build_s = 0.0
    if args.deb:
        deb = args.deb.resolve()
    else:
        started = time.monotonic()
        deb = build_deb()
        build_s = time.monotonic() - started
    say(f"package: {deb.name}")

    root = args.root.resolve()
    bootstrap_s = fresh_root(root, args.mirror or debian_mirror())
    checked(in_root(root, f"useradd -m -s /bin/bash {USER} && apt-get update -qq",
                    network=True), "preparing the test system")

    shutil.copy2(deb, root / "var" / "cache" / deb.name)
    say("apt-get install ./" + deb.name)
    installed = values(checked(in_root(root, install_script(deb.name), network=True),
                               "installing the package"))
    for key in ("covey_path", "desktop_file", "icons", "installed_size_kib", "extra_space"):
        say(f"  {key}: {installed[key]}")

    say("first use, offline: node, chat, app")
    smoke = (HERE / "app_smoke.py").read_text()
    used = values(checked(in_root(root, offline_use_script(smoke), network=False),
                          "using Covey offline"))
    used["node_api_after_s"] = f"{float(used['node_api_at']) - float(used['node_started']):.1f}"
    for key in ("interfaces", "network", "node_api_after_s", "node_chat", "plain_chat",
                "node_stop", "app_smoke", "gui_20s_status", "gui_20s_node",
                "written_in_install_tree", "user_data"):
        say(f"  {key}: {used.get(key)}")
    problem = app_until_sigterm_problem(used, "gui_20s")
    if problem:
        raise SystemExit(f"[prove] FAILED: {problem}")
    if used.get("written_in_install_tree") != "0":
        raise SystemExit("[prove] FAILED: running Covey wrote into the install tree")
    if "4" not in used.get("node_chat", "") or "4" not in used.get("plain_chat", ""):
        raise SystemExit("[prove] FAILED: the chat did not answer 4")
    first_chat_s = float(used["first_chat_done"]) - float(installed["install_started"])
    install_s = float(installed["install_done"]) - float(installed["install_started"])

    say("the app on an X server (Xvfb), offline")
    x11 = on_x11(root, smoke)
    for key in ("x11_smoke", "x11_gui_status", "x11_gui_node", "screenshot",
                "missing_lib_status", "missing_lib_message"):
        say(f"  {key}: {x11.get(key)}")
    problem = app_until_sigterm_problem(x11, "x11_gui")
    if problem or "xcb platform" not in x11.get("x11_smoke", ""):
        raise SystemExit(f"[prove] FAILED: the app on X11: {problem or 'not on xcb'}")
    missing = x11.get("missing_lib_message", "")
    if (x11.get("missing_lib_status") != "2" or "libxcb-cursor.so.0" not in missing
            or "apt-get install libxcb-cursor0" not in missing or "core dumped" in missing):
        raise SystemExit("[prove] FAILED: a missing Qt library was not named")

    before = user_data_hashes(root)
    newer_deb, newer = repack_as_next_version(deb, root.parent)
    shutil.move(newer_deb, root / "var" / "cache" / newer_deb.name)
    say(f"upgrade to {newer}, offline")
    checked(in_root(root, "DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "
                    f"/var/cache/{newer_deb.name} >/dev/null", network=False), "upgrading")
    upgraded = values(checked(in_root(root, after_upgrade_script(), network=False),
                              "using Covey after the upgrade"))
    say(f"  version: {upgraded['version']}; chat: {upgraded['chat_after_upgrade']}")
    data_kept_on_upgrade = user_data_hashes(root) == before
    say(f"  user data unchanged by the upgrade: {data_kept_on_upgrade}")

    checked(in_root(root, "apt-get remove -y -qq covey >/dev/null", network=False), "remove")
    kept_on_remove = user_data_hashes(root) == before
    program_gone = not (root / "usr" / "bin" / "covey").exists()
    # The package has no conffiles and no maintainer scripts, so `remove` leaves nothing
    # for purge to do (dpkg forgets it at once). Purge an installed copy instead.
    state = in_root(root, "dpkg-query -W -f='${db:Status-Abbrev}' covey", network=False)
    say(f"  after remove, dpkg knows covey: {state.returncode == 0}")
    checked(in_root(root, "DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "
                    f"/var/cache/{newer_deb.name} >/dev/null && apt-get purge -y -qq covey "
                    ">/dev/null", network=False), "reinstall, then purge")
    kept_on_purge = user_data_hashes(root) == before
    tree_gone = not (root / "usr" / "lib" / "covey").exists()
    say(f"  remove: program gone {program_gone}, user data kept {kept_on_remove}")
    say(f"  purge: install tree gone {tree_gone}, user data kept {kept_on_purge}")
    if not (data_kept_on_upgrade and kept_on_remove and kept_on_purge and program_gone
            and tree_gone and "4" in upgraded["chat_after_upgrade"]):
        raise SystemExit("[prove] FAILED: upgrade/remove/purge")

    total_s = time.monotonic() - proof_started
    print()
    print("Covey .deb proof: all checks passed")
    print(f"  package           {deb.name}")
    print(f"  package size      {deb.stat().st_size / 2**20:.1f} MiB")
    deps = re.search(r"After this operation, (.+) of additional", installed["extra_space"])
    print(f"  install size      {int(installed['installed_size_kib']) / 1024:.1f} MiB of "
          f"covey's files; apt announced {deps.group(1) if deps else '?'} in all (Covey and "
          "its dependencies)")
    print(f"  apt-get install   {install_s:.1f} s (Depends fetched from "
          f"{args.mirror or debian_mirror()})")
    print(f"  install -> first answered chat   {first_chat_s:.1f} s")
    if build_s:
        print(f"  build             {build_s / 60:.1f} min")
    print(f"  debootstrap       {bootstrap_s / 60:.1f} min")
    print(f"  whole proof       {total_s / 60:.1f} min")
    print(f"  machine load      {load_before} at the start, "
          f"{Path('/proc/loadavg').read_text().split()[0]} at the end "
          f"({os.cpu_count()} cores; other work on the machine slows every figure)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
