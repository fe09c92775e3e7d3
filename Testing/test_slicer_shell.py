"""The Qt shell UniFuseSlicer.py as reviewers and users meet it, without a Slicer GUI:

* the module file imports, and its self-test runs the scene side, with torch blocked from import (what
  ctest and "Reload and Test" do on a Slicer without PyTorch); the network part is skipped with a logged
  reason, and torch is never imported;
* every user-visible string of the widget goes through ``_()`` (Slicer's ``slicer.i18n.tr``);
* the module description: real contributor line (no placeholder), plain-language help with the
  limitations, the method paper as citation (no code URL);
* the ExtensionsIndex description file ``UniFuseSlicer.json`` against the catalog-entry schema.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "UniFuseSlicer"
MODULE_FILE = MODULE_DIR / "UniFuseSlicer.py"
INDEX_FILE = ROOT / "UniFuseSlicer.json"

pytest.importorskip("slicer")

# ---------------------------------------------------------------------------------------------------------
# import and self-test without torch (subprocess: torch must not be imported anywhere in it)

DRIVER = textwrap.dedent(r'''
    import logging, sys, types, unittest

    class BlockTorch:
        """Makes `import torch` fail like on a Slicer without the PyTorch extension."""
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError(f"{name} is blocked for this test")
            return None

    sys.meta_path.insert(0, BlockTorch())
    sys.path.insert(0, MODULE_DIR)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="LOG %(levelname)s %(message)s")

    import slicer

    # What only Slicer's application provides (slicer-core has MRML, not Qt or the scripted-module base classes).
    sys.modules["qt"] = types.ModuleType("qt")
    slm = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleLogic:
        def __init__(self):
            pass

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, msec=1000):
            print("DISPLAY", message)

    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic, ScriptedLoadableModuleTest):
        setattr(slm, cls.__name__, cls)
    sys.modules["slicer.ScriptedLoadableModule"] = slicer.ScriptedLoadableModule = slm
    pnw = types.ModuleType("slicer.parameterNodeWrapper")
    pnw.parameterNodeWrapper = lambda cls: cls
    pnw.WithinRange = lambda low, high: ("WithinRange", low, high)
    sys.modules["slicer.parameterNodeWrapper"] = slicer.parameterNodeWrapper = pnw
    connected = []
    slicer.app = types.SimpleNamespace(connect=lambda *args: connected.append(args))
    slicer.mrmlScene = slicer.vtkMRMLScene()

    import UniFuseSlicer

    parent = types.SimpleNamespace(path=MODULE_DIR + "/UniFuseSlicer.py")
    UniFuseSlicer.UniFuseSlicer(parent)  # the module description (help text formatting included)
    print("TITLE", parent.title, "| CATEGORIES", parent.categories, "| CONTRIBUTORS", parent.contributors)
    assert "{" not in parent.helpText and "not for clinical use" in parent.helpText
    result = unittest.TextTestRunner(stream=sys.stdout, verbosity=2).run(UniFuseSlicer.UniFuseSlicerTest("runTest"))
    print("TORCH_IMPORTED", any(m == "torch" or m.startswith("torch.") for m in sys.modules))
    sys.exit(0 if result.wasSuccessful() else 1)
''')


def test_module_imports_and_self_test_scene_side_runs_without_torch(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(f"MODULE_DIR = {str(MODULE_DIR)!r}\n" + DRIVER, encoding="utf-8")
    out = subprocess.run([sys.executable, str(driver)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert "TITLE UniFuse | CATEGORIES ['Registration'] | CONTRIBUTORS" in text
    assert "DISPLAY Scene side passed" in text  # the scene side ran
    assert re.search(r"LOG WARNING UniFuse self-test: network part skipped: PyTorch is not installed", text), text
    assert "TORCH_IMPORTED False" in text
    assert "OK" in text.splitlines()[-3:] or "\nOK" in text


# ---------------------------------------------------------------------------------------------------------
# translatable strings

#: Attributes whose assigned value is shown to the user.
TEXT_ATTRIBUTES = {"text", "toolTip", "title", "helpText", "acknowledgementText", "windowTitle", "plainText",
                   "placeholderText", "statusTip", "whatsThis", "specialValueText", "suffix", "prefix"}
#: Calls whose first argument (and these keywords) are shown to the user.
TEXT_CALLS = {"setText", "setToolTip", "setWindowTitle", "addItem", "insertItem", "appendPlainText", "setPlainText",
              "showMessage", "setPlaceholderText", "errorDisplay", "warningDisplay", "infoDisplay",
              "confirmOkCancelDisplay", "confirmYesNoDisplay", "messageBox", "tryWithErrorDisplay",
              "_appendLog", "_setProgress", "setItemText"}
TEXT_KEYWORDS = {"text", "windowTitle", "title", "informativeText"}
#: Scopes of user-visible strings: the module description and the widget (not the self-test, not logging).
SCANNED_CLASSES = {"UniFuseSlicer", "UniFuseSlicerWidget", "_WidgetRunView"}


def _has_words(text: str) -> bool:
    return bool(re.search(r"[A-Za-z]{2}", text))


def _is_translated(node: ast.AST) -> bool:
    """True unless ``node`` shows a hard-coded English string: literals must come through _() / translate()."""
    if isinstance(node, ast.Call):
        func = node.func
        if isinstance(func, ast.Name) and func.id in ("_", "translate"):
            return True
        if isinstance(func, ast.Attribute) and func.attr == "format":
            return _is_translated(func.value) and all(_is_translated(a) for a in node.args)
        return True  # a value computed at run time (a summary, a node name): data, not UI text
    if isinstance(node, ast.Constant):
        return not (isinstance(node.value, str) and _has_words(node.value))
    if isinstance(node, ast.JoinedStr):
        return not any(isinstance(v, ast.Constant) and _has_words(str(v.value)) for v in node.values)
    if isinstance(node, ast.BinOp):
        return _is_translated(node.left) and _is_translated(node.right)
    if isinstance(node, ast.IfExp):
        return _is_translated(node.body) and _is_translated(node.orelse)
    if isinstance(node, (ast.List, ast.Tuple)):
        return all(_is_translated(e) for e in node.elts)
    return True  # names, attributes, subscripts: variables


def untranslated_strings(source: str) -> list:
    """(line, snippet) of every user-visible string literal in the scanned classes that bypasses _()."""
    tree = ast.parse(source)
    problems = []

    def check(node: ast.AST, where: ast.AST) -> None:
        if not _is_translated(node):
            problems.append((where.lineno, ast.unparse(where)[:100]))

    for cls in tree.body:
        if not (isinstance(cls, ast.ClassDef) and cls.name in SCANNED_CLASSES):
            continue
        for node in ast.walk(cls):
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Attribute) and target.attr in TEXT_ATTRIBUTES | {"categories"}:
                        check(node.value, node)
            elif isinstance(node, ast.Call):
                name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                if name in TEXT_CALLS:
                    args = node.args[1:2] if name in ("setItemText", "insertItem") else node.args[:1]
                    for arg in args:
                        check(arg, node)
                    for keyword in node.keywords:
                        if keyword.arg in TEXT_KEYWORDS:
                            check(keyword.value, node)
            elif isinstance(node, ast.FunctionDef) and re.fullmatch(r"_\w+Labels", node.name):
                for inner in ast.walk(node):  # label tables: every value string is translated
                    if isinstance(inner, ast.Dict):
                        for value in inner.values:
                            check(value, inner)
    return problems


def test_the_scanner_catches_untranslated_strings():
    bad = textwrap.dedent('''
        class UniFuseSlicerWidget:
            def f(self):
                self.ui.applyButton.text = "Apply"
                self.ui.applyButton.toolTip = _("ok")
                slicer.util.errorDisplay(f"UniFuse failed: {error}")
                slicer.util.errorDisplay(_("Failed.") + "\\n\\n" + message, windowTitle="Oops")
                self.ui.combo.addItem("Fused volume", "fused")
                self._appendLog(_("done {n}").format(n=3))
            def _modeLabels(self):
                return {"new": _("Create new"), "update": "Update"}
    ''')
    lines = sorted(line for line, _ in untranslated_strings(bad))
    assert lines == [4, 6, 7, 8, 11]


def test_every_user_visible_string_of_the_widget_is_translatable():
    source = MODULE_FILE.read_text(encoding="utf-8")
    assert untranslated_strings(source) == []
    tree = ast.parse(source)
    # _() comes from Slicer's i18n module, with a fallback for Slicer versions without it
    imports = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "slicer.i18n"]
    assert {a.name for n in imports for a in n.names} == {"tr", "translate"}
    assert "except ImportError" in source
    # the label tables cover exactly the values the core accepts
    widget = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "UniFuseSlicerWidget")
    from UniFuseSlicerLib import options

    tables = {f.name: f for f in widget.body if isinstance(f, ast.FunctionDef) and f.name.endswith("Labels")}
    keys = {name: {k.value for d in ast.walk(f) if isinstance(d, ast.Dict) for k in d.keys} for name, f in tables.items()}
    assert keys["_degradationLabels"] == set(options.degradation_values())
    assert keys["_movingModalityLabels"] == set(options.moving_modality_values())
    assert keys["_overlayLabels"] == {c.value for c in options.OVERLAY_CHOICES}
    assert keys["_outputModeLabels"] == {c.value for c in options.OUTPUT_MODE_CHOICES}
    assert keys["_deviceLabels"] == set(options.DEVICE_VALUES)


# ---------------------------------------------------------------------------------------------------------
# module description


def _module_assignments():
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    module = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "UniFuseSlicer")
    init = next(f for f in module.body if isinstance(f, ast.FunctionDef) and f.name == "__init__")
    constants = {ast.unparse(n.targets[0]): ast.literal_eval(n.value) for n in tree.body
                 if isinstance(n, ast.Assign) and isinstance(n.value, (ast.Constant, ast.JoinedStr)) and
                 isinstance(n.targets[0], ast.Name) and isinstance(n.value, ast.Constant)}
    assigned = {ast.unparse(a.targets[0]): a.value for a in ast.walk(init) if isinstance(a, ast.Assign)}
    return constants, assigned


def _translated_literal(node) -> str:
    """The literal inside ``_("...").format(...)``."""
    while isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format":
        node = node.func.value
    assert isinstance(node, ast.Call) and node.func.id == "_"
    return node.args[0].value


def test_description_is_plain_honest_and_cites_the_paper():
    constants, assigned = _module_assignments()
    contributors = ast.literal_eval(assigned["self.parent.contributors"])
    assert contributors and "UniFuseSlicer contributors" not in contributors
    help_text = _translated_literal(assigned["self.parent.helpText"])
    for phrase in ("not for clinical use", "research use", "synthetic", "keeps the result of the previous step",
                   "warning"):
        assert phrase in help_text, phrase
    citation = constants["CITATION"]
    assert "Su" in citation and "Degradations and Misalignments" in citation and "2025" in citation
    assert "http" not in citation and "github" not in citation.lower()  # no code URL: none holds the paper's code


# ---------------------------------------------------------------------------------------------------------
# ExtensionsIndex description file

#: Slicer's extension catalog-entry schema v1.0.1 (Slicer/Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json,
#: as used by the ExtensionsIndex's check_description_files.py): required keys, and the keys and types allowed
#: (additionalProperties: false).
SCHEMA_URL = "https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json#"
REQUIRED = ("$schema", "category", "scm_url")
PROPERTIES = {"$schema": str, "category": str, "scm_url": str, "scm_revision": str, "scm_type": str,
              "build_dependencies": list, "build_subdirectory": str, "enabled": bool, "tier": int}
#: Categories the ExtensionsIndex check accepts (excerpt: those an image-registration extension could use).
ACCEPTED_CATEGORIES = {"Registration", "Filtering", "Quantification", "Segmentation", "Utilities"}


def test_extensions_index_description_validates():
    description = json.loads(INDEX_FILE.read_text(encoding="utf-8"))
    for key in REQUIRED:
        assert key in description and description[key], f"required key {key} missing"
    assert set(description) <= set(PROPERTIES), f"keys not in the schema: {set(description) - set(PROPERTIES)}"
    for key, value in description.items():
        assert isinstance(value, PROPERTIES[key]) and not (PROPERTIES[key] is int and isinstance(value, bool)), key
    assert description["$schema"] == SCHEMA_URL
    assert description.get("scm_type", "git") in ("git", "local")
    assert 1 <= description.get("tier", 1) <= 5
    assert all(isinstance(d, str) for d in description.get("build_dependencies", []))
    # the index's own checks: category known, https/git URL, repository name with "Slicer", file name = project()
    assert description["category"] in ACCEPTED_CATEGORIES
    assert re.match(r"^(https|git)://", description["scm_url"])
    assert "slicer" in description["scm_url"].rstrip("/").rsplit("/", 1)[-1].lower()
    cmake = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.search(r"project\(\s*([^\s)]+)", cmake).group(1) == INDEX_FILE.stem
    assert f'set(EXTENSION_CATEGORY "{description["category"]}")' in cmake
    depends = re.search(r'set\(EXTENSION_DEPENDS "([^"]*)"\)', cmake).group(1).split()
    assert sorted(description.get("build_dependencies", [])) == sorted(depends)
    for key in ("EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        assert re.search(rf'set\({key} "https://', cmake), key
    assert 'UniFuseSlicer contributors"' not in cmake


# ---------------------------------------------------------------------------------------------------------
# dependencies: one question (the widget's), then Slicer's own mechanisms


class _Recorder:
    def __init__(self, result=True):
        self.calls = []
        self.result = result

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.result


def test_dependencies_are_installed_without_further_questions(tmp_path, monkeypatch):
    import types

    from UniFuseSlicerLib import dependencies

    monkeypatch.setattr(dependencies, "installation_plan", lambda: dependencies.InstallationPlan(True, "2.13.0"))
    install_torch = _Recorder(result=types.SimpleNamespace(__version__="2.13.0"))
    pytorch_utils = types.SimpleNamespace(PyTorchUtilsLogic=lambda: types.SimpleNamespace(installTorch=install_torch))
    plan = dependencies.InstallationPlan(torch_ok=False, torch_version=None, pip_requirements=["scipy>=1.10", "nibabel>=4"])

    # Slicer with slicer.pydeps.pip_ensure (5.11+)
    ensure = _Recorder()
    slicer_new = types.SimpleNamespace(pydeps=types.SimpleNamespace(pip_ensure=ensure), util=types.SimpleNamespace())
    final = dependencies.install(plan, slicer_new, tmp_path, import_module=lambda name: pytorch_utils)
    assert final.ready
    assert install_torch.calls == [((), {"askConfirmation": False, "torchVersionRequirement": ">=2.1"})]
    (args, kwargs), = ensure.calls
    assert [str(r) for r in args[0]] == ["scipy>=1.10", "nibabel>=4"] and kwargs["requester"] == "UniFuse"
    pinned = Path(kwargs["constraints"]).read_text(encoding="utf-8").splitlines()
    assert any(line.startswith("numpy==") for line in pinned) and any(line.startswith("SimpleITK==") for line in pinned)

    # older Slicer: slicer.util.pip_install with a constraints file
    pip_install = _Recorder()
    slicer_old = types.SimpleNamespace(util=types.SimpleNamespace(pip_install=pip_install))
    dependencies.install(dependencies.InstallationPlan(True, "2.13.0", ["scipy>=1.10"]), slicer_old, tmp_path,
                         import_module=lambda name: pytorch_utils)
    (args, _), = pip_install.calls
    assert args[0][:2] == ["scipy>=1.10", "--constraint"] and Path(args[0][2]).is_file()

    # no PyTorch extension, or PyTorch not installed: an error that says what to do
    def missing(name):
        raise ModuleNotFoundError(name)

    with pytest.raises(dependencies.DependencyError, match="PyTorch extension"):
        dependencies.install(plan, slicer_new, tmp_path, import_module=missing)
    install_torch.result = None
    with pytest.raises(dependencies.DependencyError, match="not installed"):
        dependencies.install(plan, slicer_new, tmp_path, import_module=lambda name: pytorch_utils)


def test_the_widget_asks_once_and_never_imports_torch_to_open():
    source = MODULE_FILE.read_text(encoding="utf-8")
    tree = ast.parse(source)
    widget = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "UniFuseSlicerWidget")
    prepare = next(f for f in widget.body if isinstance(f, ast.FunctionDef) and f.name == "_prepareRun")
    calls = [ast.unparse(c.func) for c in ast.walk(prepare) if isinstance(c, ast.Call)]
    assert calls.count("slicer.util.confirmOkCancelDisplay") == 1 and "installDependencies" in calls
    assert "PyTorchUtils" not in ast.unparse(prepare)  # PyTorch goes through dependencies.install, no second dialog
    imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not any("torch" == (getattr(n, "module", None) or "") or any(a.name == "torch" for a in n.names)
                   for n in imports)
    from UniFuseSlicerLib import options

    assert "import torch" not in ast.unparse(next(f for f in ast.parse(Path(options.__file__).read_text()).body
                                                  if isinstance(f, ast.FunctionDef) and f.name == "device_choices"))
