"""Subject-hierarchy folder and provenance attributes of one UniFuse run.

Each run gets one folder ``UniFuse: <moving> -> <reference>`` placed next to the reference volume (under
the reference's patient/study when it has one). Every output node and the folder item carry attributes
naming the inputs, the options and the model, so a saved scene documents how its outputs were made:

========================  =========================================================================
attribute                 value
========================  =========================================================================
``UniFuse.Role``          output role (``fused``, ``aligned``, ``displacement``, ``error_map``, ...)
``UniFuse.Reference``     reference node name; ``UniFuse.ReferenceID`` its node ID
``UniFuse.Moving``        moving node name; ``UniFuse.MovingID`` its node ID
``UniFuse.Options``       JSON of the requested options (degradation, device, weights, working size)
``UniFuse.ModelID``       model identifier from the report (config + checkpoint hash)
``UniFuse.ModelTrained``  ``true``/``false``
``UniFuse.Version``       unifuse package version that produced the outputs
``UniFuse.Degradation``   degradation class that was used
``UniFuse.Probabilities`` JSON of the classifier probabilities
========================  =========================================================================

The folder item additionally holds ``UniFuse.Report`` (the full run report as JSON).
"""

from __future__ import annotations

import json
from typing import Any, Dict, Iterable, Mapping, Optional

import slicer

__all__ = [
    "ATTRIBUTE_PREFIX",
    "ROLE_ATTRIBUTE",
    "folder_name",
    "provenance_attributes",
    "create_output_folder",
    "reusable_output_folder",
    "update_output_folder",
    "place_in_folder",
    "tag_node",
]

ATTRIBUTE_PREFIX = "UniFuse."
ROLE_ATTRIBUTE = "UniFuse.Role"


def folder_name(reference_name: str, moving_name: str) -> str:
    """Name of the output folder of a run: ``UniFuse: <moving> -> <reference>``."""
    return f"UniFuse: {moving_name} -> {reference_name}"


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def provenance_attributes(
    reference_node: "slicer.vtkMRMLNode",
    moving_node: "slicer.vtkMRMLNode",
    options: Mapping[str, Any],
    report: Mapping[str, Any],
    degradation: str,
    probabilities: Mapping[str, float],
) -> Dict[str, str]:
    """The ``UniFuse.*`` attributes (all strings) describing one run; see the module docstring."""
    model = report.get("model", {}) if isinstance(report.get("model"), Mapping) else {}
    return {
        "UniFuse.Reference": reference_node.GetName() or "",
        "UniFuse.ReferenceID": reference_node.GetID() or "",
        "UniFuse.Moving": moving_node.GetName() or "",
        "UniFuse.MovingID": moving_node.GetID() or "",
        "UniFuse.Options": _json(dict(options)),
        "UniFuse.ModelID": str(model.get("id", "unknown")),
        "UniFuse.ModelTrained": "true" if model.get("trained", False) else "false",
        "UniFuse.Version": str(report.get("unifuse_version", "unknown")),
        "UniFuse.Degradation": str(degradation),
        "UniFuse.Probabilities": _json({k: float(v) for k, v in probabilities.items()}),
    }


def tag_node(node: "slicer.vtkMRMLNode", role: str, attributes: Mapping[str, str]) -> None:
    """Write the provenance attributes and the output role onto a node."""
    for key, value in attributes.items():
        node.SetAttribute(key, value)
    node.SetAttribute(ROLE_ATTRIBUTE, role)


def _subject_hierarchy(scene: "slicer.vtkMRMLScene") -> "slicer.vtkMRMLSubjectHierarchyNode":
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if sh is None:
        raise RuntimeError("the scene has no subject hierarchy node")
    return sh


def _item_of(sh: "slicer.vtkMRMLSubjectHierarchyNode", node: "slicer.vtkMRMLNode", parent: int) -> int:
    """Subject-hierarchy item of ``node``; created under ``parent`` when the scene has none for it yet
    (a scene without Slicer's subject-hierarchy logic does not create items automatically)."""
    item = sh.GetItemByDataNode(node)
    if item == sh.GetInvalidItemID():
        item = sh.CreateItem(parent, node)
    return item


def create_output_folder(
    reference_node: "slicer.vtkMRMLNode",
    moving_node: "slicer.vtkMRMLNode",
    attributes: Mapping[str, str],
    report: Optional[Mapping[str, Any]] = None,
) -> int:
    """Create the run's folder item next to the reference volume and tag it.

    Returns:
        The subject-hierarchy item ID of the new folder.
    """
    scene = reference_node.GetScene()
    sh = _subject_hierarchy(scene)
    reference_item = _item_of(sh, reference_node, sh.GetSceneItemID())
    parent = sh.GetItemParent(reference_item)
    if parent == sh.GetInvalidItemID():
        parent = sh.GetSceneItemID()
    name = folder_name(reference_node.GetName() or "reference", moving_node.GetName() or "moving")
    folder = sh.CreateFolderItem(parent, name)
    for key, value in attributes.items():
        sh.SetItemAttribute(folder, key, value)
    sh.SetItemAttribute(folder, ROLE_ATTRIBUTE, "folder")
    if report is not None:
        sh.SetItemAttribute(folder, "UniFuse.Report", _json(dict(report)))
    return folder


def reusable_output_folder(nodes: Iterable[Optional["slicer.vtkMRMLNode"]]) -> Optional[int]:
    """The UniFuse run folder holding *all* ``nodes`` (the complete output set of one earlier run), else None.

    A rerun that overwrites every output of an earlier run reuses its folder instead of adding a new one.
    """
    nodes = list(nodes)
    if not nodes or any(n is None or n.GetScene() is None for n in nodes):
        return None
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(nodes[0].GetScene())
    if sh is None:
        return None
    parents = set()
    for node in nodes:
        item = sh.GetItemByDataNode(node)
        if item == sh.GetInvalidItemID():
            return None
        parents.add(sh.GetItemParent(item))
    if len(parents) != 1:
        return None
    folder = parents.pop()
    if folder in (sh.GetInvalidItemID(), sh.GetSceneItemID()) or sh.GetItemAttribute(folder, ROLE_ATTRIBUTE) != "folder":
        return None
    return int(folder)


def update_output_folder(
    folder: int,
    reference_node: "slicer.vtkMRMLNode",
    moving_node: "slicer.vtkMRMLNode",
    attributes: Mapping[str, str],
    report: Optional[Mapping[str, Any]] = None,
) -> int:
    """Rename and re-tag an existing run folder for a rerun that overwrites its outputs."""
    sh = _subject_hierarchy(reference_node.GetScene())
    sh.SetItemName(folder, folder_name(reference_node.GetName() or "reference", moving_node.GetName() or "moving"))
    for key, value in attributes.items():
        sh.SetItemAttribute(folder, key, value)
    sh.SetItemAttribute(folder, ROLE_ATTRIBUTE, "folder")
    if report is not None:
        sh.SetItemAttribute(folder, "UniFuse.Report", _json(dict(report)))
    return folder


def place_in_folder(nodes: Iterable["slicer.vtkMRMLNode"], folder_item: int) -> None:
    """Move the subject-hierarchy items of ``nodes`` (created if missing) under ``folder_item``."""
    nodes = [n for n in nodes if n is not None]
    if not nodes:
        return
    sh = _subject_hierarchy(nodes[0].GetScene())
    for node in nodes:
        item = _item_of(sh, node, folder_item)
        sh.SetItemParent(item, folder_item)
