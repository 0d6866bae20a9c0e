"""Finding, downloading and extracting VOC2012, against a tiny VOC-layout tar served from 127.0.0.1."""

from __future__ import annotations

import functools
import hashlib
import io
import re
import socket
import tarfile
import threading
from collections.abc import Callable, Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from segvoc.data.download import (
    VOC_TAR_NAME,
    DatasetUnavailableError,
    download_file,
    extract_tar,
    is_voc_complete,
    prepare_voc,
    voc_dir,
)

VOC_FILES = {
    "VOCdevkit/VOC2012/JPEGImages/2007_000032.jpg": b"\xff\xd8\xff\xe0 not really a jpeg " * 40,
    "VOCdevkit/VOC2012/JPEGImages/2007_000033.jpg": b"\xff\xd8\xff\xe0 another one " * 40,
    "VOCdevkit/VOC2012/SegmentationClass/2007_000032.png": b"\x89PNG\r\n\x1a\n mask " * 40,
    "VOCdevkit/VOC2012/SegmentationClass/2007_000033.png": b"\x89PNG\r\n\x1a\n mask two " * 40,
    "VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt": b"2007_000032\n",
    "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt": b"2007_000033\n",
}


def write_tar(path: Path, files: dict[str, bytes], extra: Callable[[tarfile.TarFile], None] | None = None) -> Path:
    """Write an uncompressed tar holding ``files`` (name -> bytes); ``extra`` may add hand-made members."""
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if extra is not None:
            extra(tar)
    return path


@pytest.fixture
def voc_tar(tmp_path: Path) -> tuple[Path, str]:
    """A tiny VOC-layout tar named like the real one, in its own folder, and its MD5."""
    folder = tmp_path / "served"
    folder.mkdir()
    tar = write_tar(folder / VOC_TAR_NAME, VOC_FILES)
    return tar, hashlib.md5(tar.read_bytes()).hexdigest()


class QuietHandler(SimpleHTTPRequestHandler):
    """The stdlib file handler (it ignores Range and answers 200), recording each request's Range header."""

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.server.requests.append(self.headers.get("Range"))  # type: ignore[attr-defined]
        self.serve()

    def serve(self) -> None:
        super().do_GET()


class RangeHandler(QuietHandler):
    """Also honours ``Range: bytes=N-`` with 206, and answers 416 when N is past the end."""

    def serve(self) -> None:
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        path = Path(self.translate_path(self.path))
        if match is None or not path.is_file():
            super().serve()
            return
        data, start = path.read_bytes(), int(match.group(1))
        if start >= len(data):
            self.send_error(416)
            return
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])


class Server:
    """A file server on 127.0.0.1 in a daemon thread; ``requests`` lists the Range header of each GET."""

    def __init__(self, folder: Path, handler: type[QuietHandler]) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
        self.httpd.requests = []  # type: ignore[attr-defined]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.01,), daemon=True)
        self.thread.start()
        self.running = True

    @property
    def requests(self) -> list[str | None]:
        return self.httpd.requests  # type: ignore[attr-defined]

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def stop(self) -> None:
        if self.running:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.thread.join(timeout=5)
            self.running = False


@pytest.fixture
def serve() -> Iterator[Callable[..., Server]]:
    """``serve(folder, handler=QuietHandler)`` starts a server; every one is stopped after the test."""
    servers: list[Server] = []

    def start(folder: Path, handler: type[QuietHandler] = QuietHandler) -> Server:
        servers.append(Server(folder, handler))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


_HELD_PORTS: list[socket.socket] = []  # bound, never listening, kept until the session ends: nothing else gets them


def closed_port_url() -> str:
    """A URL on 127.0.0.1 whose port refuses connections: bound here and kept (not listening), so no other process
    can start listening on it while a test relies on the refusal."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    _HELD_PORTS.append(sock)
    return f"http://127.0.0.1:{sock.getsockname()[1]}/{VOC_TAR_NAME}"


def leftovers(root: Path) -> list[str]:
    """Names of temporary extraction folders and partial downloads left in ``root``."""
    return sorted(p.name for p in root.glob("*") if p.name.startswith(".extract-") or p.suffix == ".part")


def test_download_builds_tree_removes_tar_and_is_not_repeated(
    tmp_path: Path, voc_tar: tuple[Path, str], serve: Callable[..., Server]
) -> None:
    tar, md5 = voc_tar
    server = serve(tar.parent)
    root = tmp_path / "data"

    voc = prepare_voc(root, download=True, url=server.url(VOC_TAR_NAME), md5=md5)

    assert voc == voc_dir(root) and is_voc_complete(voc)
    assert (voc / "ImageSets/Segmentation/train.txt").read_text() == "2007_000032\n"
    assert (voc / "JPEGImages/2007_000033.jpg").read_bytes() == VOC_FILES[
        "VOCdevkit/VOC2012/JPEGImages/2007_000033.jpg"
    ]
    assert not (root / VOC_TAR_NAME).exists()  # deleted once extracted, to save 2 GB
    assert leftovers(root) == []
    assert server.requests == [None]

    server.stop()
    assert prepare_voc(root, download=True, url=server.url(VOC_TAR_NAME), md5=md5) == voc


def test_download_reuses_a_finished_tar_without_network(tmp_path: Path, voc_tar: tuple[Path, str]) -> None:
    tar, md5 = voc_tar
    root = tmp_path / "data"
    root.mkdir()
    (root / VOC_TAR_NAME).write_bytes(tar.read_bytes())

    voc = prepare_voc(root, download=True, url=closed_port_url(), md5=md5)

    assert is_voc_complete(voc)


def test_a_finished_tar_with_another_checksum_is_downloaded_again(
    tmp_path: Path, voc_tar: tuple[Path, str], serve: Callable[..., Server]
) -> None:
    tar, md5 = voc_tar
    server = serve(tar.parent)
    root = tmp_path / "data"
    root.mkdir()
    (root / VOC_TAR_NAME).write_bytes(b"an older, different tar" * 100)

    voc = prepare_voc(root, download=True, url=server.url(VOC_TAR_NAME), md5=md5)

    assert is_voc_complete(voc) and server.requests == [None]  # one whole download, not a resume
    assert not (root / VOC_TAR_NAME).exists() and leftovers(root) == []


def test_checksum_mismatch_deletes_the_download(
    tmp_path: Path, voc_tar: tuple[Path, str], serve: Callable[..., Server]
) -> None:
    tar, _ = voc_tar
    server = serve(tar.parent)
    root = tmp_path / "data"

    with pytest.raises(DatasetUnavailableError, match="checksum") as info:
        prepare_voc(root, download=True, url=server.url(VOC_TAR_NAME), md5="0" * 32)

    assert "deleted" in str(info.value) and "0" * 32 in str(info.value)
    assert not (root / VOC_TAR_NAME).exists() and leftovers(root) == []
    assert not voc_dir(root).exists()


def test_server_down_names_url_and_ways_out(tmp_path: Path) -> None:
    url = closed_port_url()

    with pytest.raises(DatasetUnavailableError) as info:
        prepare_voc(tmp_path, download=True, url=url, md5=None)

    message = str(info.value)
    assert url in message and "data.root" in message and f"data.tar_path=/path/to/{VOC_TAR_NAME}" in message
    assert not voc_dir(tmp_path).exists()


def test_http_error_status_is_reported(tmp_path: Path, voc_tar: tuple[Path, str], serve: Callable[..., Server]) -> None:
    server = serve(voc_tar[0].parent)

    with pytest.raises(DatasetUnavailableError, match="HTTP 404") as info:
        download_file(server.url("missing.tar"), tmp_path / VOC_TAR_NAME)

    assert "data.tar_path" in str(info.value)


def test_local_tar_path_needs_no_network(tmp_path: Path, voc_tar: tuple[Path, str]) -> None:
    tar, md5 = voc_tar
    root = tmp_path / "data"

    voc = prepare_voc(root, tar_path=tar, url=closed_port_url(), md5=md5)

    assert voc == voc_dir(root) and is_voc_complete(voc)
    assert tar.is_file()  # the user's own tar is never removed
    assert leftovers(root) == []


def test_local_tar_with_wrong_checksum_is_refused_and_kept(tmp_path: Path, voc_tar: tuple[Path, str]) -> None:
    tar, _ = voc_tar

    with pytest.raises(DatasetUnavailableError, match="checksum"):
        prepare_voc(tmp_path / "data", tar_path=tar, md5="f" * 32)

    assert tar.is_file() and not voc_dir(tmp_path / "data").exists()


def test_missing_tar_path_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / VOC_TAR_NAME

    with pytest.raises(DatasetUnavailableError, match=re.escape(str(missing))):
        prepare_voc(tmp_path, tar_path=missing)


def test_no_data_and_no_download_lists_the_ways_out(tmp_path: Path) -> None:
    with pytest.raises(DatasetUnavailableError) as info:
        prepare_voc(tmp_path)

    message = str(info.value)
    assert str(voc_dir(tmp_path)) in message
    assert "data.download=true" in message and "data.root" in message and "data.tar_path" in message


def test_existing_tree_is_used_as_is(tmp_path: Path) -> None:
    voc = voc_dir(tmp_path)
    for name in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / name).mkdir(parents=True)

    assert prepare_voc(tmp_path, download=True, url=closed_port_url()) == voc


@pytest.mark.parametrize("given", ["VOCdevkit/VOC2012", "VOCdevkit"])
def test_a_root_inside_the_tree_names_the_right_one_instead_of_downloading(tmp_path: Path, given: str) -> None:
    voc = voc_dir(tmp_path)
    for name in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / name).mkdir(parents=True)

    with pytest.raises(DatasetUnavailableError, match=f"itself; .* Set data.root={tmp_path}\\.$"):
        prepare_voc(tmp_path / given, download=True, url=closed_port_url())
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("VOC2012")) == ["VOCdevkit/VOC2012"]


def test_incomplete_tree_in_the_way_is_reported_before_downloading(tmp_path: Path) -> None:
    (voc_dir(tmp_path) / "JPEGImages").mkdir(parents=True)

    with pytest.raises(DatasetUnavailableError, match="SegmentationClass"):
        prepare_voc(tmp_path, download=True, url=closed_port_url())


def add_parent_escape(tar: tarfile.TarFile) -> None:
    info = tarfile.TarInfo("../evil.txt")
    info.size = 4
    tar.addfile(info, io.BytesIO(b"evil"))


def add_absolute_path(tar: tarfile.TarFile) -> None:
    info = tarfile.TarInfo("/tmp/evil.txt")
    info.size = 4
    tar.addfile(info, io.BytesIO(b"evil"))


def add_escaping_symlink(tar: tarfile.TarFile) -> None:
    info = tarfile.TarInfo("VOCdevkit/VOC2012/JPEGImages/evil")
    info.type, info.linkname = tarfile.SYMTYPE, "../../../../evil.txt"
    tar.addfile(info)


@pytest.mark.parametrize(
    ("add_member", "member"),
    [
        (add_parent_escape, "../evil.txt"),
        (add_absolute_path, "/tmp/evil.txt"),
        (add_escaping_symlink, "VOCdevkit/VOC2012/JPEGImages/evil"),
    ],
)
def test_members_leaving_the_folder_are_refused(
    tmp_path: Path, add_member: Callable[[tarfile.TarFile], None], member: str
) -> None:
    tar = write_tar(tmp_path / "evil.tar", VOC_FILES, extra=add_member)
    root = tmp_path / "a" / "data"

    with pytest.raises(DatasetUnavailableError, match=re.escape(repr(member))):
        extract_tar(tar, root)

    assert not any(p.name == "evil.txt" for p in tmp_path.rglob("*"))
    assert not voc_dir(root).exists() and leftovers(root) == []


def test_tar_without_voc_tree_is_named(tmp_path: Path) -> None:
    tar = write_tar(tmp_path / "other.tar", {"something/else.txt": b"hello"})

    with pytest.raises(DatasetUnavailableError, match=re.escape(str(tar))):
        extract_tar(tar, tmp_path / "data")

    assert not voc_dir(tmp_path / "data").exists() and leftovers(tmp_path / "data") == []


def test_corrupt_tar_is_named(tmp_path: Path) -> None:
    tar = tmp_path / VOC_TAR_NAME
    tar.write_bytes(b"this is not a tar file at all" * 100)

    with pytest.raises(DatasetUnavailableError, match="corrupt") as info:
        prepare_voc(tmp_path, tar_path=tar, md5=None)

    assert str(tar) in str(info.value) and not voc_dir(tmp_path).exists() and leftovers(tmp_path) == []


def test_partial_download_resumes_with_range(
    tmp_path: Path, voc_tar: tuple[Path, str], serve: Callable[..., Server]
) -> None:
    tar, md5 = voc_tar
    data = tar.read_bytes()
    server = serve(tar.parent, RangeHandler)
    dest = tmp_path / "data" / VOC_TAR_NAME
    dest.parent.mkdir()
    half = len(data) // 2
    (dest.parent / (VOC_TAR_NAME + ".part")).write_bytes(data[:half])

    assert download_file(server.url(VOC_TAR_NAME), dest, md5=md5) == dest

    assert dest.read_bytes() == data and leftovers(dest.parent) == []
    assert server.requests == [f"bytes={half}-"]


class OtherRangeHandler(QuietHandler):
    """Answers a Range request with 206 but the bytes from 0 (a Content-Range that does not start where asked)."""

    def serve(self) -> None:
        data = Path(self.translate_path(self.path)).read_bytes()
        if self.headers.get("Range") is None:
            super().serve()
            return
        self.send_response(206)
        self.send_header("Content-Range", f"bytes 0-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_a_206_from_another_offset_restarts_the_download(
    tmp_path: Path, voc_tar: tuple[Path, str], serve: Callable[..., Server]
) -> None:
    tar, md5 = voc_tar
    data = tar.read_bytes()
    server = serve(tar.parent, OtherRangeHandler)
    dest = tmp_path / VOC_TAR_NAME
    half = len(data) // 2
    (tmp_path / (VOC_TAR_NAME + ".part")).write_bytes(data[:half])

    assert download_file(server.url(VOC_TAR_NAME), dest, md5=md5) == dest

    assert dest.read_bytes() == data and leftovers(tmp_path) == []  # not the half appended to the whole
    assert server.requests == [f"bytes={half}-", None]


def test_stale_part_is_restarted_when_range_is_not_supported(
    tmp_path: Path, voc_tar: tuple[Path, str], serve: Callable[..., Server]
) -> None:
    tar, md5 = voc_tar
    server = serve(tar.parent)  # answers 200 with the whole file whatever the Range header says
    dest = tmp_path / VOC_TAR_NAME
    (tmp_path / (VOC_TAR_NAME + ".part")).write_bytes(b"stale bytes from some other file" * 50)

    download_file(server.url(VOC_TAR_NAME), dest, md5=md5)

    assert dest.read_bytes() == tar.read_bytes() and leftovers(tmp_path) == []
    assert server.requests[0] is not None  # it did ask to resume


def test_part_longer_than_the_file_is_restarted(
    tmp_path: Path, voc_tar: tuple[Path, str], serve: Callable[..., Server]
) -> None:
    tar, md5 = voc_tar
    server = serve(tar.parent, RangeHandler)
    dest = tmp_path / VOC_TAR_NAME
    (tmp_path / (VOC_TAR_NAME + ".part")).write_bytes(b"x" * (tar.stat().st_size + 10))

    download_file(server.url(VOC_TAR_NAME), dest, md5=md5)

    assert dest.read_bytes() == tar.read_bytes()
    assert server.requests == [f"bytes={tar.stat().st_size + 10}-", None]


class DroppingHandler(RangeHandler):
    """Like RangeHandler, but the first answer announces the whole file and sends only half of it."""

    def serve(self) -> None:
        if len(self.server.requests) > 1:  # type: ignore[attr-defined]
            super().serve()
            return
        data = Path(self.translate_path(self.path)).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])


def test_dropped_connection_keeps_part_and_next_call_resumes(
    tmp_path: Path, voc_tar: tuple[Path, str], serve: Callable[..., Server]
) -> None:
    tar, md5 = voc_tar
    data = tar.read_bytes()
    server = serve(tar.parent, DroppingHandler)
    root = tmp_path / "data"
    part = root / (VOC_TAR_NAME + ".part")

    with pytest.raises(DatasetUnavailableError, match="connection closed") as info:
        prepare_voc(root, download=True, url=server.url(VOC_TAR_NAME), md5=md5)
    assert str(part) in str(info.value) and part.read_bytes() == data[: len(data) // 2]
    assert not voc_dir(root).exists()

    assert is_voc_complete(prepare_voc(root, download=True, url=server.url(VOC_TAR_NAME), md5=md5))
    assert server.requests == [None, f"bytes={len(data) // 2}-"]


def test_disk_full_during_download_names_the_folder(
    tmp_path: Path, voc_tar: tuple[Path, str], serve: Callable[..., Server], monkeypatch: pytest.MonkeyPatch
) -> None:
    import builtins
    import errno

    tar, md5 = voc_tar
    server = serve(tar.parent)
    root = tmp_path / "data"
    real_open = builtins.open

    class FullDisk:
        def __init__(self, fh) -> None:
            self.fh = fh

        def write(self, block: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.fh.close()

    def fake_open(file, mode="r", *args, **kwargs):
        fh = real_open(file, mode, *args, **kwargs)
        return FullDisk(fh) if str(file).endswith(".part") and "b" in mode and "r" not in mode else fh

    monkeypatch.setattr(builtins, "open", fake_open)
    with pytest.raises(DatasetUnavailableError) as info:
        prepare_voc(root, download=True, url=server.url(VOC_TAR_NAME), md5=md5)
    assert str(root) in str(info.value) and "No space left" in str(info.value)
    assert not voc_dir(root).exists()


def test_unwritable_folder_is_named(tmp_path: Path, voc_tar: tuple[Path, str], serve: Callable[..., Server]) -> None:
    tar, md5 = voc_tar
    server = serve(tar.parent)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")  # a folder below a file cannot be created, even by root
    with pytest.raises(DatasetUnavailableError) as info:
        prepare_voc(blocker / "data", download=True, url=server.url(VOC_TAR_NAME), md5=md5)
    assert str(blocker) in str(info.value)
