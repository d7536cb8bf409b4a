"""Models on the Hugging Face Hub, through ``huggingface_hub`` (its API, cache layout, tokens,
endpoint and retries; none of that is written here).

A reference ``org/name[@revision]`` that names no local path is first resolved to a
*stand-in folder*: copies of the repo's small files (config, index, tokenizer; downloaded
into the cache) and, for every safetensors file, a sparse file of the same size holding only
its header, fetched with two range requests. The engine opens and validates the stand-in
like any checkpoint, so the whole merge is checked and planned before a weight byte is
downloaded. Then only the files that hold tensors the merge reads are downloaded into the
standard cache, and the merge opens the cache's snapshot folder, leaving out the shards it
did not download (``Checkpoint::open_partial``). Offline, the cached snapshot is used as it is.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import struct
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import CheckpointError, MergexIOError, ModelNotFoundError

__all__ = ["HubSession", "hub_session", "parse_ref"]

HUB_REF = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")
"""``org/name`` with an optional ``@revision`` (branch, tag or commit sha)."""

# Small files a merge uses besides the weights: read while planning, copied to the output.
_SMALL = (
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "adapter_config.json",
)
_PICKLE = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# A safetensors header larger than this is refused (the format's own readers use 100 MB).
_MAX_HEADER = 100_000_000


def parse_ref(ref: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` of a Hub reference, or None when ``ref`` is not one."""
    m = HUB_REF.match(ref)
    return (m["repo"], m["rev"]) if m else None


def _endpoint() -> str | None:
    return os.environ.get("HF_ENDPOINT") or None


def _cache_dir() -> Path:
    from .models import hf_cache_dir

    return hf_cache_dir()


def _env_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


@dataclass
class HubModel:
    """One Hub reference as resolved for this merge."""

    repo_id: str
    revision: str
    sha: str
    folder: Path
    """The stand-in folder (headers only) the merge is planned on."""
    snapshot: Path
    """The cache's snapshot folder of the revision, which the merge reads."""
    sizes: dict[str, int] = field(default_factory=dict)
    """Every safetensors file of the repo and its size."""
    pending: set[str] = field(default_factory=set)
    """Safetensors files not downloaded yet (their stand-ins hold only the header)."""

    @property
    def pinned(self) -> str:
        """``org/name@sha``: the reference that names exactly these files."""
        return f"{self.repo_id}@{self.sha}"


def _hub_error(repo: str, revision: str, e: Exception) -> Exception:
    """A one-line error for a failed Hub request."""
    from huggingface_hub import errors

    what = f"model '{repo}' (revision {revision})"
    if isinstance(e, errors.GatedRepoError):
        return ModelNotFoundError(f"{what}: the repo is gated and this token has no access (set HF_TOKEN)")
    if isinstance(e, errors.RepositoryNotFoundError):
        return ModelNotFoundError(f"{what}: no such repo on the Hub (or private, and HF_TOKEN has no access)")
    if isinstance(e, errors.RevisionNotFoundError):
        return ModelNotFoundError(f"{what}: no such revision on the Hub")
    if isinstance(e, errors.LocalEntryNotFoundError):
        return ModelNotFoundError(f"{what}: not in the Hugging Face cache at {_cache_dir()} and offline")
    if isinstance(e, errors.EntryNotFoundError):
        return ModelNotFoundError(f"{what}: a file is missing on the Hub ({str(e).splitlines()[0]})")
    status = getattr(getattr(e, "response", None), "status_code", None)
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    return MergexIOError(f"{what}: Hub request failed{f' (HTTP {status})' if status else ''}: {first}")


class HubSession:
    """The Hub references of one merge or plan, resolved to stand-in folders in ``workdir``
    until :meth:`download` has fetched what the merge reads, and to the cache's snapshot
    folders after."""

    def __init__(self, workdir: Path, offline: bool) -> None:
        self.workdir = workdir
        self.offline = offline or _env_offline()
        self.fetched = self.offline
        self.models: dict[str, HubModel] = {}
        self.cached_partial: set[Path] = set()
        """Cached snapshots (offline) missing some shards: opened partially."""

    @functools.cached_property
    def api(self) -> Any:
        """huggingface_hub's client, imported when a Hub reference is first resolved."""
        from huggingface_hub import HfApi

        return HfApi(endpoint=_endpoint())

    def is_partial(self, path: Path) -> bool:
        """Whether ``path`` is a snapshot folder this session opens partially."""
        if path in self.cached_partial:
            return True
        return self.fetched and any(m.snapshot == path for m in self.models.values())

    def resolve(self, ref: str) -> Path:
        """The folder to open for the Hub reference ``ref``."""
        if ref in self.models:
            m = self.models[ref]
            return m.snapshot if self.fetched else m.folder
        parsed = parse_ref(ref)
        assert parsed is not None
        repo, revision = parsed[0], parsed[1] or "main"
        try:
            # The cache first (a complete snapshot of the revision), else the Hub.
            model = self._cached(repo, revision, required=self.offline) or self._online(repo, revision)
        except (ModelNotFoundError, CheckpointError, MergexIOError):
            raise
        except Exception as e:  # huggingface_hub's and the network's errors
            raise _hub_error(repo, revision, e) from None
        self.models[ref] = model
        return model.snapshot if self.fetched else model.folder

    def _cached(self, repo: str, revision: str, required: bool) -> HubModel | None:
        """The cached snapshot of ``repo`` at ``revision`` when it holds the whole checkpoint
        (every shard its index lists), used as it is; offline (``required``), whatever is
        cached (a partial download's missing shards are then left out)."""
        from huggingface_hub import errors, snapshot_download

        try:
            got = snapshot_download(repo, revision=revision, local_files_only=True, cache_dir=_cache_dir())
        except errors.LocalEntryNotFoundError:
            if required:
                raise
            return None
        folder = Path(str(got))
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                shards = set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values())
            except (OSError, ValueError, AttributeError):
                shards = {""}
            complete = all((folder / s).is_file() for s in shards)
        else:
            complete = any(folder.glob("*.safetensors"))
        if not complete and not required:
            return None
        if not index.is_file() and not complete:
            # Only the small files (from a plan): no weights to read offline.
            raise errors.LocalEntryNotFoundError(f"no safetensors file of {repo} is cached")
        model = HubModel(repo, revision, folder.name, folder, folder)
        self.cached_partial = self.cached_partial | ({folder} if not complete else set())
        return model

    def _online(self, repo: str, revision: str) -> HubModel:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        info = self.api.model_info(repo, revision=revision, files_metadata=True)
        siblings = info.siblings or []
        names = [s.rfilename for s in siblings]
        for n in names:
            p = PurePosixPath(n)
            if p.is_absolute() or ".." in p.parts or "\\" in n:
                raise CheckpointError(f"model '{repo}': the Hub lists a file with an unsafe name ({n!r})")
        sizes = {s.rfilename: int(s.size or 0) for s in siblings if s.rfilename.endswith(".safetensors")}
        if not sizes:
            pickles = [n for n in names if n.endswith(_PICKLE)]
            what = f"only pickle weights ({', '.join(pickles[:3])})" if pickles else "no safetensors weights"
            raise CheckpointError(
                f"model '{repo}' (revision {revision}): the repo has {what}; mergex reads safetensors only"
            )
        folder = self.workdir / repo.replace("/", "--")
        folder.mkdir(parents=True, exist_ok=True)
        # The snapshot folder is learnt from the paths the library hands back (until then,
        # the stand-in: nothing is read from a snapshot before a file of it is there).
        model = HubModel(repo, revision, info.sha or revision, folder, folder, sizes)
        for k, n in enumerate(n for n in names if n in _SMALL):
            # The first by the revision asked for: the cache then maps it (a branch) to the
            # commit, for offline use; everything else by that commit, even if the branch
            # moves meanwhile.
            rev = revision if k == 0 else model.sha
            path = Path(hf_hub_download(repo, n, revision=rev, cache_dir=_cache_dir(), endpoint=_endpoint()))
            model.snapshot = _snapshot_of(path, n)
            model.sha = model.snapshot.name
            shutil.copyfile(path, folder / n)
        for n, size in sizes.items():
            self._stand_in(repo, model.sha, n, size, folder / n)
            cached = try_to_load_from_cache(repo, n, cache_dir=_cache_dir(), revision=model.sha)
            if isinstance(cached, str) and Path(cached).stat().st_size == size:
                model.snapshot = _snapshot_of(Path(cached), n)
            else:
                model.pending.add(n)
        return model

    def _stand_in(self, repo: str, sha: str, name: str, size: int, dest: Path) -> None:
        """A sparse file of ``size`` bytes holding only the header of ``name``."""
        from huggingface_hub import hf_hub_url, hf_raise_for_status
        from huggingface_hub.utils import build_hf_headers, http_backoff  # type: ignore[attr-defined]

        url = hf_hub_url(repo, name, revision=sha, endpoint=_endpoint())
        headers = build_hf_headers()

        def fetch(start: int, end: int) -> bytes:
            ranged = {**headers, "Range": f"bytes={start}-{end - 1}"}
            # The library's retries on timeouts, dropped connections and 5xx answers.
            r = http_backoff(
                "GET", url, headers=ranged, follow_redirects=True, max_retries=2, base_wait_time=0.5
            )
            hf_raise_for_status(r)
            body = r.content
            if r.status_code == 200:  # the whole file: the server ignored the range
                body = body[start:end]
            if len(body) != end - start:
                got = f"the Hub sent {len(body)} bytes of its header, expected {end - start}"
                raise CheckpointError(f"model '{repo}': {name}: {got}")
            return body

        if size < 8:
            raise CheckpointError(f"model '{repo}': {name} is {size} bytes, too short for a safetensors file")
        (n,) = struct.unpack("<Q", fetch(0, 8))
        if n > min(_MAX_HEADER, size - 8):
            raise CheckpointError(
                f"model '{repo}': {name}: header length {n} does not fit the file's {size} bytes"
            )
        head = fetch(0, 8 + n)
        tmp = dest.with_suffix(".part")
        with open(tmp, "wb") as f:
            f.write(head)
            f.truncate(size)  # the rest is a hole: no disk space, never read
        tmp.replace(dest)

    def download(self, needed: dict[str, set[str]], report: Report | None = None) -> int:
        """Download the pending files of ``needed`` (reference -> file names), in parallel, into
        the cache; returns the bytes fetched. ``report(bytes_done, bytes_total, files_done,
        files_total)`` is called from this thread about ten times a second; an exception it
        raises (or Ctrl-C) stops the downloads, whose partial files the library resumes on the
        next run."""
        from huggingface_hub import hf_hub_download

        jobs = [(ref, n) for ref, names in needed.items() for n in sorted(names & self.models[ref].pending)]
        total = sum(self.models[ref].sizes[n] for ref, n in jobs)
        if not jobs:
            self.fetched = True
            return 0
        cache = _cache_dir()
        cache.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(cache).free
        if total > free:
            raise MergexIOError(
                f"downloading {len(jobs)} file(s) needs {total} bytes but the Hugging Face cache at {cache} "
                f"has {free} bytes free"
            )

        tally = _Tally()
        counted = _counting_tqdm(tally)

        def fetch(job: tuple[str, str]) -> None:
            ref, name = job
            m = self.models[ref]
            try:
                path = hf_hub_download(
                    m.repo_id, name, revision=m.sha, cache_dir=cache, endpoint=_endpoint(), tqdm_class=counted
                )
            except _Cancelled:
                raise
            except Exception as e:
                raise _hub_error(m.repo_id, m.revision, e) from None
            m.snapshot = _snapshot_of(Path(path), name)
            m.pending.discard(name)

        pool = ThreadPoolExecutor(min(8, len(jobs)), thread_name_prefix="mergex-download")
        futures = [pool.submit(fetch, j) for j in jobs]
        try:
            while True:
                done, pending = wait(futures, timeout=0.1, return_when=FIRST_EXCEPTION)
                if report is not None:
                    report(min(tally.bytes, total), total, len(done), len(jobs))
                for f in done:
                    f.result()  # the first failure stops the rest
                if not pending:
                    break
        except BaseException:
            tally.cancelled = True
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown()
        self.fetched = True
        return total

    def pending_bytes(self, needed: dict[str, set[str]]) -> int:
        """Bytes :meth:`download` would fetch."""
        return sum(self.models[r].sizes[n] for r, ns in needed.items() for n in ns & self.models[r].pending)

    def needed_files(self, files: set[str]) -> dict[str, set[str]]:
        """The Hub files among ``files`` (paths the plan reads), by reference."""
        out: dict[str, set[str]] = {}
        for ref, m in self.models.items():
            for f in files:
                p = Path(f)
                if p.parent == m.folder:
                    out.setdefault(ref, set()).add(p.name)
        return out


Report = Callable[[int, int, int, int], None]
"""``(bytes_done, bytes_total, files_done, files_total)`` of the downloads."""


class _Cancelled(Exception):
    """Raised inside a download when the merge stops (Ctrl-C, an error elsewhere)."""


@dataclass
class _Tally:
    """Bytes downloaded so far, over every file; ``cancelled`` stops every download."""

    bytes: int = 0
    cancelled: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, n: int) -> None:
        if self.cancelled:
            raise _Cancelled
        with self.lock:
            self.bytes += n


def _snapshot_of(path: Path, name: str) -> Path:
    """The snapshot folder holding the repo file ``name``, from its path in the cache."""
    return path.parents[len(PurePosixPath(name).parts) - 1]


def _counting_tqdm(tally: _Tally) -> Any:
    """A silent tqdm class for huggingface_hub's downloads that counts their bytes into
    ``tally`` (and stops them when it is cancelled)."""
    from tqdm.auto import tqdm  # type: ignore[import-untyped]

    class Counted(tqdm):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            tally.add(int(n or 0))
            return super().update(n)  # type: ignore[no-any-return]

    return Counted


_SESSION: ContextVar[HubSession | None] = ContextVar("mergex_hub_session", default=None)


def current() -> HubSession | None:
    """The Hub session of the merge or plan being prepared, if any."""
    return _SESSION.get()


@contextlib.contextmanager
def hub_session(offline: bool) -> Iterator[HubSession]:
    """Resolve Hub references through a :class:`HubSession` while open; its stand-in folders
    live in a temporary folder removed at the end."""
    with tempfile.TemporaryDirectory(prefix="mergex-hub-") as work:
        session = HubSession(Path(work), offline)
        token = _SESSION.set(session)
        try:
            yield session
        finally:
            _SESSION.reset(token)
