"""UniFuse: align, restore and fuse a degraded, misaligned second modality onto a reference volume.

Thin Slicer shell (module description, Qt widget, self-test). The widget only wires buttons, combo boxes and
a timer to ``UniFuseSlicerLib.controller.RunController``; everything that works on MRML nodes lives in
``UniFuseSlicerLib`` (no Qt; tested with slicer-core) and the network in the Slicer-free ``unifuse`` core.
"""

import logging
import os
from typing import Annotated, Optional

import qt
import vtk

import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.util import VTKObservationMixin
from slicer import vtkMRMLGridTransformNode, vtkMRMLScalarVolumeNode

try:
    from slicer.i18n import tr as _
    from slicer.i18n import translate
except ImportError:  # Slicer before 5.4 has no translation support: show the English text

    def _(text):
        return text

    def translate(context, text):
        return text


from UniFuseSlicerLib.controller import RunController, RunRequest, RunView
from UniFuseSlicerLib.dependencies import install as installDependencies
from UniFuseSlicerLib.dependencies import installation_plan, torch_status, torch_unavailable_reason
from UniFuseSlicerLib.logic import FusionLogic, OutputNodes, dicom_modality
from UniFuseSlicerLib.options import (
    DEGRADATION_CHOICES,
    DEVICE_VALUES,
    MOVING_MODALITY_CHOICES,
    OUTPUT_MODE_CHOICES,
    OVERLAY_CHOICES,
    DeviceProbe,
    modality_from_dicom,
)
from UniFuseSlicerLib.sampledata import register_sample_data

#: The method paper (there is no public code or model of the paper's authors; this module is an independent
#: 3D implementation).
CITATION = (
    "D. Su, Y. Zhang, H. Li, J. Li, Y. Liu. UniFuse: A Unified All-in-One Framework for Multi-Modal Medical "
    "Image Fusion Under Diverse Degradations and Misalignments. 2025."
)
DOCUMENTATION_URL = "https://github.com/unifuse-slicer/UniFuseSlicer/blob/main/docs/slicer.md"


#
# UniFuseSlicer
#


class UniFuseSlicer(ScriptedLoadableModule):
    """Module description shown by Slicer (title, category, help, acknowledgement)."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("UniFuse")
        # "Registration": the module's first job is to bring a second scan into the reference space (its
        # transform and aligned volume are registration outputs), where users look for such tools.
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Registration")]
        self.parent.dependencies = []  # torch comes from the PyTorch extension, installed on first use
        self.parent.contributors = ["UniFuseSlicer developers (independent implementation)"]
        self.parent.helpText = _("""
<p>Brings a second scan of the same patient onto a reference scan and combines the two. The second scan
(<b>moving</b> volume) may be shifted or bent relative to the reference and may be degraded: MRI with motion
artifacts, CT with metal artifacts and noise, or low-dose PET. UniFuse aligns it to the <b>reference</b>
volume, reduces the degradation and computes a fused volume, with one network.</p>
<p>Select the two volumes and press <b>Apply</b>. You get the fused volume, the aligned moving volume, the
restored moving volume, the transform (to show the moving volume aligned), maps of the remaining misalignment
before and after, and a map of where the transform folds space (red). <b>Display</b> switches what is shown
on top of the reference; <b>Results</b> lists the detected degradation, the time taken and any warning or
note.</p>
<p><b>Limitations.</b> For research use only, <b>not for clinical use</b>. The network was trained on
synthetic image pairs (made from a brain template) and fine-tuned on a few real head and chest scans with
simulated second modalities, not on patient data like yours, so check every result against the source images.
When a step of the alignment does not improve the match (judged without ground truth), the pipeline
keeps the result of the previous step and says so in <b>Results</b>; when no step helps, the moving volume is
only placed by its header geometry and a warning is shown. The restored volume (the degradation-specific
restoration of the aligned moving volume) cannot be checked without a clean scan: compare it with the aligned
volume, which is left unrestored.</p>
<p>Scripting: <code>UniFuseSlicer.UniFuseSlicerLogic().process(referenceNode, movingNode)</code>.
See the <a href="{docs}">module documentation</a>.</p>
<p>If you use this module, please cite the method paper: {citation}</p>
""").format(docs=DOCUMENTATION_URL, citation=CITATION)
        self.parent.acknowledgementText = _("""
<p>UniFuse 3D is an independent 3D implementation of the UniFuse method by Dayong Su, Yafei Zhang, Huafeng
Li (Kunming University of Science and Technology), Jinxing Li (Harbin Institute of Technology at Shenzhen)
and Yu Liu (Hefei University of Technology): {citation} The paper's authors are not involved in this
module.</p>
<p>The shipped weights were trained on synthetic data derived from the MNI ICBM152 2009 template distributed
with nilearn. Offscreen rendering for the documentation uses trame-slicer (Kitware).</p>
""").format(citation=CITATION)
        slicer.app.connect("startupCompleted()", self._registerSampleData)

    def _registerSampleData(self):
        try:
            import SampleData
        except ImportError:
            return
        moduleDir = os.path.dirname(self.parent.path)
        missing = register_sample_data(SampleData.SampleDataLogic, moduleDir)
        if missing:
            logging.warning("UniFuse sample data not registered; missing files: " + ", ".join(map(str, missing)))


#
# Parameter node
#


@parameterNodeWrapper
class UniFuseSlicerParameterNode:
    """State of the module GUI, saved with the scene.

    Widgets with a ``SlicerParameterName`` property in UniFuseSlicer.ui are connected automatically; the
    combo boxes (degradation, moving modality, device, output mode, overlay) and the weights path are
    synchronised by the widget.
    """

    referenceVolume: vtkMRMLScalarVolumeNode
    movingVolume: vtkMRMLScalarVolumeNode
    degradation: str = "auto"
    # "auto" (a DICOM-loaded volume's Modality, else detected), "ct", "mr" or "pet".
    movingModality: str = "auto"
    device: str = "auto"
    workingSpacing: Annotated[float, WithinRange(0.0, 12.0)] = 0.0
    weightsPath: str = ""
    runInBackground: bool = True
    keepTemporaryFiles: bool = False
    # Output handling: "new" nodes every run, or "update" the previous result's nodes.
    outputMode: str = "new"
    placeMovingUnderTransform: bool = False
    fitViews: bool = True
    # Optional existing output nodes (None = new node, or the previous result's node with "update").
    fusedVolume: vtkMRMLScalarVolumeNode
    alignedVolume: vtkMRMLScalarVolumeNode
    displacementTransform: vtkMRMLGridTransformNode
    errorMapVolume: vtkMRMLScalarVolumeNode
    errorMapBeforeVolume: vtkMRMLScalarVolumeNode
    jacobianVolume: vtkMRMLScalarVolumeNode
    # Display of the last result.
    lastResult: vtkMRMLScalarVolumeNode
    overlay: str = "fused"
    foregroundOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    showGrid: bool = False


#
# UniFuseSlicerWidget
#


class _WidgetRunView(RunView):
    """Forwards what the run controller reports to the widget."""

    def __init__(self, widget):
        self.widget = widget

    def run_started(self, request):
        self.widget._onRunStarted()

    def progress(self, fraction, message):
        self.widget._setProgress(fraction, message)

    def log(self, text):
        self.widget._appendLog(text)

    def run_ended(self, outcome):
        self.widget._onRunEnded(outcome)

    def process_events(self):
        slicer.app.processEvents()  # repaint; lets the Cancel button set the cancel flag


class UniFuseSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Module GUI: selectors, options, Apply/Cancel, progress, display controls and the result status."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.controller = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._pollTimer = None
        self._deviceProbe = None
        self._shownDisplayState = None
        self._modalityHintNodeID = None

    # -- setup -----------------------------------------------------------------------------------------

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/UniFuseSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = UniFuseSlicerLogic()
        self.controller = RunController(self.logic.fusionLogic, view=_WidgetRunView(self), prepare=self._prepareRun)

        degradationLabels = self._degradationLabels()
        for choice in DEGRADATION_CHOICES:
            self.ui.degradationComboBox.addItem(degradationLabels[choice.value], choice.value)
        movingModalityLabels = self._movingModalityLabels()
        for choice in MOVING_MODALITY_CHOICES:
            self.ui.movingModalityComboBox.addItem(movingModalityLabels[choice.value], choice.value)
        deviceLabels = self._deviceLabels(None)
        for value in DEVICE_VALUES:
            self.ui.deviceComboBox.addItem(deviceLabels[value], value)
        outputModeLabels = self._outputModeLabels()
        for choice in OUTPUT_MODE_CHOICES:
            self.ui.outputModeComboBox.addItem(outputModeLabels[choice.value], choice.value)
        overlayLabels = self._overlayLabels()
        for choice in OVERLAY_CHOICES:
            self.ui.overlayComboBox.addItem(overlayLabels[choice.value], choice.value)
        self.ui.progressBar.hide()

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(200)
        self._pollTimer.timeout.connect(self._onPollTimer)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.degradationComboBox.currentIndexChanged.connect(self._onComboBoxesChanged)
        self.ui.movingModalityComboBox.currentIndexChanged.connect(self._onComboBoxesChanged)
        self.ui.deviceComboBox.currentIndexChanged.connect(self._onComboBoxesChanged)
        self.ui.outputModeComboBox.currentIndexChanged.connect(self._onComboBoxesChanged)
        self.ui.overlayComboBox.currentIndexChanged.connect(self._onComboBoxesChanged)
        self.ui.weightsPathLineEdit.currentPathChanged.connect(self._onWeightsPathChanged)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)

        self.initializeParameterNode()

    # Labels of the combo boxes, by the value the core accepts (the values come from UniFuseSlicerLib.options).

    @staticmethod
    def _degradationLabels():
        return {
            "auto": _("Automatic (detect)"),
            "none": _("None (clean moving volume)"),
            "motion": _("MRI motion artifacts"),
            "metal": _("CT metal artifacts + noise"),
            "lowdose": _("Low-dose PET noise"),
        }

    @staticmethod
    def _movingModalityLabels():
        return {
            "auto": _("Automatic (DICOM modality, else detected)"),
            "ct": _("CT"),
            "mr": _("MRI"),
            "pet": _("PET"),
        }

    @staticmethod
    def _deviceLabels(gpus):
        """``gpus``: None before the background probe answered, else the GPUs PyTorch sees (maybe none)."""
        labels = {"auto": _("Automatic (GPU if available)"), "cpu": _("CPU"), "cuda": _("GPU (CUDA)")}
        if gpus is not None and not gpus:
            labels["auto"] = _("Automatic (CPU: no CUDA GPU found)")
            labels["cuda"] = _("GPU (CUDA): none found")
        elif gpus:
            first = gpus[0]
            labels["cuda"] = _("GPU {index}: {name} ({memory} GiB)").format(
                index=first.index, name=first.name, memory=f"{first.memory_gib:.1f}")
            if len(gpus) > 1:
                labels["cuda"] += " " + _("(+{count} more; select with CUDA_VISIBLE_DEVICES)").format(count=len(gpus) - 1)
        return labels

    @staticmethod
    def _outputModeLabels():
        return {"new": _("Create new nodes"), "update": _("Update the previous result")}

    @staticmethod
    def _overlayLabels():
        return {
            "fused": _("Fused volume"),
            "aligned": _("Aligned moving volume"),
            "error_map": _("Alignment error (after)"),
            "error_map_before": _("Alignment error (before)"),
            "jacobian": _("Jacobian determinant"),
        }

    def cleanup(self) -> None:
        if self._pollTimer is not None:
            self._pollTimer.stop()
        if self.controller is not None:
            self.controller.shutdown()
        if self._deviceProbe is not None:
            self._deviceProbe.cancel()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()
        self._startDeviceProbe()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        if self.controller is not None:
            self.controller.cancel()  # returns at once; the next polls report the cancellation
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    # -- device probe (GPU names without importing torch into Slicer) ------------------------------------

    def _startDeviceProbe(self) -> None:
        if self._deviceProbe is not None or not torch_status()[1]:
            return  # probed already, or PyTorch not installed (yet): keep the generic labels
        self._deviceProbe = DeviceProbe(on_done=self._onDevicesProbed).start()
        self._pollTimer.start()

    def _onDevicesProbed(self, gpus) -> None:
        labels = self._deviceLabels(gpus)
        for index in range(self.ui.deviceComboBox.count):
            value = self.ui.deviceComboBox.itemData(index)
            if value in labels:
                self.ui.deviceComboBox.setItemText(index, labels[value])

    # -- parameter node ----------------------------------------------------------------------------------

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.referenceVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                self._parameterNode.referenceVolume = first

    def setParameterNode(self, inputParameterNode: Optional[UniFuseSlicerParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        self._modalityHintNodeID = None  # look the moving volume's DICOM modality up again (node IDs are reused)
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        if not self._parameterNode:
            return
        self._selectComboValue(self.ui.degradationComboBox, self._parameterNode.degradation)
        self._selectComboValue(self.ui.movingModalityComboBox, self._parameterNode.movingModality)
        self._updateMovingModalityHint()
        self._selectComboValue(self.ui.deviceComboBox, self._parameterNode.device)
        self._selectComboValue(self.ui.outputModeComboBox, self._parameterNode.outputMode)
        self._selectComboValue(self.ui.overlayComboBox, self._parameterNode.overlay)
        if self.ui.weightsPathLineEdit.currentPath != self._parameterNode.weightsPath:
            self.ui.weightsPathLineEdit.currentPath = self._parameterNode.weightsPath
        self._updateApplyButton()
        self._updateDisplay()

    @staticmethod
    def _selectComboValue(comboBox, value: str) -> None:
        index = comboBox.findData(value)
        if index >= 0 and comboBox.currentIndex != index:
            wasBlocked = comboBox.blockSignals(True)
            comboBox.currentIndex = index
            comboBox.blockSignals(wasBlocked)

    def _onComboBoxesChanged(self, index=None) -> None:
        if not self._parameterNode:
            return
        wasModified = self._parameterNode.StartModify()
        self._parameterNode.degradation = self.ui.degradationComboBox.currentData or "auto"
        self._parameterNode.movingModality = self.ui.movingModalityComboBox.currentData or "auto"
        self._parameterNode.device = self.ui.deviceComboBox.currentData or "auto"
        self._parameterNode.outputMode = self.ui.outputModeComboBox.currentData or "new"
        self._parameterNode.overlay = self.ui.overlayComboBox.currentData or "fused"
        self._parameterNode.EndModify(wasModified)

    def _updateMovingModalityHint(self) -> None:
        """Name the DICOM Modality of the selected moving volume in the combo box's Automatic entry (looked up
        in the DICOM database only when another volume is selected; the run resolves it again)."""
        node = self._parameterNode.movingVolume if self._parameterNode else None
        nodeID = node.GetID() if node else ""
        if nodeID == self._modalityHintNodeID:
            return
        self._modalityHintNodeID = nodeID
        labels = self._movingModalityLabels()
        found = modality_from_dicom(dicom_modality(node)) if node else None
        text = labels["auto"] if found is None else _("Automatic: {modality} (from the DICOM database)").format(
            modality=labels[found])
        index = self.ui.movingModalityComboBox.findData("auto")
        if index >= 0:
            self.ui.movingModalityComboBox.setItemText(index, text)

    def _onWeightsPathChanged(self, path) -> None:
        if self._parameterNode and self._parameterNode.weightsPath != path:
            self._parameterNode.weightsPath = path

    def _updateApplyButton(self) -> None:
        if self.controller is not None and self.controller.running:
            self.ui.applyButton.text = _("Cancel")
            self.ui.applyButton.toolTip = _("Stop the running UniFuse computation; the scene stays unchanged.")
            self.ui.applyButton.enabled = True
            return
        self.ui.applyButton.text = _("Apply")
        p = self._parameterNode
        if p and p.referenceVolume and p.movingVolume and p.referenceVolume != p.movingVolume:
            self.ui.applyButton.toolTip = _("Align, restore and fuse the moving volume onto the reference volume.")
            self.ui.applyButton.enabled = True
        else:
            self.ui.applyButton.toolTip = _("Select two different volumes as reference and moving.")
            self.ui.applyButton.enabled = False

    # -- display of the last result ---------------------------------------------------------------------

    def _lastNodes(self):
        if not self._parameterNode or not self._parameterNode.lastResult:
            return None
        return self.logic.fusionLogic().nodes_from_output(self._parameterNode.lastResult)

    def _updateDisplay(self, force: bool = False) -> None:
        """Apply the Display section to the views, only when one of its settings (or the result) changed, so
        that editing other parameters never resets the slice views."""
        nodes = self._lastNodes()
        self.ui.displayCollapsibleButton.enabled = nodes is not None
        if nodes is None or (self.controller is not None and self.controller.running):
            return
        p = self._parameterNode
        state = (nodes.fused.GetID(), p.overlay, p.foregroundOpacity, p.showGrid)
        if state == self._shownDisplayState and not force:
            return
        self._shownDisplayState = state
        self.logic.fusionLogic().show_result(nodes, overlay=p.overlay, opacity=p.foregroundOpacity, show_grid=p.showGrid)

    # -- running: the controller decides, the widget shows ----------------------------------------------

    def onApplyButton(self) -> None:
        if self.controller.running:
            self.controller.cancel()
            return
        self.controller.start(self._runRequest())
        if self.controller.running:
            self._pollTimer.start()

    def _runRequest(self) -> RunRequest:
        p = self._parameterNode
        return RunRequest(
            reference=p.referenceVolume,
            moving=p.movingVolume,
            options={
                "degradation": p.degradation,
                "moving_modality": p.movingModality,
                "device": p.device,
                "weights": p.weightsPath or None,
                "spacing_mm": p.workingSpacing or None,
            },
            background=p.runInBackground,
            output_mode=p.outputMode,
            outputs=OutputNodes(
                fused=p.fusedVolume, aligned=p.alignedVolume, displacement=p.displacementTransform,
                error_map=p.errorMapVolume, error_map_before=p.errorMapBeforeVolume, jacobian=p.jacobianVolume,
            ),
            previous=self._lastNodes(),
            place_moving_under_transform=p.placeMovingUnderTransform,
            fit_views=p.fitViews,
            keep_temporary_files=p.keepTemporaryFiles,
        )

    def _onPollTimer(self) -> None:
        running = self.controller.poll()
        probing = self._deviceProbe is not None and not self._deviceProbe.poll()
        if not running and not probing:
            self._pollTimer.stop()

    def _onRunStarted(self) -> None:
        self.ui.logTextEdit.plainText = ""
        self.ui.statusTextEdit.plainText = ""
        self._setProgress(0.0, _("starting"))
        self._updateApplyButton()

    def _onRunEnded(self, outcome) -> None:
        self.ui.progressBar.hide()
        self.ui.progressLabel.text = ""
        self._updateApplyButton()
        if outcome.status == "succeeded":
            nodes = outcome.nodes
            status = nodes.summary()
            for warning in outcome.warnings:
                status += "\n" + _("Note: {warning}").format(warning=warning)
            self.ui.statusTextEdit.plainText = status
            self._appendLog(_("Outputs are in the subject-hierarchy folder next to the reference volume."))
            if self._parameterNode:
                wasModified = self._parameterNode.StartModify()
                self._parameterNode.lastResult = nodes.fused
                self._parameterNode.overlay = "fused"
                self._parameterNode.EndModify(wasModified)
            self._updateDisplay(force=True)
        elif outcome.status == "failed":
            logging.error(f"UniFuse failed: {outcome.message}\n{outcome.details}")
            slicer.util.errorDisplay(_("UniFuse failed.") + "\n\n" + outcome.message, detailedText=outcome.details)
        else:
            self._appendLog(_("Cancelled; the scene is unchanged."))

    def _setProgress(self, fraction: float, message: str) -> None:
        self.ui.progressBar.show()
        self.ui.progressBar.value = int(round(1000 * min(max(fraction, 0.0), 1.0)))
        self.ui.progressLabel.text = message
        self._appendLog(f"{100 * fraction:5.1f} % {message}")

    def _appendLog(self, text: str) -> None:
        self.ui.logTextEdit.appendPlainText(text)

    # -- dependencies: asked once, then installed -------------------------------------------------------

    def _prepareRun(self, request) -> bool:
        """Install missing Python packages the Slicer way after one confirmation; True when UniFuse can run."""
        plan = installation_plan()
        if plan.ready:
            return True
        question = _(
            "UniFuse needs Python packages that are not installed in Slicer yet:\n\n{packages}\n\n"
            "Install them now? This can take several minutes. Slicer's own packages (numpy, SimpleITK, VTK) are "
            "not changed."
        ).format(packages=plan.describe())
        if not slicer.util.confirmOkCancelDisplay(question, windowTitle=_("UniFuse: install Python packages")):
            return False
        final = None
        with slicer.util.tryWithErrorDisplay(_("Failed to install the UniFuse dependencies."), waitCursor=True):
            final = installDependencies(plan, slicer, slicer.app.temporaryPath, log=self._appendLog)
        if final is None:
            return False
        if not final.ready:
            slicer.util.errorDisplay(
                _("Some UniFuse dependencies are still missing:\n\n{packages}\n\nRestart Slicer and press Apply "
                  "again.").format(packages=final.describe()))
        return final.ready


#
# UniFuseSlicerLogic
#


def _sliceLogics():
    """The slice logics of Slicer's views (empty without a layout manager, e.g. in tests)."""
    app = getattr(slicer, "app", None)
    layoutManager = app.layoutManager() if app is not None and hasattr(app, "layoutManager") else None
    if layoutManager is None:
        return []
    logics = layoutManager.mrmlSliceLogics()
    return [logics.GetItemAsObject(i) for i in range(logics.GetNumberOfItems())]


class UniFuseSlicerLogic(ScriptedLoadableModuleLogic):
    """Scripting entry point of the module; delegates to ``UniFuseSlicerLib.logic.FusionLogic``.

    Example (Slicer Python console)::

        nodes = UniFuseSlicer.UniFuseSlicerLogic().process(referenceNode, movingNode, degradation="auto", device="auto",
                                                           moving_modality="auto")
        nodes.fused, nodes.aligned, nodes.displacement, nodes.error_map, nodes.jacobian
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return UniFuseSlicerParameterNode(super().getParameterNode())

    def fusionLogic(self) -> FusionLogic:
        return FusionLogic(slicer.mrmlScene, slice_logics=_sliceLogics)

    def process(self, referenceNode, movingNode, degradation="auto", device="auto", weights=None, progress=None,
                **options):
        """Fuse ``movingNode`` onto ``referenceNode`` in this process; returns ``FusionNodes`` (new nodes).

        ``options`` go to ``FusionLogic.process`` / ``unifuse.fuse`` (``moving_modality``, ``spacing_mm``,
        ``refine``, ``outputs``, ``show``, ``cancel``, ``config``, ``init``); ``moving_modality="auto"`` (the
        default) takes the Modality of a volume loaded from Slicer's DICOM database.
        """
        return self.fusionLogic().process(referenceNode, movingNode, degradation=degradation, device=device,
                                          weights=weights, progress=progress, **options)


#
# UniFuseSlicerTest
#


class UniFuseSlicerTest(ScriptedLoadableModuleTest):
    """Self-test run by Slicer (``Reload and Test``) and by ctest.

    The scene side (results into MRML, without the network) runs everywhere. The network part needs PyTorch;
    on a Slicer without it (e.g. the extension build machines) it is skipped with a logged reason.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SceneSide()
        reason = torch_unavailable_reason()
        if reason is not None:
            logging.warning(f"UniFuse self-test: network part skipped: {reason}")
            self.delayDisplay(f"Network part skipped: {reason}")
            return
        self.setUp()
        self.test_SampleData()
        self.setUp()
        self.test_SyntheticOblique()

    def test_SceneSide(self):
        """MRML side without the network: new outputs, "update the previous result" (constant node count),
        moving volume under the transform on request, slice views fitted to an oblique reference."""
        from UniFuseSlicerLib.selftest import check_scene_side

        reference, moving = _syntheticObliquePair()
        check_scene_side(slicer.mrmlScene, reference, moving, log=self.delayDisplay, slice_logics=_sliceLogics)

    def _checkRun(self, reference, moving, **options):
        import numpy as np

        referenceBefore = slicer.util.arrayFromVolume(reference).copy()
        movingBefore = slicer.util.arrayFromVolume(moving).copy()
        movingMatrixBefore = slicer.util.arrayFromVTKMatrix(_ijkToRas(moving))
        nodes = UniFuseSlicerLogic().process(reference, moving, degradation="auto", device="auto", **options)
        self.assertTrue(np.array_equal(slicer.util.arrayFromVolume(reference), referenceBefore))
        self.assertTrue(np.array_equal(slicer.util.arrayFromVolume(moving), movingBefore))
        self.assertTrue(np.array_equal(slicer.util.arrayFromVTKMatrix(_ijkToRas(moving)), movingMatrixBefore))
        referenceMatrix = slicer.util.arrayFromVTKMatrix(_ijkToRas(reference))
        for role in ("fused", "aligned", "error_map", "error_map_before", "jacobian"):
            node = nodes.node(role)
            self.assertIsNotNone(node)
            self.assertNotIn(node, (reference, moving))
            self.assertEqual(node.GetImageData().GetDimensions(), reference.GetImageData().GetDimensions())
            self.assertTrue(np.allclose(slicer.util.arrayFromVTKMatrix(_ijkToRas(node)), referenceMatrix, atol=1e-6))
            self.assertTrue(np.isfinite(slicer.util.arrayFromVolume(node)).all())
        self.assertTrue(nodes.displacement.IsA("vtkMRMLGridTransformNode"))
        self.assertIsNone(moving.GetParentTransformNode())
        composite = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceCompositeNode()
        self.assertEqual(composite.GetBackgroundVolumeID(), reference.GetID())
        self.assertEqual(composite.GetForegroundVolumeID(), nodes.fused.GetID())
        self.delayDisplay(nodes.summary())
        return nodes

    def test_SampleData(self):
        """Run UniFuse on the shipped sample pair with the shipped weights (needs PyTorch)."""
        import SampleData

        self.delayDisplay("Loading the UniFuse sample pair")
        moduleDir = os.path.dirname(slicer.modules.unifuseslicer.path)
        missing = register_sample_data(SampleData.SampleDataLogic, moduleDir)
        self.assertEqual(missing, [], f"sample data files missing from the module: {missing}")
        reference, moving = SampleData.SampleDataLogic().downloadSamples("UniFuseSample")
        self._checkRun(reference, moving)
        self.delayDisplay("Sample data test passed")

    def test_SyntheticOblique(self):
        """Tiny network on small synthetic volumes with oblique, anisotropic grids (fast; needs PyTorch)."""
        self.delayDisplay("Running UniFuse (tiny network) on synthetic oblique volumes")
        reference, moving = _syntheticObliquePair()
        self._checkRun(reference, moving, config="tiny", spacing_mm=2.0)
        self.delayDisplay("Synthetic test passed")


def _syntheticObliquePair():
    """Reference and moving volumes (blob + ramp) on oblique, anisotropic grids, added to the scene."""
    import numpy as np

    z, y, x = np.mgrid[:24, :26, :28].astype(np.float32)
    blob = np.exp(-((x - 14) ** 2 + (y - 13) ** 2 + (z - 12) ** 2) / 60.0)
    reference = slicer.util.addVolumeFromArray(
        (100 * blob + x).astype(np.float32), ijkToRAS=_obliqueMatrix((1.2, 1.0, 1.5), 12.0), name="reference")
    moving = slicer.util.addVolumeFromArray(
        (80 * np.roll(blob, 2, axis=2)).astype(np.float32), ijkToRAS=_obliqueMatrix((1.1, 1.1, 1.4), -8.0),
        name="moving")
    return reference, moving


def _ijkToRas(volumeNode):
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return matrix


def _obliqueMatrix(spacing, degrees):
    import numpy as np

    angle = np.deg2rad(degrees)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]])
    matrix = np.eye(4)
    matrix[:3, :3] = rotation @ np.diag(spacing)
    matrix[:3, 3] = (-15.0, -12.0, -18.0)
    return matrix
