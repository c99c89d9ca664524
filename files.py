"""
files.py: the file plumbing that prepare.py, tokenizer.py, checkpoint.py and train.py share.

    write_atomically(path, write)   a file that is either the old one or the new one, never half of either
    write_together({path: write})   several files, all old or all new
    make_folder(path)               os.makedirs, with a one-line error when the file system says no
    remove_stale_temporaries(dir)   the temporaries of writers that were killed before they could rename them
    download(url, path, hint)       a resumable, size- and sha256-checked download, with progress on stderr
    CACHE_DIR                       where downloaded vocabularies and weights are kept
                                    (~/.cache/gpt-from-scratch; set GPT_FROM_SCRATCH_CACHE to move it)

A file system that says no (a full disk, a read-only folder) ends the program with one line naming the path and
the reason, and leaves no partial file behind.
"""

import errno
import hashlib
import os
import re
import sys

from configurator import UserError

CACHE_DIR = os.environ.get("GPT_FROM_SCRATCH_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "gpt-from-scratch"))

ADVICE = {  # what to do when the operating system refuses, by errno
    errno.ENOSPC: "free some space, or write somewhere else",
    errno.EDQUOT: "free some space, or write somewhere else",
    errno.EFBIG: "the file is larger than this system allows (see ulimit -f); write somewhere else",
    errno.EROFS: "choose a folder you can write to",
    errno.EACCES: "choose a folder you can write to",
    errno.EPERM: "choose a folder you can write to",
    errno.EEXIST: "a file stands where a folder should be; move it or choose another folder",
    errno.ENOTDIR: "a file stands where a folder should be; move it or choose another folder",
}


def os_error(doing, path, e):
    """The one-line error for an OSError `e` met while `doing` (write, create, read) `path`."""
    reason = os.strerror(e.errno) if e.errno else str(e)
    return UserError(f"cannot {doing} {path}: {reason}; {ADVICE.get(e.errno, 'check the path and try again')}")


class RecordedWrites:
    """A file whose write() remembers the OSError it raised: torch.save reports one as a bare RuntimeError."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self.f.flush()


def write_atomically(path, write):
    """Call write(f) on a temporary file beside `path`, flush it to disk, then rename it over `path`: a reader
    (or a crash) sees the old file or the new one, never half of one. If anything fails, `path` keeps what it
    held and no temporary stays behind."""
    write_together({path: write})


def write_together(writes):
    """write_atomically for several files, {path: write}, as one: every file goes to its temporary first, and
    only when all are on disk are they renamed into place, so a failure part of the way changes none of them."""
    temporaries = {}
    try:
        for path, write in writes.items():
            temporaries[path] = tmp = f"{path}.{os.getpid()}.tmp"  # per process: writers never share one
            with open(tmp, "wb") as f:
                out = RecordedWrites(f)
                try:
                    write(out)
                except RuntimeError:  # torch.save's way of saying that a write failed
                    if out.error is None:
                        raise
                    raise out.error
                f.flush()
                os.fsync(f.fileno())
        for path, tmp in temporaries.items():
            os.replace(tmp, path)
    except BaseException as e:  # an error, or Ctrl-C
        for tmp in temporaries.values():
            if os.path.exists(tmp):
                os.remove(tmp)
        if isinstance(e, OSError):
            raise os_error("write", path, e) from None
        raise
    if hasattr(os, "O_DIRECTORY"):  # POSIX: flush the directory entries too, so the renames survive a power cut
        for folder in {os.path.dirname(os.path.abspath(path)) for path in writes}:
            fd = os.open(folder, os.O_DIRECTORY)
            os.fsync(fd)
            os.close(fd)


def make_folder(path):
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise os_error("create the folder", path, e) from None


def remove_stale_temporaries(folder):
    """Delete the `name.PID.tmp` files in `folder` whose writing process is gone (killed mid-write): they are
    never renamed into place, so nothing reads them. A live process's temporary, or another user's, stays."""
    if os.name != "posix" or not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        m = re.fullmatch(r".+\.(\d+)\.tmp", name)
        if not m or int(m[1]) == os.getpid():
            continue
        try:
            os.kill(int(m[1]), 0)  # signal 0 only asks whether the process exists
        except ProcessLookupError:
            try:
                os.remove(os.path.join(folder, name))
            except OSError:
                pass
        except (PermissionError, OverflowError):  # alive, as another user; or no such pid at all: leave it
            pass


def download(url, path, hint, sha256=None):
    """Fetch `url` into `path` with progress on stderr. An interrupted download resumes from its .part file;
    the size is checked against the server's, and the sha256 too when given. Offline: one line naming the URL
    and `hint` (what to do instead)."""
    import requests  # only needed here

    part = f"{path}.part"
    make_folder(os.path.dirname(os.path.abspath(path)))
    have = os.path.getsize(part) if os.path.exists(part) else 0
    try:
        with requests.get(url, headers={"Range": f"bytes={have}-"} if have else {}, stream=True, timeout=30) as r:
            if r.status_code == 416:  # the .part file is not a prefix of this file: start over
                os.remove(part)
                return download(url, path, hint, sha256)
            r.raise_for_status()
            if r.status_code != 206:  # the server sent the whole file, not the rest of it
                have = 0
            total = have + int(r.headers.get("Content-Length", 0))
            shown = 0
            with open(part, "ab" if have else "wb") as f:
                for chunk in r.iter_content(chunk_size=1 << 20):
                    f.write(chunk)
                    have += len(chunk)
                    if total > 1e6 and (have - shown > total / 20 or have == total):
                        print(f"  {os.path.basename(path)}: {have / 1e6:,.1f} of {total / 1e6:,.1f} MB", file=sys.stderr)
                        shown = have
    except requests.RequestException as e:
        raise UserError(f"could not download {url} ({type(e).__name__}); {hint}")
    except OSError as e:  # the .part file stays: the next run resumes from it
        raise os_error("write", part, e) from None
    if total and have != total:
        raise UserError(f"the download of {url} stopped at {have:,} of {total:,} bytes; run again to resume")
    if sha256:
        with open(part, "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() != sha256:
                os.remove(part)
                raise UserError(f"the file at {url} is not the expected one (sha256 mismatch); {hint}")
    os.replace(part, path)
    return path
