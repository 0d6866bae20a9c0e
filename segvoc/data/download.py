"""Find, download and extract Pascal VOC2012 into ``<root>/VOCdevkit/VOC2012``.

``prepare_voc`` is the entry point. Everything that can go wrong (no network, a bad checksum, a corrupt or
hostile tar, a full disk) ends in a ``DatasetUnavailableError`` whose message says what happened and what to
do about it.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import posixpath
import re
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from segvoc.data.voc import LAYOUT_DIRS
from segvoc.errors import SegvocError

log = logging.getLogger(__name__)

VOC_URL = "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar"
VOC_MD5 = "6cd6e144f989b92b3379bac3b3de84fd"
VOC_TAR_NAME = "VOCtrainval_11-May-2012.tar"

VOC_MEMBER = "VOCdevkit/VOC2012"  # where the tree sits inside the tar, and under the data root
REQUIRED_DIRS = LAYOUT_DIRS
READ_CHUNK = 1 << 16
# The "data" filter (Python >= 3.10.12) also drops special files and unsafe permissions; our own member check
# runs first either way so that the error names the member.
TAR_FILTER: dict[str, str] = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}


class DatasetUnavailableError(SegvocError):
    """The dataset is not on disk and could not be obtained; the message is one paragraph on what to do."""


def voc_dir(root: str | Path) -> Path:
    """The VOC2012 folder for a data root: ``<root>/VOCdevkit/VOC2012``."""
    return Path(root) / VOC_MEMBER


def _missing_dirs(voc: Path) -> list[str]:
    return [name for name in REQUIRED_DIRS if not (voc / name).is_dir()]


def is_voc_complete(voc: Path) -> bool:
    """True when ``voc`` has the ``JPEGImages``, ``SegmentationClass`` and ``ImageSets/Segmentation`` dirs."""
    return not _missing_dirs(Path(voc))


def root_too_deep(root: str | Path) -> tuple[str, Path] | None:
    """``(folder, root meant)`` when ``root`` is itself a complete ``VOC2012`` folder or the ``VOCdevkit`` folder
    holding one (a data root given one or two levels too deep), else None."""
    root = Path(root)
    for given, folder, meant in ((root, "VOC2012", root.parent.parent), (root / "VOC2012", "VOCdevkit", root.parent)):
        if is_voc_complete(given):
            return folder, meant
    return None


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    """The hex MD5 digest of the file at ``path``, read ``chunk`` bytes at a time."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _ways_out(tar_name: str) -> str:
    return (
        "point data.root at a folder that already holds VOCdevkit/VOC2012, or download "
        f"{tar_name} by hand (from any machine or mirror) and pass data.tar_path=/path/to/{tar_name}"
    )


def _network_error(
    url: str, reason: object, dest: Path, part: Path, ways_out: str | None = None
) -> DatasetUnavailableError:
    kept = part.stat().st_size if part.is_file() else 0
    resume = f"The {kept} bytes received so far stay in {part} for the next run to resume. " if kept else ""
    return DatasetUnavailableError(
        f"Could not download {url} ({reason}). {resume}"
        f"If this machine cannot reach that server, either {ways_out or _ways_out(dest.name)}."
    )


def _disk_error(folder: Path, exc: OSError) -> DatasetUnavailableError:
    return DatasetUnavailableError(
        f"Could not write to {folder} ({exc.strerror or exc}). Make that folder writable or free some "
        "space there (Pascal VOC2012 needs about 4 GB while the tar is extracted, 2 GB after), or point "
        "data.root at another folder."
    )


def _open(
    url: str, offset: int, timeout: float, dest: Path, part: Path, ways_out: str | None = None
) -> http.client.HTTPResponse | None:
    """Open ``url``, asking for the bytes from ``offset`` on; None when the server cannot serve that range."""
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            return None
        reason = f"the server answered HTTP {exc.code} {exc.reason}"
        raise _network_error(url, reason, dest, part, ways_out) from exc
    except (OSError, http.client.HTTPException) as exc:
        raise _network_error(url, getattr(exc, "reason", None) or exc, dest, part, ways_out) from exc
    if offset and response.status == 206:
        match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
        if match is None or int(match.group(1)) != offset:
            response.close()
            return None
    return response


def _read_blocks(
    response: http.client.HTTPResponse, url: str, dest: Path, part: Path, ways_out: str | None = None
) -> Iterator[bytes]:
    """The response body in blocks; a network failure while reading becomes a DatasetUnavailableError."""
    while True:
        try:
            block = response.read(READ_CHUNK)
        except (OSError, http.client.HTTPException) as exc:
            raise _network_error(url, getattr(exc, "reason", None) or exc, dest, part, ways_out) from exc
        if not block:
            return
        yield block


def download_file(
    url: str, dest: Path, md5: str | None = None, timeout: float = 30.0, ways_out: str | None = None
) -> Path:
    """Download ``url`` to ``dest`` with a progress bar and return ``dest``.

    Bytes go to ``<dest>.part``, which a later call resumes with an HTTP Range request when the server
    supports it (and restarts from scratch when it does not). The ``.part`` file is checked against ``md5``
    (when given) and only then renamed to ``dest``, so an existing ``dest`` is always a finished download.
    Raises ``DatasetUnavailableError`` on network and disk errors (the ``.part`` file is kept for resuming)
    and on a checksum mismatch (the ``.part`` file is deleted). ``ways_out`` replaces the VOC-specific advice
    those messages end with (what to do when the server cannot be reached), e.g. for another dataset's file.
    """
    dest = Path(dest)
    part = dest.with_suffix(dest.suffix + ".part")
    offset = part.stat().st_size if part.is_file() else 0
    response = _open(url, offset, timeout, dest, part, ways_out)
    if response is None:  # the server cannot continue this .part (stale, or already complete): start over
        log.info("Cannot resume %s from byte %d; downloading it again from the start", part, offset)
        part.unlink()
        return download_file(url, dest, md5, timeout, ways_out)
    try:  # only once the server answers: a download that cannot start leaves no (mistyped) folder behind
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        response.close()
        raise _disk_error(dest.parent, exc) from exc

    with response:
        resumed = offset > 0 and response.status == 206
        if offset and not resumed:
            log.info("%s does not support resuming; downloading %s again from the start", url, dest.name)
        done = offset if resumed else 0
        length = response.headers.get("Content-Length")
        total = done + int(length) if length and length.isdigit() else None
        log.info("Downloading %s to %s", url, dest)
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
        )
        # Without a terminal (CI, pytest, redirected logs) rich skips live updates and prints the final bar.
        try:
            with open(part, "ab" if resumed else "wb") as fh, Progress(*columns) as progress:
                task = progress.add_task(dest.name, total=total, completed=done)
                for block in _read_blocks(response, url, dest, part, ways_out):
                    fh.write(block)
                    done += len(block)
                    progress.update(task, completed=done)
        except OSError as exc:
            raise _disk_error(part.parent, exc) from exc

    # http.client returns b"" rather than raising when the connection drops before Content-Length bytes came.
    if total is not None and done < total:
        raise _network_error(url, f"the connection closed after {done} of {total} bytes", dest, part, ways_out)
    if md5 is not None:
        got = md5sum(part)
        if got != md5.lower():
            part.unlink(missing_ok=True)
            raise DatasetUnavailableError(
                f"The file downloaded from {url} did not match its checksum (expected MD5 {md5}, got {got}), "
                "so it was deleted. The transfer was corrupted or the server sent a different file (for "
                f"example an error page). Run again to retry; if it keeps failing, {ways_out or _ways_out(dest.name)}."
            )
    try:
        os.replace(part, dest)
    except OSError as exc:
        raise _disk_error(dest.parent, exc) from exc
    return dest


def _unsafe_reason(member: tarfile.TarInfo) -> str | None:
    """Why extracting ``member`` could write outside the extraction folder, or None when it cannot."""
    name = member.name
    if posixpath.isabs(name) or ".." in PurePosixPath(name).parts:
        return "has a path outside the extraction folder"
    if member.issym() or member.islnk():
        # symlink targets are relative to the member's folder, hard link targets to the archive root
        base = posixpath.dirname(name) if member.issym() else ""
        target = posixpath.normpath(posixpath.join(base, member.linkname))
        if posixpath.isabs(member.linkname) or target == ".." or target.startswith("../"):
            return f"links to {member.linkname!r}, outside the extraction folder"
    if member.isdev() or member.isfifo():
        return "is a device or pipe"
    return None


def check_member(
    member: tarfile.TarInfo, tar_path: Path, what: str = "Pascal VOC tar", tar_name: str = VOC_TAR_NAME
) -> None:
    """Raise ``DatasetUnavailableError`` naming ``member`` of ``tar_path`` when extracting it could write outside the
    extraction folder (an absolute or ``..`` path, a link leading outside, a device or pipe); ``what`` names the
    genuine archive in the message and ``tar_name`` the file to get again."""
    reason = _unsafe_reason(member)
    if reason is not None:
        raise DatasetUnavailableError(
            f"Refusing to extract {tar_path}: its member {member.name!r} {reason}. A genuine {what} never contains "
            f"such a member; delete this file and get {tar_name} again from the official site or a mirror you trust."
        )


def _in_voc_tree(member: tarfile.TarInfo) -> bool:
    name = posixpath.normpath(member.name)
    return name == VOC_MEMBER or name.startswith(VOC_MEMBER + "/")


def _ensure_replaceable(voc: Path) -> None:
    """Raise when ``voc`` holds something a freshly extracted tree cannot replace (an empty folder it can)."""
    if not voc.exists() or (voc.is_dir() and not any(voc.iterdir())):
        return
    raise DatasetUnavailableError(
        f"{voc} already exists but is not a complete VOC2012 tree (missing: "
        f"{', '.join(_missing_dirs(voc))}), so a new copy cannot be put in its place. Move it away or delete "
        "it and run again, or point data.root at another folder."
    )


def extract_tar(tar_path: Path, dest_root: Path) -> None:
    """Extract the ``VOCdevkit/VOC2012`` tree of ``tar_path`` to ``<dest_root>/VOCdevkit/VOC2012``.

    The tree is extracted into a temporary ``dest_root/.extract-*`` folder (always removed afterwards) and
    moved into place only once complete, so an interrupted extraction never leaves a tree that
    ``is_voc_complete`` accepts. Members outside ``VOCdevkit/VOC2012`` are skipped. Raises
    ``DatasetUnavailableError`` for an unreadable tar, a tar without a complete VOC2012 tree, a member with an
    absolute or ``..`` path or a link leading outside, an incomplete VOC2012 folder already in the way, and
    disk errors.
    """
    tar_path, dest_root = Path(tar_path), Path(dest_root)
    target = voc_dir(dest_root)
    _ensure_replaceable(target)
    try:
        dest_root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest_root))
    except OSError as exc:
        raise _disk_error(dest_root, exc) from exc

    try:
        log.info("Extracting %s into %s (a few minutes for the full VOC2012 tar)", tar_path, dest_root)
        try:
            with tarfile.open(tar_path) as tar:
                members = tar.getmembers()
                for member in members:
                    check_member(member, tar_path)
                tar.extractall(tmp, members=[m for m in members if _in_voc_tree(m)], **TAR_FILTER)
        except tarfile.TarError as exc:
            raise DatasetUnavailableError(
                f"Could not read {tar_path} as a tar file; it is probably truncated or corrupt. Delete it "
                f"and download {VOC_TAR_NAME} again."
            ) from exc
        except OSError as exc:
            raise _disk_error(dest_root, exc) from exc

        extracted = tmp / VOC_MEMBER
        if not is_voc_complete(extracted):
            raise DatasetUnavailableError(
                f"The tar file {tar_path} does not contain a complete {VOC_MEMBER} tree (with "
                f"{', '.join(REQUIRED_DIRS)}). Check that it is {VOC_TAR_NAME}: the test-set tar and the SBD "
                "augmented set are different files."
            )
        try:
            target.parent.mkdir(exist_ok=True)
            os.replace(extracted, target)
        except OSError as exc:
            raise _disk_error(target.parent, exc) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prepare_voc(
    root: str | Path,
    download: bool = False,
    tar_path: str | Path | None = None,
    url: str = VOC_URL,
    md5: str | None = VOC_MD5,
) -> Path:
    """Make sure ``<root>/VOCdevkit/VOC2012`` is complete and return it.

    In order: an existing complete tree is returned untouched; else ``tar_path`` (checked against ``md5``
    when that is not None, and never modified) is extracted; else, when ``download`` is true, the tar is
    downloaded to ``<root>/VOC_TAR_NAME`` (or a finished, checksum-matching one there is reused), extracted,
    and deleted to save 2 GB. Otherwise, and whenever a step fails, raises ``DatasetUnavailableError``
    naming the ways out.
    """
    root = Path(root)
    voc = voc_dir(root)
    if is_voc_complete(voc):
        log.info("Using Pascal VOC2012 at %s", voc)
        return voc
    too_deep = root_too_deep(root)  # without this check, a download would nest a second tree inside it
    if too_deep is not None:
        folder, meant = too_deep
        raise DatasetUnavailableError(
            f"data.root={root} is the {folder} folder itself; data.root names the folder that holds "
            f"VOCdevkit/VOC2012. Set data.root={meant}."
        )

    if tar_path is not None:
        tar = Path(tar_path)
        if not tar.is_file():
            raise DatasetUnavailableError(
                f"data.tar_path points at {tar}, which is not a file. Pass the path of the downloaded "
                f"{VOC_TAR_NAME}, or drop data.tar_path and set data.download=true to download it."
            )
        if md5 is not None:
            got = md5sum(tar)
            if got != md5.lower():
                raise DatasetUnavailableError(
                    f"The tar file {tar} (data.tar_path) does not match the checksum of {VOC_TAR_NAME} "
                    f"(expected MD5 {md5}, got {got}); it is probably an incomplete download or a different "
                    "file. It was left untouched. Download it again, or set data.download=true and drop "
                    "data.tar_path."
                )
        extract_tar(tar, root)
        return voc

    if download:
        _ensure_replaceable(voc)  # before spending time on a 2 GB download that could not be put in place
        tar = root / VOC_TAR_NAME
        if tar.is_file() and (md5 is None or md5sum(tar) == md5.lower()):
            log.info("Reusing the finished download %s", tar)
        else:
            download_file(url, tar, md5)
        extract_tar(tar, root)
        tar.unlink()
        return voc

    found = f" (the folder exists but lacks {', '.join(_missing_dirs(voc))})" if voc.is_dir() else ""
    raise DatasetUnavailableError(
        f"Pascal VOC2012 was not found under {voc}{found}. Either set data.download=true to download it "
        f"(about 2 GB) into {root}, point data.root at the folder that holds VOCdevkit/VOC2012, or pass an "
        f"already downloaded tar with data.tar_path=/path/to/{VOC_TAR_NAME}."
    )
