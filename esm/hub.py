"""hf-dataset-selector ESMs on the Hugging Face Hub: discover, fetch, import, push.

The field's public pool of ESMs lives on the Hub as one model repo per ESM, written by
hf-dataset-selector (``hfselect``): ``config.json`` + ``model.safetensors`` and a model
card whose tags hold ``embedding_space_map`` and ``BaseLM:<base model>``; the card's
``base_model`` field gives the Hub's own ``base_model:<name>`` tag. ``huggingface_hub``
is the client throughout; every file goes through its cache.

Discovery works as hfselect's ``find_esm_repo_ids`` does: online, the Hub's model list
filtered on the tags ``embedding_space_map`` and ``base_model:<name>``
(:meth:`huggingface_hub.HfApi.list_models`). The list needs the Hub, so offline
(``HF_HUB_OFFLINE=1`` or ``offline=True``) discovery reads the local cache instead
(:func:`huggingface_hub.scan_cache_dir`): every cached model repo whose ``config.json``
at ``refs/main`` is an hfselect ESM config for that base model. Offline it can find
only what an earlier online run (or a copied cache) put there.

Fetching takes every repo's ``config.json`` first (cheap; a bad config fails before
any weights move), then ``model.safetensors`` pinned to the commit the config came
from, both in parallel. Only safetensors are read: a repo with pickled weights
(``pytorch_model.bin``) only is reported as failed. A rerun fetches weights from the
cache without a request and skips every ESM already in the registry (same content
key as a folder import, see :func:`stepstone.esm.hfselect.read_hfselect_esm`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tqdm.auto import tqdm

from stepstone.esm.encoder import Encoder
from stepstone.esm.errors import StepstoneError
from stepstone.esm.hfselect import identify_encoder, read_hfselect_esm
from stepstone.esm.identity import same_encoder_name
from stepstone.esm.model import CONFIG_NAME, WEIGHTS_NAME, ESMFormatError
from stepstone.esm.registry import Registry, esm_id_for

logger = logging.getLogger(__name__)

__all__ = ["ESM_TAG", "HubError", "HubImportReport", "find_hub_esms", "import_from_hub",
           "is_hub_repo_id", "push_hfselect"]

ESM_TAG = "embedding_space_map"
BASE_LM_TAG = "BaseLM:{}"
# What hfselect's discovery filters on besides ESM_TAG (the Hub derives it from the
# card's base_model field).
BASE_MODEL_FILTER = "base_model:{}"
DEFAULT_WORKERS = 8
_T = TypeVar("_T")


class HubError(StepstoneError, OSError):
    """The Hub (or, offline, the local Hub cache) could not give what was asked for."""


def is_hub_repo_id(value: str) -> bool:
    """Whether ``value`` reads as a Hub repo id (``owner/name``) rather than a folder:
    it is no existing path and has exactly one ``/``."""
    return not Path(value).exists() and value.count("/") == 1 and all(value.split("/"))


def _offline(offline: bool | None) -> bool:
    from huggingface_hub import constants

    return constants.is_offline_mode() if offline is None else bool(offline)


def _cache_dir(cache_dir: str | Path | None) -> Path:
    from huggingface_hub import constants

    return Path(cache_dir if cache_dir is not None else constants.HF_HUB_CACHE)


# -- discovery ----------------------------------------------------------------------------
def find_hub_esms(base_model: str, *, offline: bool | None = None,
                  cache_dir: str | Path | None = None, token: str | bool | None = None
                  ) -> list[str]:
    """Repo ids of the hfselect ESMs for ``base_model`` (a Hub id), sorted.

    Online: the Hub's model list filtered on ``embedding_space_map`` and
    ``base_model:<name>`` (after resolving a redirected name, as hfselect does).
    Offline (``offline=True``, or ``None`` with ``HF_HUB_OFFLINE=1``): the ESM repos in
    the local Hub cache (``cache_dir``, default ``HF_HUB_CACHE``) whose cached config
    names ``base_model`` (or a known alias of it); the Hub's tags cannot be listed
    without the Hub.

    Raises
    ------
    HubError
        When the Hub cannot be reached, or offline when there is no cache folder.
    """
    if _offline(offline):
        return _find_in_cache(base_model, _cache_dir(cache_dir))
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    api = HfApi(token=token)
    try:
        # A renamed model redirects (bert-base-uncased -> google-bert/bert-base-uncased);
        # the tag carries the current name.
        resolved = api.model_info(base_model).id
        found = api.list_models(filter=[ESM_TAG, BASE_MODEL_FILTER.format(resolved)])
        return sorted(m.id for m in found)
    except (HfHubHTTPError, OfflineModeIsEnabled, OSError) as err:
        raise HubError(
            f"Cannot list the Hub's ESMs for {base_model!r} ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}). Without the Hub, set "
            "HF_HUB_OFFLINE=1 to discover the ESM repos already in the local Hub cache, "
            "or pass repo ids or folders.") from None


def _find_in_cache(base_model: str, cache_dir: Path) -> list[str]:
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(cache_dir)
    except CacheNotFound:
        raise HubError(
            f"Offline (HF_HUB_OFFLINE=1), ESMs are discovered in the local Hub cache, but "
            f"there is no cache folder at {str(cache_dir)!r} (set HF_HUB_CACHE). The Hub's "
            "list of ESMs by tag needs a connection.") from None
    for warning in info.warnings:
        logger.warning("Hub cache %s: %s", cache_dir, warning)
    found = []
    for repo in info.repos:
        if repo.repo_type != "model":
            continue
        main = next((r for r in repo.revisions if "main" in r.refs), None)
        config = main.snapshot_path / CONFIG_NAME if main is not None else None
        if config is None or not config.is_file():
            continue
        try:
            data = json.loads(config.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue  # not an ESM config; the import of a named repo says why
        if (isinstance(data, dict) and "esm_architecture" in data
                and isinstance(data.get("base_model_name"), str)
                and same_encoder_name(data["base_model_name"], base_model)):
            found.append(repo.repo_id)
    return sorted(found)


# -- fetching -----------------------------------------------------------------------------
def _download(repo_id: str, filename: str, *, revision: str | None, offline: bool,
              cache_dir: Path, token: str | bool | None) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo_id}@{revision}" if revision else repo_id
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir,
                                    local_files_only=offline, token=token))
    except HFValidationError as err:
        raise HubError(f"{repo_id!r} is not a valid Hub repo id ({err}).") from None
    except LocalEntryNotFoundError:
        if offline:
            raise HubError(f"{where}: {filename} is not in the local Hub cache "
                           f"{str(cache_dir)!r}, and offline mode (HF_HUB_OFFLINE=1) forbids "
                           "fetching it.") from None
        raise HubError(f"{where}: cannot reach the Hub to fetch {filename}, and it is not "
                       f"in the local cache {str(cache_dir)!r}.") from None
    except (RepositoryNotFoundError, RevisionNotFoundError) as err:
        raise HubError(f"{where}: no such repo or revision on the Hub ({type(err).__name__})."
                       ) from None
    except EntryNotFoundError:
        raise HubError(f"{where} has no {filename}.") from None
    except HfHubHTTPError as err:
        raise HubError(f"{where}: fetching {filename} failed ({err}).") from None


def _fetch_config(repo_id: str, *, offline: bool, cache_dir: Path,
                  token: str | bool | None) -> tuple[Path, dict[str, Any]]:
    path = _download(repo_id, CONFIG_NAME, revision=None, offline=offline,
                     cache_dir=cache_dir, token=token)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ESMFormatError(f"{repo_id}: {CONFIG_NAME} is not valid JSON ({err}).") from None
    if not isinstance(data, dict) or "esm_architecture" not in data:
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ESMFormatError(f"{repo_id}: {CONFIG_NAME} is not an hfselect ESM config "
                             f"(expected keys such as 'esm_architecture'; got {keys}).")
    return path, data


def _fetch_weights(repo_id: str, snapshot: Path, *, offline: bool, cache_dir: Path,
                   token: str | bool | None) -> Path:
    try:
        return _download(repo_id, WEIGHTS_NAME, revision=snapshot.name, offline=offline,
                         cache_dir=cache_dir, token=token)
    except HubError as err:
        pickled = (snapshot / "pytorch_model.bin").exists()
        raise HubError(f"{err} Only safetensors are read" + (
            " (this repo holds pickled weights, pytorch_model.bin, which are not)."
            if pickled else ".")) from None


def _parallel(fn: Callable[[str], _T], repo_ids: Sequence[str], *, workers: int, desc: str,
              progress: bool) -> dict[str, _T | StepstoneError]:
    """``fn(repo_id)`` for each id on ``workers`` threads; an expected failure is kept as
    its exception (anything else is a bug and propagates)."""

    def call(repo_id: str) -> _T | StepstoneError:
        try:
            return fn(repo_id)
        except StepstoneError as err:
            return err

    out: dict[str, _T | StepstoneError] = {}
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, \
            tqdm(total=len(repo_ids), desc=desc, unit="repo", disable=not progress,
                 leave=False) as bar:
        for repo_id, result in zip(repo_ids, pool.map(call, repo_ids), strict=True):
            out[repo_id] = result
            bar.update(1)
    return out


@dataclass
class HubImportReport:
    """What :func:`import_from_hub` did: ESM ids added, repo ids already present, and
    repo id → why it failed (the others still imported)."""

    added: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    offline: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        lines = [f"imported {len(self.added)}, skipped {len(self.skipped)} (already present), "
                 f"failed {len(self.failed)}" + (" [offline: local Hub cache only]"
                                                  if self.offline else "")]
        lines += [f"  {repo} -> {esm_id}" for repo, esm_id in self.added.items()]
        lines += [f"  failed {repo}: {why}" for repo, why in self.failed.items()]
        return "\n".join(lines)


def import_from_hub(
    registry: Registry,
    repo_ids: Iterable[str],
    *,
    base_model: str | None = None,
    encoder: Encoder | None = None,
    offline: bool | None = None,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
    workers: int = DEFAULT_WORKERS,
    progress: bool = True,
) -> HubImportReport:
    """Import hfselect ESM repos from the Hub (or, offline, from the local Hub cache).

    Configs are fetched first, then the weights of the valid ones, each stage on
    ``workers`` threads with a progress bar; the registry is written from this thread.
    A repo that fails (missing, no safetensors, bad config or weights, another base
    model than ``base_model``) is reported by id while the others import; one already
    in the registry is skipped. ``encoder``: as in
    :func:`stepstone.esm.hfselect.identify_encoder`, which also records the pooling the
    peer embeds that base model with (:func:`stepstone.esm.hfselect.peer_pooling`).
    """
    repo_ids = list(dict.fromkeys(repo_ids))
    off = _offline(offline)
    cache = _cache_dir(cache_dir)
    report = HubImportReport(offline=off)
    configs = _parallel(lambda r: _fetch_config(r, offline=off, cache_dir=cache, token=token),
                        repo_ids, workers=workers, desc="ESM configs", progress=progress)
    ready: dict[str, Path] = {}
    versions: dict[str, str] = {}
    for repo_id, result in configs.items():
        if isinstance(result, StepstoneError):
            report.failed[repo_id] = str(result)
            continue
        path, data = result
        named = data.get("base_model_name")
        if base_model is not None and not (isinstance(named, str)
                                           and same_encoder_name(named, base_model)):
            report.failed[repo_id] = (f"its config names base model {named!r}, not "
                                      f"{base_model!r} as asked for.")
            continue
        ready[repo_id] = path.parent
        versions[repo_id] = str(data.get("version", "?"))
    weights = _parallel(
        lambda r: _fetch_weights(r, ready[r], offline=off, cache_dir=cache, token=token),
        list(ready), workers=workers, desc="ESM weights", progress=progress)
    for repo_id, result in weights.items():
        if isinstance(result, StepstoneError):
            report.failed[repo_id] = str(result)
            continue
        snapshot = ready[repo_id]
        try:
            esm, key = read_hfselect_esm(snapshot)
            esm.config.task_origin = f"hfselect {versions[repo_id]}: hub {repo_id}@{snapshot.name}"
            if registry.find(key) is not None:
                report.skipped.append(repo_id)
                continue
            identify_encoder(esm, encoder=encoder)
            entry = registry.add(esm, esm_id=esm_id_for(esm.config.task_id, key),
                                 settings_key=key)
        except StepstoneError as err:
            report.failed[repo_id] = str(err)
            continue
        report.added[repo_id] = entry.id
    return report


# -- pushing ------------------------------------------------------------------------------
def push_hfselect(folder: str | Path, repo_id: str, *, token: str | bool | None = None,
                  private: bool | None = None) -> str:
    """Upload an exported ESM folder (:func:`stepstone.esm.hfselect_export.export_hfselect`)
    to the Hub repo ``repo_id`` (created when missing); returns the commit URL.

    Raises
    ------
    HubError
        Offline (``HF_HUB_OFFLINE=1``), or when the Hub refuses the upload.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    folder = Path(folder)
    missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME, "README.md") if not (folder / n).is_file()]
    if missing:
        raise HubError(f"{str(folder)!r} is not an exported ESM folder: it lacks {missing}.")
    if _offline(None):
        raise HubError(f"Cannot push {str(folder)!r} to {repo_id!r}: offline mode "
                       "(HF_HUB_OFFLINE=1) is on. The exported folder is complete; push it "
                       "later with `stepstone registry export-hfselect ... --push REPO`.")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, exist_ok=True, private=private)
        info = api.upload_folder(folder_path=folder, repo_id=repo_id,
                                 commit_message="Add ESM exported by stepstone")
    except (HfHubHTTPError, OfflineModeIsEnabled, OSError) as err:
        raise HubError(f"Pushing {str(folder)!r} to {repo_id!r} failed ({err}).") from None
    return str(getattr(info, "commit_url", info))
