"""Fit and validate the calibrated degradation detector (:mod:`unifuse.degradation_evidence`).

Measurement script, not a test. Three steps, each resumable:

    # 1. simulate samples and measure their evidence (+ the shipped network's DAPL probabilities)
    .venv/bin/python docs/probes/degradation_evidence_fit.py samples --real-data real_data --cache /tmp/de_cache
    # (after changing the feature code: re-measure the kept images, network probabilities unchanged)
    .venv/bin/python docs/probes/degradation_evidence_fit.py refeature --cache /tmp/de_cache
    # (after new network weights: re-measure the network probabilities of the kept images, then fit again)
    .venv/bin/python docs/probes/degradation_evidence_fit.py renetwork --cache /tmp/de_cache --weights NEW.pt
    # 2. fit on the TRAINING samples only; write the calibration JSON
    .venv/bin/python docs/probes/degradation_evidence_fit.py fit --cache /tmp/de_cache \\
        --write UniFuseSlicer/Resources/Models/degradation_evidence.json [--without-network REASON]
    # 3. score the VALIDATION samples (accuracy per class, confusion matrix, ECE): evidence alone, with the
    #    modality stated (as a user who knows it does), and with the network
    .venv/bin/python docs/probes/degradation_evidence_fit.py validate --cache /tmp/de_cache

Samples come from the real volumes of ``unifuse data real`` (``real_data/volumes``) and its built cases
(``real_data/cases/<split>/<case>/moving_clean.nii.gz``, the clean synthetic moving modality on its acquisition
grid), each subject in one split only (the split recorded by the data builder). Per clean source:

* ``none``: the source itself; a random sub-block of real volumes; MR with added Rician noise (SNR at the
  object's mean uniform in [8, 60]: additive noise is not count-limited noise), once more with the background
  set to 0 as in masked exports; PET at full dose (Poisson, 300–900 counts at the mean activity); CT with
  quantum noise and no metal (the simulator with an empty metal mask); CT with 1–2 dense non-metal objects
  (2000–2990 HU, radius 1–3 mm: enamel, cortical bone, calcification, contrast — below the 3000 HU metal
  threshold).
* ``metal`` (CT sources; real CTs first resampled to the 160² matrix of the case builder), ``motion`` (MR
  sources; one of three with Rician noise afterwards, SNR in [20, 80]) and ``lowdose`` (PET sources, incl. PET
  synthesised from the split's real CT and MR volumes): :func:`unifuse.data.real_cases.degrade` with the
  split's simulator settings (``DEGRADATION_SETTINGS``; validation settings are never used for training).

The network probabilities come from the shipped weights on the pipeline's default working grid after the header
pre-alignment, with the case's reference volume (or, for samples made from a real volume, that clean volume).
Needs only numpy/scipy/SimpleITK/torch; ``samples`` takes ~30–60 min on one core.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
from scipy import ndimage, optimize

from unifuse import degradation_evidence as de
from unifuse.config import DEGRADATION_CLASSES
from unifuse.data import degradations
from unifuse.data.real_cases import KINDS, degrade, synthesize
from unifuse.data.real_sources import body_mask

CLASSES = tuple(DEGRADATION_CLASSES)


# --------------------------------------------------------------------------------------------------------
# sources and samples


@dataclass
class Source:
    """A clean volume of one subject in one split."""

    id: str
    subject: str
    split: str
    modality: str  # "ct", "mr" or "pet"
    image: sitk.Image
    reference: Path  # reference volume for the network
    real: bool  # a real volume (vs the case builder's synthetic moving modality)


def _rng(*key: Any) -> np.random.Generator:
    return np.random.default_rng([zlib.crc32("/".join(map(str, key)).encode())])


def _image(array: np.ndarray, like: sitk.Image, ct: bool) -> sitk.Image:
    """An image on ``like``'s grid; CT rounded to int16 (as CT files are stored)."""
    if ct:
        out = sitk.GetImageFromArray(np.clip(np.round(array), -32768, 32767).astype(np.int16))
    else:
        out = sitk.GetImageFromArray(np.asarray(array, dtype=np.float32))
    out.CopyInformation(like)
    return out


def _pet_from_real(image: sitk.Image, modality: str, head: bool, rng: np.random.Generator) -> sitk.Image:
    """PET-like activity synthesised from a real CT/MR (``synthesize``) on an isotropic 2–3 mm grid."""
    spacing = float(rng.uniform(2.0, 3.0))
    size = [max(8, int(round(n * s / spacing))) for n, s in zip(image.GetSize(), image.GetSpacing())]
    grid = sitk.Image(size, sitk.sitkFloat32)
    grid.SetSpacing((spacing,) * 3)
    grid.SetOrigin(image.GetOrigin())
    grid.SetDirection(image.GetDirection())
    low = -1000.0 if modality == "ct" else 0.0
    res = sitk.Resample(sitk.Cast(image, sitk.sitkFloat32), grid, sitk.Transform(), sitk.sitkLinear, low)
    a = sitk.GetArrayFromImage(res)
    kind = next(k for k in KINDS[modality] if k.moving_modality == "pet") if modality == "mr" else KINDS["ct"][0]
    mask = body_mask(a, modality)
    pet, _ = synthesize(kind, a, mask, None, head, spacing, rng)
    return _image(pet, res, ct=False)


def _to_ct_matrix(image: sitk.Image, matrix: int = 160) -> sitk.Image:
    """A real CT resampled to ``matrix``² in-plane (the case builder's CT grid), slice spacing kept."""
    size = list(image.GetSize())
    spacing = list(image.GetSpacing())
    if max(size[0], size[1]) <= matrix:
        return image
    new_spacing = [spacing[0] * size[0] / matrix, spacing[1] * size[1] / matrix, spacing[2]]
    grid = sitk.Image([matrix, matrix, size[2]], sitk.sitkInt16)
    grid.SetSpacing(new_spacing)
    grid.SetOrigin(image.GetOrigin())
    grid.SetDirection(image.GetDirection())
    return sitk.Resample(image, grid, sitk.Transform(), sitk.sitkLinear, -1024.0, sitk.sitkInt16)


def sources(real_data: Path, split: str) -> Iterator[Source]:
    """The clean sources of ``split``: real volumes, the cases' clean moving volumes, synthesised PET."""
    for meta_path in sorted((real_data / "volumes").glob("*/meta.json")):
        meta = json.loads(meta_path.read_text())
        if meta.get("split") != split:
            continue
        subject = meta["id"]
        folder = meta_path.parent
        modality = meta["modality"]
        image = sitk.ReadImage(str(folder / "image.nii.gz"))
        yield Source(f"{subject}/real", subject, split, modality, image, folder / "image.nii.gz", True)
        if (folder / "second.nii.gz").exists():
            yield Source(f"{subject}/real-second", subject, split, modality,
                         sitk.ReadImage(str(folder / "second.nii.gz")), folder / "image.nii.gz", True)
        for k in range(2 if modality == "ct" else 1):
            rng = _rng(split, subject, "pet", k)
            pet = _pet_from_real(image, modality, meta.get("body_part") == "head", rng)
            yield Source(f"{subject}/pet-{k}", subject, split, "pet", pet, folder / "image.nii.gz", False)
    for case_json in sorted((real_data / "cases" / split).glob("*/case.json")):
        case = json.loads(case_json.read_text())
        modality = case["moving"]["modality"]
        modality = "mr" if modality == "dwi" else modality
        folder = case_json.parent
        yield Source(f"{case['name']}/clean", case["subject"], split, modality,
                     sitk.ReadImage(str(folder / "moving_clean.nii.gz")), folder / "reference.nii.gz", False)


def _object_mean(a: np.ndarray) -> float:
    high = float(np.percentile(a, 99.5))
    obj = a > 0.05 * high
    return float(a[obj].mean()) if obj.any() else 1.0


def _rician(a: np.ndarray, snr: float, rng: np.random.Generator) -> np.ndarray:
    sigma = _object_mean(a) / snr
    return np.hypot(a + rng.normal(0, sigma, a.shape), rng.normal(0, sigma, a.shape)).astype(np.float32)


def _dense_objects(a: np.ndarray, spacing_xyz: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    body = a > -300.0
    mask = degradations.random_metal_mask(a.shape, rng, inside=body if body.any() else None,
                                          spacing_mm=spacing_xyz, num_objects=int(rng.integers(1, 3)),
                                          radius_mm=(1.0, 3.0))
    out = a.copy()
    out[mask] = rng.uniform(2000.0, 2990.0)
    return out


def samples(src: Source) -> Iterator[Tuple[str, str, str, Callable[[], sitk.Image], Dict[str, Any]]]:
    """(sample id, label, variant, image factory, params) for one source."""
    split = src.split
    img = src.image
    spacing = img.GetSpacing()
    arr = lambda im=img: sitk.GetArrayFromImage(im).astype(np.float32)  # noqa: E731
    ct = src.modality == "ct"
    yield f"{src.id}/none", "none", "clean", (lambda: img), {}
    if src.real:
        def crop() -> sitk.Image:
            rng = _rng(src.id, "crop")
            size = np.array(img.GetSize())
            frac = rng.uniform(0.6, 1.0, size=3)
            new = np.maximum(8, (size * frac).astype(int))
            start = [int(rng.integers(0, s - n + 1)) for s, n in zip(size, new)]
            return sitk.RegionOfInterest(img, [int(n) for n in new], start)
        yield f"{src.id}/none-crop", "none", "crop", crop, {}
    if src.modality == "mr":
        def noisy() -> sitk.Image:
            rng = _rng(src.id, "rician")
            return _image(_rician(arr(), float(rng.uniform(8, 60)), rng), img, False)
        yield f"{src.id}/none-rician", "none", "rician", noisy, {}

        def masked() -> sitk.Image:
            rng = _rng(src.id, "rician-masked")
            a = arr()
            out = _rician(a, float(rng.uniform(8, 60)), rng)
            keep = ndimage.binary_dilation(a > 0.05 * float(np.percentile(a, 99.5)), iterations=2)
            return _image(np.where(keep, out, 0.0), img, False)
        yield f"{src.id}/none-rician-masked", "none", "rician, background masked", masked, {}
        for k in range(3):
            def motion(k: int = k) -> sitk.Image:
                rng = _rng(src.id, "motion", k)
                out, _ = degrade("motion", arr(), spacing, split, rng)
                if k % 2 == 1:
                    out = _rician(out, float(rng.uniform(20, 80)), rng)
                return _image(out, img, False)
            yield f"{src.id}/motion-{k}", "motion", "motion" + ("+rician" if k % 2 else ""), motion, {}
    if src.modality == "pet":
        def fulldose() -> sitk.Image:
            rng = _rng(src.id, "fulldose")
            return _image(degradations.pet_lowdose(arr(), rng, dose_fraction=1.0,
                                                   full_dose_counts=float(rng.uniform(300, 900))), img, False)
        yield f"{src.id}/none-fulldose", "none", "full dose", fulldose, {}
        for k in range(4):
            def lowdose(k: int = k) -> sitk.Image:
                out, _ = degrade("lowdose", arr(), spacing, split, _rng(src.id, "lowdose", k))
                return _image(out, img, False)
            yield f"{src.id}/lowdose-{k}", "lowdose", "lowdose", lowdose, {}
    if ct:
        base = _to_ct_matrix(img) if src.real else img
        base_arr = lambda: sitk.GetArrayFromImage(base).astype(np.float32)  # noqa: E731
        if not src.real:
            def quantum() -> sitk.Image:
                rng = _rng(src.id, "quantum")
                a = base_arr()
                photons = float(np.exp(rng.uniform(np.log(1e4), np.log(1e5))))
                out = degradations.simulate_metal_artifacts(a, np.zeros(a.shape, bool), rng,
                                                            spacing_mm=base.GetSpacing(), photons=photons)
                return _image(out, base, True)
            yield f"{src.id}/none-quantum", "none", "quantum noise", quantum, {}

        def dense() -> sitk.Image:
            rng = _rng(src.id, "dense")
            a = base_arr()
            if not src.real:
                a = degradations.simulate_metal_artifacts(a, np.zeros(a.shape, bool), rng, spacing_mm=base.GetSpacing(),
                                                          photons=float(np.exp(rng.uniform(np.log(1e4), np.log(1e5)))))
            return _image(_dense_objects(a, base.GetSpacing(), rng), base, True)
        yield f"{src.id}/none-dense", "none", "dense object", dense, {}
        for k in range(4 if src.real else 3):
            def metal(k: int = k) -> sitk.Image:
                out, _ = degrade("metal", base_arr(), base.GetSpacing(), split, _rng(src.id, "metal", k))
                return _image(out, base, True)
            yield f"{src.id}/metal-{k}", "metal", "metal", metal, {}


# --------------------------------------------------------------------------------------------------------
# network


class Network:
    """The shipped network's DAPL probabilities on the pipeline's default working grid (header geometry)."""

    def __init__(self, weights: Optional[str] = None, threads: int = 1) -> None:
        import torch

        from unifuse.options import FuseOptions
        from unifuse.pipeline import load_model

        torch.set_num_threads(threads)
        self.loaded = load_model(weights, None, "cpu", 0)
        self.loaded.model.eval()
        self.spacing = FuseOptions().working_spacing_mm

    def probs(self, reference: sitk.Image, moving: sitk.Image) -> Dict[str, float]:
        import torch

        from unifuse import resources, stages

        cfg = self.loaded.config
        dev = torch.device("cpu")
        rn, _ = stages.normalization(reference, "reference")
        mn, _ = stages.normalization(moving, "moving")
        t, _ = stages.header_transform(reference, moving, "geometry")
        choice = stages.plan_working_grid(reference, moving, [t], self.spacing, cfg.size_multiple,
                                          lambda v: resources.estimate_network_bytes(cfg, round(v ** (1 / 3))),
                                          resources.network_budget_bytes(dev))
        work = stages.prepare_working_volumes(reference, choice, rn, mn, dev)
        cand = stages.global_candidate("header", moving, t, work)
        with torch.inference_mode():
            p = self.loaded.model.analyse(work.fixed, cand.moving).dapl.probs[0].numpy()
        return {c: float(v) for c, v in zip(CLASSES, p)}


def image_path(cache: Path, sample_id: str) -> Path:
    """Where a sample's image is kept (so features can be re-measured without re-simulating)."""
    return cache / "images" / (sample_id.replace("/", "__") + ".nii")


def cmd_refeature(args: argparse.Namespace) -> None:
    """Re-measure the evidence of every cached sample from its kept image (network probabilities kept)."""
    cache = Path(args.cache)
    rows = [json.loads(line) for line in (cache / "samples.jsonl").read_text().splitlines() if line.strip()]
    seconds = []
    for r in rows:
        ev = de.degradation_evidence(sitk.ReadImage(str(image_path(cache, r["id"]))))
        r.update(features=ev.features, details=ev.details, evidence_seconds=ev.seconds)
        seconds.append(ev.seconds)
    (cache / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{len(rows)} samples re-measured; evidence seconds median {np.median(seconds):.3f}, max {max(seconds):.3f}")


def cmd_renetwork(args: argparse.Namespace) -> None:
    """Re-measure every cached sample's network probabilities with ``--weights`` (new weights: refit after)."""
    cache = Path(args.cache)
    rows = [json.loads(line) for line in (cache / "samples.jsonl").read_text().splitlines() if line.strip()]
    references = {src.id: src.reference for split in ("train", "validation") for src in sources(Path(args.real_data), split)}
    net = Network(args.weights, threads=args.threads)
    loaded: Dict[str, sitk.Image] = {}
    for i, r in enumerate(rows):
        if r["source"] not in loaded:
            loaded[r["source"]] = sitk.ReadImage(str(references[r["source"]]))
        r["network"] = net.probs(loaded[r["source"]], sitk.ReadImage(str(image_path(cache, r["id"]))))
        if i % 25 == 0:
            print(f"{i + 1}/{len(rows)} {r['id']}", flush=True)
    (cache / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{len(rows)} samples: network probabilities re-measured with {args.weights or 'the shipped weights'}")


def cmd_samples(args: argparse.Namespace) -> None:
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    out_path = cache / "samples.jsonl"
    done = set()
    if out_path.exists():
        done = {json.loads(line)["id"] for line in out_path.read_text().splitlines() if line.strip()}
    net = Network() if args.network else None
    images = cache / "images"
    images.mkdir(exist_ok=True)
    with out_path.open("a") as out:
        for split in args.splits:
            for src in sources(Path(args.real_data), split):
                ref_img: Optional[sitk.Image] = None
                for sid, label, variant, factory, params in samples(src):
                    if sid in done:
                        continue
                    t0 = time.perf_counter()
                    image = factory()
                    t_sim = time.perf_counter() - t0
                    sitk.WriteImage(image, str(image_path(cache, sid)))
                    ev = de.degradation_evidence(image)
                    rec: Dict[str, Any] = {
                        "id": sid, "split": split, "subject": src.subject, "source": src.id, "modality": src.modality,
                        "real": src.real, "label": label, "variant": variant, "features": ev.features,
                        "details": ev.details, "evidence_seconds": ev.seconds, "simulation_seconds": t_sim,
                        "size": list(image.GetSize()), "spacing_mm": list(image.GetSpacing()),
                    }
                    if net is not None:
                        if ref_img is None:
                            ref_img = sitk.ReadImage(str(src.reference))
                        rec["network"] = net.probs(ref_img, image)
                    out.write(json.dumps(rec) + "\n")
                    out.flush()
                    print(f"{split:10s} {sid:60s} {label:8s} {ev.seconds:5.2f}s sim {t_sim:5.1f}s", flush=True)


# --------------------------------------------------------------------------------------------------------
# fit


def load(cache: Path, split: str) -> List[Dict[str, Any]]:
    rows = [json.loads(line) for line in (cache / "samples.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r["split"] == split]


#: Evidence features of each class's logit (the gate is :data:`unifuse.degradation_evidence.GATES`).
INPUTS: Dict[str, List[str]] = {
    "metal": ["log10_metal_mm3", "streak_energy", "streak_anisotropy"],
    "motion": ["ghost_coherence"],
    "lowdose": ["count_limited_score", "background_noise_ratio"],
}

#: Feature clipping applied before the model (keeps extreme measurements from dominating a linear model).
CLIP: Dict[str, Tuple[float, float]] = {
    "log10_metal_mm3": (0.0, 5.0),
    "streak_anisotropy": (-1.0, 2.0),
    "streak_energy": (-2.0, 4.0),
    "ghost_percent": (0.0, 10.0),
    "ghost_coherence": (0.0, 3.0),
    "log10_counts": (0.0, 5.0),
    "poisson_mismatch": (0.0, 2.0),
    "nsr_high_percent": (0.0, 40.0),
    "noise_whiteness": (-1.0, 3.0),
    "background_noise_ratio": (0.0, 2.0),
    "count_limited_score": (0.0, 2.5),
}


@dataclass
class Design:
    """Training matrices of the gated model."""

    y: np.ndarray  # (n,) class ids
    open: Dict[str, np.ndarray]  # class -> (n,) bool gate
    x: Dict[str, np.ndarray]  # class -> (n, d_c) clipped features
    lnp: Optional[np.ndarray]  # (n, 4) log network probabilities


def gate_modality(row: Dict[str, Any], stated: bool) -> str:
    """The modality that opens the gates: the sample's true modality when the user states it, else measured."""
    return row["modality"] if stated else de.measured_modality(row["features"])


def design(rows: List[Dict[str, Any]], network: bool, stated: bool = False) -> Design:
    y = np.array([CLASSES.index(r["label"]) for r in rows])
    opened = {c: np.array([de.gate_open(c, gate_modality(r, stated)) for r in rows]) for c in de.GATES}
    x = {c: np.array([[float(np.clip(r["features"][f], *CLIP[f])) for f in INPUTS[c]] for r in rows]) for c in de.GATES}
    lnp = np.array([de.network_log_probs(r["network"]) for r in rows]) if network else None
    return Design(y, opened, x, lnp)


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _logits(d: Design, rows: np.ndarray, params: Dict[str, Any]) -> np.ndarray:
    n = int(rows.sum())
    out = np.zeros((n, len(CLASSES)))
    for c in de.GATES:
        k = CLASSES.index(c)
        z = (d.x[c][rows] - params["mean"][c]) / params["scale"][c]
        out[:, k] = np.where(d.open[c][rows], params["bias"][c] + z @ params["weights"][c], de.CLOSED_LOGIT)
    if d.lnp is not None and "network_weight" in params:
        out += params["network_weight"] * d.lnp[rows]
    return out


def fit_gated(d: Design, rows: np.ndarray, l2: float) -> Dict[str, Any]:
    """Gated multinomial logistic regression (none = reference) by L-BFGS; class-balanced NLL, L2 on the
    weights (not the biases); features standardised over the training rows whose gate is open."""
    y = d.y[rows]
    counts = np.bincount(y, minlength=len(CLASSES)).astype(np.float64)
    sw = (len(y) / (len(CLASSES) * np.maximum(counts, 1)))[y]
    sw = sw / sw.sum()
    onehot = np.eye(len(CLASSES))[y]
    params: Dict[str, Any] = {"mean": {}, "scale": {}, "bias": {}, "weights": {}}
    for c in de.GATES:
        xo = d.x[c][rows][d.open[c][rows]]
        params["mean"][c] = xo.mean(axis=0) if len(xo) else np.zeros(len(INPUTS[c]))
        params["scale"][c] = (xo.std(axis=0) if len(xo) else np.ones(len(INPUTS[c]))) + 1e-3
    sizes = [len(INPUTS[c]) for c in de.GATES]
    n_net = len(CLASSES) if d.lnp is not None else 0

    def unpack(theta: np.ndarray) -> Dict[str, Any]:
        p = dict(params, bias={}, weights={})
        i = 0
        for c, m in zip(de.GATES, sizes):
            p["bias"][c] = theta[i]
            p["weights"][c] = theta[i + 1: i + 1 + m]
            i += 1 + m
        if n_net:
            p["network_weight"] = theta[i: i + n_net]
        return p

    def loss(theta: np.ndarray) -> Tuple[float, np.ndarray]:
        p = unpack(theta)
        prob = softmax(_logits(d, rows, p))
        nll = -float(np.sum(sw * np.log(np.clip(np.sum(prob * onehot, axis=1), 1e-300, None))))
        g = (prob - onehot) * sw[:, None]
        grad: List[np.ndarray] = []
        reg = 0.0
        for c in de.GATES:
            k = CLASSES.index(c)
            z = (d.x[c][rows] - p["mean"][c]) / p["scale"][c]
            gk = g[:, k] * d.open[c][rows]
            grad.append(np.array([gk.sum()]))
            grad.append(z.T @ gk + l2 * p["weights"][c])
            reg += 0.5 * l2 * float(np.sum(p["weights"][c] ** 2))
        if n_net:
            assert d.lnp is not None
            grad.append(np.sum(g * d.lnp[rows], axis=0) + l2 * p["network_weight"])
            reg += 0.5 * l2 * float(np.sum(p["network_weight"] ** 2))
        return nll + reg, np.concatenate(grad)

    theta0 = np.zeros(sum(1 + m for m in sizes) + n_net)
    res = optimize.minimize(loss, theta0, jac=True, method="L-BFGS-B", options={"maxiter": 5000})
    return unpack(res.x)


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """Temperature T minimising the NLL of softmax(logits / T)."""
    def nll(log_t: float) -> float:
        p = softmax(logits / math.exp(log_t))
        return -float(np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-300, None))))
    res = optimize.minimize_scalar(nll, bounds=(-3.0, 3.0), method="bounded")
    return float(math.exp(res.x))


def fit_model(rows: List[Dict[str, Any]], network: bool,
              l2_grid: Sequence[float] = (0.001, 0.003, 0.01, 0.03, 0.1), stated: bool = False) -> Dict[str, Any]:
    """L2 strength by leave-one-subject-out NLL, the temperature on those out-of-fold logits, then the final fit
    on all training rows."""
    d = design(rows, network, stated)
    subjects = np.array([r["subject"] for r in rows])
    best: Optional[Tuple[float, float, np.ndarray]] = None
    for l2 in l2_grid:
        oof = np.zeros((len(rows), len(CLASSES)))
        for s in np.unique(subjects):
            test = subjects == s
            oof[test] = _logits(d, test, fit_gated(d, ~test, l2))
        p = softmax(oof)
        nll = -float(np.mean(np.log(np.clip(p[np.arange(len(d.y)), d.y], 1e-300, None))))
        print(f"  l2={l2:g}: leave-one-subject-out NLL {nll:.4f}, accuracy {np.mean(p.argmax(1) == d.y):.3f}")
        if best is None or nll < best[0]:
            best = (nll, l2, oof)
    assert best is not None
    nll, l2, oof = best
    temperature = fit_temperature(oof, d.y)
    params = fit_gated(d, np.ones(len(rows), dtype=bool), l2)
    out: Dict[str, Any] = {
        "inputs": {c: INPUTS[c] for c in de.GATES},
        "mean": {c: params["mean"][c].tolist() for c in de.GATES},
        "scale": {c: params["scale"][c].tolist() for c in de.GATES},
        "bias": {c: float(params["bias"][c]) for c in de.GATES},
        "weights": {c: params["weights"][c].tolist() for c in de.GATES},
        "temperature": temperature, "l2": l2, "training_samples": len(rows),
        "leave_one_subject_out_nll": nll,
    }
    if network:
        out["network_weight"] = params["network_weight"].tolist()
    return out


def _boundary(model: Dict[str, Any], c: str, feature: str) -> float:
    """Value of ``feature`` where class ``c``'s evidence logit equals none's (0), the other inputs at their
    training mean (standardised 0)."""
    i = model["inputs"][c].index(feature)
    w = model["weights"][c][i]
    return float(model["mean"][c][i] - model["bias"][c] * model["scale"][c][i] / w)


def cue_rules(model: Dict[str, Any]) -> Dict[str, Dict[str, List[List[Any]]]]:
    """Cue rules at the evidence model's decision boundaries (each class against none, one feature)."""
    return {
        "metal": {"all": [["ct_like", ">=", 0.5],
                          ["log10_metal_mm3", ">=", round(_boundary(model, "metal", "log10_metal_mm3"), 3)]],
                  "any": []},
        "motion": {"all": [["ct_like", "<=", 0.5],
                           ["ghost_coherence", ">=", round(_boundary(model, "motion", "ghost_coherence"), 3)]],
                   "any": []},
        "lowdose": {"all": [["ct_like", "<=", 0.5],
                            ["count_limited_score", ">=",
                             round(_boundary(model, "lowdose", "count_limited_score"), 3)]], "any": []},
    }


def cmd_fit(args: argparse.Namespace) -> None:
    rows = load(Path(args.cache), "train")
    print(f"{len(rows)} training samples:", {c: sum(r['label'] == c for r in rows) for c in CLASSES})
    models = {"evidence": fit_model(rows, network=False)}
    print("modality stated:")
    models[de.STATED_MODEL] = fit_model(rows, network=False, stated=True)
    if all("network" in r for r in rows) and not args.without_network:
        models["evidence+network"] = fit_model(rows, network=True)
    calib = {
        "format": de.CALIBRATION_FORMAT,
        "classes": list(CLASSES),
        "clip": {n: list(v) for n, v in CLIP.items()},
        "models": models,
        "cues": cue_rules(models["evidence"]),
        "fitted_on": {
            "split": "train",
            "subjects": sorted({r["subject"] for r in rows}),
            "samples": {c: sum(r["label"] == c for r in rows) for c in CLASSES},
            "simulator_settings": "unifuse.data.real_cases.DEGRADATION_SETTINGS['train']",
            "script": "docs/probes/degradation_evidence_fit.py",
        },
    }
    if args.without_network:
        calib["fitted_on"]["network"] = f"not combined: {args.without_network}"
    text = json.dumps(calib, indent=1)
    if args.write:
        Path(args.write).write_text(text + "\n")
        print("wrote", args.write)
    else:
        print(text)


# --------------------------------------------------------------------------------------------------------
# validation


def ece(probs: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error of the top-class confidence, ``bins`` equal-width bins."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y
    edges = np.linspace(0.0, 1.0, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (conf > lo) & (conf <= hi) if lo > 0 else (conf >= lo) & (conf <= hi)
        if sel.any():
            total += sel.mean() * abs(float(correct[sel].mean()) - float(conf[sel].mean()))
    return total


def score(rows: List[Dict[str, Any]], calibration: de.Calibration, network: bool,
          stated: bool = False) -> Dict[str, Any]:
    """Accuracy, confusion, ECE, NLL of the calibration on ``rows``: with the network's probabilities
    (``network``), or with the modality stated as the user would (``stated``), else from the evidence alone."""
    y = np.array([CLASSES.index(r["label"]) for r in rows])
    probs = []
    for r in rows:
        ev = de.Evidence(r["features"], gate_modality(r, stated), stated=stated)
        d = de.combine(ev, r.get("network") if network else None, calibration=calibration)
        probs.append([d[c] for c in CLASSES])
    p = np.array(probs)
    pred = p.argmax(axis=1)
    confusion = np.zeros((len(CLASSES), len(CLASSES)), dtype=int)
    for t, q in zip(y, pred):
        confusion[t, q] += 1
    per_class = {c: float(np.mean(pred[y == i] == i)) if np.any(y == i) else None for i, c in enumerate(CLASSES)}
    nll = -float(np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None))))
    real_none = np.array([r["real"] and r["label"] == "none" for r in rows])
    as_is = np.array([r["real"] and r["label"] == "none" and r["variant"] in ("clean", "crop") for r in rows])
    by_variant: Dict[str, List[int]] = {}
    for r, q, t in zip(rows, pred, y):
        key = f"{r['label']}/{r['variant']}/{'real' if r['real'] else 'synthetic'}"
        by_variant.setdefault(key, [0, 0])
        by_variant[key][0] += int(q == t)
        by_variant[key][1] += 1
    return {"n": len(rows), "accuracy": float(np.mean(pred == y)), "per_class": per_class,
            "confusion": confusion.tolist(), "ece10": ece(p, y), "nll": nll,
            "real_none_accuracy": float(np.mean(pred[real_none] == 0)) if real_none.any() else None,
            "real_none_n": int(real_none.sum()),
            "real_as_is_none_accuracy": float(np.mean(pred[as_is] == 0)) if as_is.any() else None,
            "real_as_is": {r["id"]: CLASSES[q] for r, q, a in zip(rows, pred, as_is) if a},
            "by_variant": {k: f"{v[0]}/{v[1]}" for k, v in sorted(by_variant.items())},
            "pred": pred.tolist(), "probs": p.tolist()}


def raw_network(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    y = np.array([CLASSES.index(r["label"]) for r in rows])
    p = np.array([[r["network"][c] for c in CLASSES] for r in rows])
    pred = p.argmax(axis=1)
    return {"accuracy": float(np.mean(pred == y)),
            "per_class": {c: float(np.mean(pred[y == i] == i)) for i, c in enumerate(CLASSES) if np.any(y == i)},
            "ece10": ece(p, y)}


def cmd_validate(args: argparse.Namespace) -> None:
    calibration = de.load_calibration(args.calibration) if args.calibration else de.load_calibration()
    summary: Dict[str, Any] = {}
    for split in args.splits:
        rows = load(Path(args.cache), split)
        print(f"\n== {split}: {len(rows)} samples", {c: sum(r['label'] == c for r in rows) for c in CLASSES})
        variants = [("evidence", False, False)]
        if de.STATED_MODEL in calibration.models:
            variants.append((de.STATED_MODEL, False, True))
        if all("network" in r for r in rows) and "evidence+network" in calibration.models:
            variants.append(("evidence+network", True, False))
        for name, network, stated in variants:
            s = score(rows, calibration, network, stated)
            summary[f"{split}/{name}"] = {k: v for k, v in s.items() if k not in ("pred", "probs")}
            print(f"-- {name}: accuracy {s['accuracy']:.3f}  ECE10 {s['ece10']:.3f}  NLL {s['nll']:.3f}  "
                  f"real clean volumes 'none' {s['real_none_accuracy']} (n={s['real_none_n']})")
            print("   per class", {k: (round(v, 3) if v is not None else None) for k, v in s["per_class"].items()})
            print(f"   real volumes as they are (whole + sub-block) called none: {s['real_as_is_none_accuracy']}",
                  s["real_as_is"])
            print("   correct per sample kind", s["by_variant"])
            print("   confusion (rows truth, columns predicted)", CLASSES)
            for c, line in zip(CLASSES, s["confusion"]):
                print(f"   {c:8s}", line)
            for r, q, p in zip(rows, s["pred"], s["probs"]):
                if CLASSES[q] != r["label"] or args.verbose:
                    print(f"   {'WRONG' if CLASSES[q] != r['label'] else 'ok':5s} {r['id']:60s} {r['label']:8s} -> "
                          f"{CLASSES[q]:8s} p={max(p):.2f}")
        if all("network" in r for r in rows):
            summary[f"{split}/network-alone"] = raw_network(rows)
            print("-- network alone:", summary[f"{split}/network-alone"])
    if args.summary:
        Path(args.summary).write_text(json.dumps(summary, indent=1) + "\n")


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("samples")
    p.add_argument("--real-data", default="real_data")
    p.add_argument("--cache", default="/tmp/de_cache")
    p.add_argument("--splits", nargs="+", default=["train", "validation"])
    p.add_argument("--no-network", dest="network", action="store_false")
    p.set_defaults(func=cmd_samples)
    p = sub.add_parser("refeature")
    p.add_argument("--cache", default="/tmp/de_cache")
    p.set_defaults(func=cmd_refeature)
    p = sub.add_parser("renetwork")
    p.add_argument("--real-data", default="real_data")
    p.add_argument("--cache", default="/tmp/de_cache")
    p.add_argument("--weights")
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(func=cmd_renetwork)
    p = sub.add_parser("fit")
    p.add_argument("--cache", default="/tmp/de_cache")
    p.add_argument("--write")
    p.add_argument("--without-network", metavar="REASON",
                   help="do not fit the evidence+network model; REASON is recorded in fitted_on.network")
    p.set_defaults(func=cmd_fit)
    p = sub.add_parser("validate")
    p.add_argument("--cache", default="/tmp/de_cache")
    p.add_argument("--calibration")
    p.add_argument("--splits", nargs="+", default=["validation"])
    p.add_argument("--summary")
    p.add_argument("--verbose", action="store_true")
    p.set_defaults(func=cmd_validate)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main(sys.argv[1:])
