"""Files that matter: atomic writes and a lock on an output folder."""
import fcntl
import os
import tempfile
import time

from util.errors import InputError

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path, write_fn):
    """Call ``write_fn(tmp_path)``, flush the file to disk, then rename onto ``path``: readers never see
    a partial file, also after a crash of the machine (without the flush a file system may show the new
    name with no data). The temporary file sits in the same folder, named ``.<name>.<random>.tmp``
    with ``<name>`` cut to 100 characters, so a long file name never makes it exceed the file
    system's name limit."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=temporary_prefix(path), suffix='.tmp')
    try:
        _try_lock(fd)  # held while writing: remove_stale_temporaries leaves the file alone
        write_fn(tmp)
        os.fsync(fd)    # the file's data, whichever descriptor wrote it
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes files private; give them the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    finally:
        os.close(fd)


def _try_lock(fd):
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:  # a file system without locks: writing matters more (its temporaries are then never swept)
        pass


def temporary_prefix(path):
    """Start of the names of ``atomic_write``'s temporary files for ``path`` (in the same folder)."""
    return '.' + os.path.basename(path)[:100] + '.'


def remove_stale_temporaries(paths, min_age_s=60.0):
    """Remove the temporary files that ``atomic_write`` calls for ``paths`` left behind (a run killed
    while writing), but only those no process is writing any more: a writer holds a lock on its file
    before writing into it, so another process's write in progress is never touched, and a file with
    data in it that nobody locks is a dead writer's, whatever its age (a rerun right after a kill
    removes it). An empty one is kept until it is ``min_age_s`` old (its writer may not hold the lock
    yet). Returns the paths removed. One folder listing per folder, whatever the number of paths."""
    prefixes = {}
    for p in paths:
        prefixes.setdefault(os.path.dirname(os.path.abspath(p)), set()).add(temporary_prefix(p))
    removed = []
    for folder, starts in prefixes.items():
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        for name in names:
            if not (name.endswith('.tmp') and name.startswith('.')) or name[:name.rfind('.', 0, -4) + 1] not in starts:
                continue
            tmp = os.path.join(folder, name)
            try:
                fd = os.open(tmp, os.O_RDONLY)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                st = os.fstat(fd)
                if st.st_size > 0 or time.time() - st.st_mtime >= min_age_s:
                    os.remove(tmp)
                    removed.append(tmp)
            except OSError:  # locked by its writer, gone, or a file system without locks: leave it
                pass
            finally:
                os.close(fd)
    return removed


def atomic_write_text(path, text):
    """Write a text file atomically."""
    def write(tmp):
        with open(tmp, 'w') as f:
            f.write(text)
    atomic_write(path, write)


class FolderLock:
    """Exclusive lock on an output folder (``<folder>/.lock``, ``flock``), held until ``release()`` or
    the process ends (also when it is killed). A second run on the same folder gets an ``InputError``
    instead of silently mixing its files with the first run's."""

    def __init__(self, folder, what='run'):
        self.path = os.path.join(folder, '.lock')
        try:
            os.makedirs(folder, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
        except OSError as e:
            raise InputError(f'{folder}: cannot create or write the output folder ({e.strerror or e})') from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 200, 0).decode(errors='replace').strip() or 'another process'
            os.close(self.fd)
            raise InputError(f'{folder}: another {what} is using this output folder ({holder}); '
                             f'wait for it or choose another output folder') from None
        except OSError:   # a file system without locks: run unlocked rather than not at all
            pass
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f'pid {os.getpid()}'.encode(), 0)

    def release(self):
        if self.fd is not None:
            os.close(self.fd)     # closing the file drops the lock (if the file system gave one)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
