"""Static checks of the Qt shell (no Qt here): the .ui file, the widget code that uses it, the parameter node,
the module description, the packaging list in UniFuseSlicer/CMakeLists.txt and the generated icon.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "UniFuseSlicer"
MODULE_FILE = MODULE_DIR / "UniFuseSlicer.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "UniFuseSlicer.ui"
ICON_FILE = MODULE_DIR / "Resources" / "Icons" / "UniFuseSlicer.png"

CUSTOM_WIDGET_TYPES = {  # parameter-node GUI connectors of Slicer: widget class -> accepted annotation
    "qMRMLNodeComboBox": "node",
    "QCheckBox": "bool",
    "QSpinBox": "int",
    "QDoubleSpinBox": "float",
    "ctkSliderWidget": "float",
}


@pytest.fixture(scope="module")
def ui():
    return ET.parse(UI_FILE).getroot()


@pytest.fixture(scope="module")
def module_source():
    return MODULE_FILE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def module_ast(module_source):
    return ast.parse(module_source)


def widgets(ui) -> dict:
    return {w.get("name"): w for w in ui.iter("widget")}


def string_property(widget, name):
    for prop in widget.findall("property"):
        if prop.get("name") == name:
            node = prop.find("string")
            return node.text if node is not None else None
    return None


def parameter_fields(module_ast) -> dict:
    """name -> annotation source of the class decorated with @parameterNodeWrapper."""
    for node in module_ast.body:
        if isinstance(node, ast.ClassDef) and any(
            (isinstance(d, ast.Name) and d.id == "parameterNodeWrapper") for d in node.decorator_list
        ):
            return {s.target.id: ast.unparse(s.annotation) for s in node.body if isinstance(s, ast.AnnAssign)}
    raise AssertionError("no @parameterNodeWrapper class in UniFuseSlicer.py")


def test_ui_parses_with_a_mrml_root_widget(ui):
    assert ui.tag == "ui"
    root = ui.find("widget")
    assert root.get("class") == "qMRMLWidget" and root.get("name") == "UniFuseSlicer"


def test_every_widget_the_code_uses_exists_in_the_ui(ui, module_source):
    used = set(re.findall(r"self\.ui\.(\w+)", module_source))
    assert {"applyButton", "referenceSelector", "movingSelector", "progressBar"} <= used | set(widgets(ui))
    missing = sorted(used - set(widgets(ui)))
    assert not missing, f"UniFuseSlicer.py uses widgets missing from the .ui: {missing}"


def test_widget_classes_are_qt_or_declared_custom_widgets(ui):
    declared = {c.findtext("class") for c in ui.iter("customwidget")}
    for name, widget in widgets(ui).items():
        cls = widget.get("class")
        assert cls.startswith("Q") or cls in declared, f"{name}: class {cls} is not declared in <customwidgets>"


def test_node_selectors_receive_the_scene(ui):
    receivers = {c.findtext("receiver") for c in ui.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)" and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    selectors = {n for n, w in widgets(ui).items() if w.get("class") == "qMRMLNodeComboBox"}
    assert len(selectors) == 8
    assert selectors <= receivers


def test_parameter_names_in_the_ui_match_typed_parameter_node_fields(ui, module_ast):
    fields = parameter_fields(module_ast)
    bound = {}
    for name, widget in widgets(ui).items():
        parameter = string_property(widget, "SlicerParameterName")
        if parameter is None:
            continue
        assert parameter in fields, f"widget {name} is bound to unknown parameter {parameter}"
        assert parameter not in bound, f"parameter {parameter} bound twice"
        bound[parameter] = widget.get("class")
        kind = CUSTOM_WIDGET_TYPES[widget.get("class")]
        annotation = fields[parameter]
        if kind == "node":
            assert annotation.startswith("vtkMRML"), (name, annotation)
        elif kind == "float":  # a slider needs a bounded float
            assert annotation.startswith("Annotated[float") and "WithinRange" in annotation, (name, annotation)
        else:
            assert annotation == kind or annotation.startswith(f"Annotated[{kind}"), (name, annotation)
    assert {"referenceVolume", "movingVolume", "foregroundOpacity", "showGrid", "workingSpacing", "keepTemporaryFiles",
            "placeMovingUnderTransform", "fitViews"} <= set(bound)


def test_parameter_node_fields_used_by_the_widget_exist(module_source, module_ast):
    fields = set(parameter_fields(module_ast))
    wrapper_methods = {"StartModify", "EndModify", "connectGui", "disconnectGui", "AddObserver", "RemoveObserver"}
    used = set(re.findall(r"_parameterNode\.(\w+)", module_source)) | set(re.findall(r"\bp\.(\w+)", module_source))
    unknown = sorted(used - fields - wrapper_methods)
    assert not unknown, f"unknown parameter node fields: {unknown}"


def test_module_classes_follow_the_scripted_module_template(module_ast):
    bases = {n.name: [ast.unparse(b) for b in n.bases] for n in module_ast.body if isinstance(n, ast.ClassDef)}
    assert bases["UniFuseSlicer"] == ["ScriptedLoadableModule"]
    assert bases["UniFuseSlicerWidget"] == ["ScriptedLoadableModuleWidget", "VTKObservationMixin"]
    assert bases["UniFuseSlicerLogic"] == ["ScriptedLoadableModuleLogic"]
    assert bases["UniFuseSlicerTest"] == ["ScriptedLoadableModuleTest"]
    init = next(n for n in module_ast.body if isinstance(n, ast.ClassDef) and n.name == "UniFuseSlicer").body[1]
    assignments = {ast.unparse(a.targets[0]): a.value for a in ast.walk(init) if isinstance(a, ast.Assign)}
    # title and category go through Slicer's translation functions: _("UniFuse"), translate(context, "Registration")
    assert ast.unparse(assignments["self.parent.title"]) == "_('UniFuse')"
    assert ast.unparse(assignments["self.parent.categories"]) == "[translate('qSlicerAbstractCoreModule', 'Registration')]"
    assert ast.literal_eval(assignments["self.parent.contributors"])
    help_text = ast.unparse(assignments["self.parent.helpText"])
    assert "CITATION" in help_text and "UniFuseSlicerLogic().process" in help_text
    assert "acknowledgementText" in "".join(assignments)


def _widget_methods(module_ast) -> dict:
    widget = next(n for n in module_ast.body if isinstance(n, ast.ClassDef) and n.name == "UniFuseSlicerWidget")
    return {f.name: ast.unparse(f) for f in widget.body if isinstance(f, ast.FunctionDef)}


def _form_items(ui, layout_name) -> dict:
    """(row, column) -> widget of the items of a form layout."""
    layout = next(l for l in ui.iter("layout") if l.get("name") == layout_name)
    return {(int(i.get("row")), int(i.get("column"))): i.find("widget") for i in layout.findall("item")}


def test_moving_modality_combo_sits_under_the_degradation_combo(ui):
    items = _form_items(ui, "inputsFormLayout")
    where = {w.get("name"): cell for cell, w in items.items()}
    row, column = where["degradationComboBox"]
    assert where["movingModalityComboBox"] == (row + 1, column)
    label = items[(row + 1, 0)]
    assert label.get("name") == "movingModalityLabel" and string_property(label, "text") == "Moving modality:"
    combo = widgets(ui)["movingModalityComboBox"]
    assert combo.get("class") == "QComboBox"
    tooltip = string_property(combo, "toolTip")
    for words in ("motion artifacts only in MRI", "low-dose noise only in PET", "metal artifacts only in CT",
                  "Automatic reads the modality of a volume loaded from the DICOM database"):
        assert words in tooltip


@pytest.mark.parametrize("combo, field, option", [
    ("degradationComboBox", "degradation", "degradation"),
    ("movingModalityComboBox", "movingModality", "moving_modality"),
])
def test_option_combo_is_filled_synchronised_and_passed_to_the_run(module_ast, combo, field, option):
    """The moving-modality combo is wired exactly like the degradation combo: filled from its choices,
    synchronised both ways with the parameter node (default "auto"), passed to the run as its FuseOptions field."""
    defaults = {}
    for node in module_ast.body:
        if isinstance(node, ast.ClassDef) and node.name == "UniFuseSlicerParameterNode":
            defaults = {a.target.id: ast.unparse(a.value) for a in node.body if isinstance(a, ast.AnnAssign) and a.value}
    assert parameter_fields(module_ast)[field] == "str" and defaults[field] == "'auto'"
    methods = _widget_methods(module_ast)
    choices = "DEGRADATION_CHOICES" if field == "degradation" else "MOVING_MODALITY_CHOICES"
    assert re.search(rf"for choice in {choices}:\s*self\.ui\.{combo}\.addItem\(\w+\[choice\.value\], choice\.value\)",
                     methods["setup"])
    assert f"self.ui.{combo}.currentIndexChanged.connect(self._onComboBoxesChanged)" in methods["setup"]
    assert f"self._parameterNode.{field} = self.ui.{combo}.currentData or 'auto'" in methods["_onComboBoxesChanged"]
    assert f"self._selectComboValue(self.ui.{combo}, self._parameterNode.{field})" in methods["_onParameterNodeModified"]
    assert f"'{option}': p.{field}" in methods["_runRequest"]


def test_moving_modality_choices_reach_fuse_options():
    from unifuse.options import FuseOptions
    from UniFuseSlicerLib.options import MOVING_MODALITY_CHOICES

    assert [c.value for c in MOVING_MODALITY_CHOICES] == ["auto", "ct", "mr", "pet"]
    for choice in MOVING_MODALITY_CHOICES:
        assert FuseOptions(moving_modality=choice.value).moving_modality == choice.value


def _git_source_files() -> set:
    """Files of UniFuseSlicer/ a source checkout has (tracked + untracked, minus .gitignore'd)."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "UniFuseSlicer"],
                         cwd=ROOT, check=True, capture_output=True, text=True).stdout
    files = {line[len("UniFuseSlicer/"):] for line in out.splitlines() if line}
    return {f for f in files if (MODULE_DIR / f).is_file()}


def _cmake_packaged_files(tmp_path) -> tuple:
    """Evaluate UniFuseSlicer/CMakeLists.txt with CMake itself, Slicer's macros replaced by recorders."""
    driver = tmp_path / "src"
    driver.mkdir()
    (driver / "CMakeLists.txt").write_text(f"""
cmake_minimum_required(VERSION 3.16)
project(UniFuseSlicerPackagingCheck NONE)
function(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(M "WITH_GENERIC_TESTS" "NAME" "SCRIPTS;RESOURCES" ${{ARGN}})
  string(REPLACE ";" "\\n" scripts "${{M_SCRIPTS}}")
  string(REPLACE ";" "\\n" resources "${{M_RESOURCES}}")
  file(WRITE "${{CMAKE_BINARY_DIR}}/scripts.txt" "${{scripts}}")
  file(WRITE "${{CMAKE_BINARY_DIR}}/resources.txt" "${{resources}}")
  file(WRITE "${{CMAKE_BINARY_DIR}}/name.txt" "${{M_NAME}}")
endfunction()
function(slicer_add_python_unittest)
  file(WRITE "${{CMAKE_BINARY_DIR}}/unittest.txt" "${{ARGN}}")
endfunction()
set(BUILD_TESTING ON)
add_subdirectory("{MODULE_DIR.as_posix()}" module)
""", encoding="utf-8")
    build = tmp_path / "build"
    subprocess.run(["cmake", "-S", str(driver), "-B", str(build)], check=True, capture_output=True, text=True)
    read = lambda name: [l for l in (build / name).read_text(encoding="utf-8").splitlines() if l]  # noqa: E731
    return read("scripts.txt"), read("resources.txt"), (build / "name.txt").read_text(encoding="utf-8"), (build / "unittest.txt").read_text(encoding="utf-8")


@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("git") is None, reason="needs cmake and git")
def test_cmake_packages_the_module_and_its_resources(tmp_path):
    """The shell, every file of the MRML glue library, the UI, icon, weights and sample data are packaged;
    which core modules ship is checked against what inference imports in test_slicer_packaging.py."""
    scripts, resources, name, unittest = _cmake_packaged_files(tmp_path)
    assert name == "UniFuseSlicer" and unittest == "SCRIPT;UniFuseSlicer.py"
    assert all(s.endswith(".py") for s in scripts) and not any(r.endswith(".py") for r in resources)
    packaged = set(scripts) | set(resources)
    assert len(packaged) == len(scripts) + len(resources), "a file is listed twice"
    for f in packaged:
        assert (MODULE_DIR / f).is_file(), f"CMakeLists.txt lists a missing file: {f}"
    source = _git_source_files() - {"CMakeLists.txt"}
    outside_core = {f for f in source if not f.startswith("unifuse/") and not f.startswith("unifuse.egg-info/")}
    assert not outside_core - packaged, f"files not packaged: {sorted(outside_core - packaged)}"
    assert "unifuse/pipeline.py" in scripts and "unifuse/cli.py" in scripts  # the core ships with the module
    assert {"UniFuseSlicer.py", "Resources/UI/UniFuseSlicer.ui", "Resources/Icons/UniFuseSlicer.png"} <= packaged


def test_icon_is_the_generated_128px_rgba_image():
    vtk = pytest.importorskip("vtk")
    from vtkmodules.util import numpy_support

    from UniFuseSlicerLib.icon import ICON_SIZE, render_icon

    reader = vtk.vtkPNGReader()
    reader.SetFileName(str(ICON_FILE))
    reader.Update()
    image = reader.GetOutput()
    assert image.GetDimensions()[:2] == (ICON_SIZE, ICON_SIZE) == (128, 128)
    assert image.GetPointData().GetScalars().GetNumberOfComponents() == 4
    pixels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(128, 128, 4)[::-1]
    assert np.array_equal(pixels, render_icon()), "the shipped icon differs from UniFuseSlicerLib.icon.render_icon()"
    assert pixels[..., 3].min() == 0 and pixels[64, 64, 3] == 255  # rounded corners, opaque centre
    assert len(np.unique(pixels.reshape(-1, 4), axis=0)) > 200  # a drawing, not a flat placeholder
