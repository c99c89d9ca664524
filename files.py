"""
files.py: the file plumbing that prepare.py, tokenizer.py, checkpoint.py and train.py share.

    write_atomically(path, write)   a file that is either the old one or the new one, never half of either
    download(url, path, hint)       a resumable, size- and sha256-checked download, with progress on stderr
    CACHE_DIR                       where downloaded vocabularies and weights are kept
                                    (~/.cache/gpt-from-scratch; set GPT_FROM_SCRATCH_CACHE to move it)
"""

import hashlib
import os
import sys

CACHE_DIR = os.environ.get("GPT_FROM_SCRATCH_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "gpt-from-scratch"))


def write_atomically(path, write):
    """Call write(f) on a temporary file beside `path`, flush it to disk, then rename it over `path`:
    a reader (or a crash) sees the old file or the new one, never half of one."""
    tmp = f"{path}.{os.getpid()}.tmp"  # per process: two writers sharing a disk never write one temporary
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if hasattr(os, "O_DIRECTORY"):  # POSIX: flush the directory entry too, so the rename survives a power cut
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_DIRECTORY)
        os.fsync(fd)
        os.close(fd)


def download(url, path, hint, sha256=None):
    """Fetch `url` into `path` with progress on stderr. An interrupted download resumes from its .part file;
    the size is checked against the server's, and the sha256 too when given. Offline: one line naming the URL
    and `hint` (what to do instead)."""
    import requests  # only needed here

    part = f"{path}.part"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
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
        raise SystemExit(f"error: could not download {url} ({type(e).__name__}); {hint}")
    if total and have != total:
        raise SystemExit(f"error: the download of {url} stopped at {have:,} of {total:,} bytes; run again to resume")
    if sha256:
        with open(part, "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() != sha256:
                os.remove(part)
                raise SystemExit(f"error: the file at {url} is not the expected one (sha256 mismatch); {hint}")
    os.replace(part, path)
    return path
