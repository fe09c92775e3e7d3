"""UniFuse: align, restore and fuse a degraded, misaligned second modality onto a reference volume.

Thin Slicer shell (module description, Qt widget, self-test). Everything that works on MRML nodes lives in
``UniFuseSlicerLib`` (no Qt; tested with slicer-core) and the network in the Slicer-free ``unifuse`` core.
"""

import logging
import os
import traceback
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

from UniFuseSlicerLib.dependencies import (
    MINIMUM_TORCH_VERSION,
    installation_plan,
    pip_install_arguments,
    write_constraints_file,
)
from UniFuseSlicerLib.logic import FusionLogic, OutputNodes
from UniFuseSlicerLib.options import DEGRADATION_CHOICES, OVERLAY_CHOICES, device_choices
from UniFuseSlicerLib.sampledata import register_sample_data
from unifuse.errors import CancelledError

CITATION = (
    "D. Su, Y. Zhang, H. Li, J. Li, Y. Liu. UniFuse: A Unified All-in-One Framework for Multi-Modal Medical "
    "Image Fusion Under Diverse Degradations and Misalignments. 2025. Code: https://github.com/slrl123/UniFuse"
)


#
# UniFuseSlicer
#


class UniFuseSlicer(ScriptedLoadableModule):
    """Module description shown by Slicer (title, category, help, acknowledgement)."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "UniFuse"
        # "Registration": the module's first job is to bring a second modality into the reference space (its
        # transform and aligned volume are registration outputs), where users look for such tools; fusion and
        # restoration come on top. A one-module "Multimodal fusion" category would be harder to find.
        self.parent.categories = ["Registration"]
        self.parent.dependencies = []  # torch comes from the PyTorch extension, checked on first use
        self.parent.contributors = ["UniFuseSlicer contributors"]
        self.parent.helpText = f"""
<p>Aligns, restores and fuses a degraded, misaligned <b>moving</b> volume (MRI with motion artifacts, CT with
metal artifacts and noise, low-dose PET) onto a good-quality <b>reference</b> volume with one network,
UniFuse 3D.</p>
<p>Select the two volumes and press <b>Apply</b>. Each run creates, in a new subject-hierarchy folder: the
fused volume, the aligned moving volume, the displacement as a grid transform (put the moving volume under
it to see it aligned), alignment-error maps before and after, and the Jacobian determinant (folding in red).
The slice views then show the reference with the fused volume on top; the <b>Display</b> section switches
the overlay, its opacity and the deformation grid. The <b>Results</b> section lists the degradation
diagnosis with class probabilities, timings, device and model.</p>
<p>Scripting: <code>UniFuseSlicer.UniFuseSlicerLogic().process(referenceNode, movingNode,
degradation="auto", device="auto")</code>.</p>
<p>See the <a href="https://github.com/unifuse-slicer/UniFuseSlicer/blob/main/docs/slicer.md">module
documentation</a>.</p>
<p>If you use this module, please cite: {CITATION}</p>
"""
        self.parent.acknowledgementText = f"""
<p>UniFuse 3D is an independent 3D re-implementation of the UniFuse method by Dayong Su, Yafei Zhang,
Huafeng Li (Kunming University of Science and Technology), Jinxing Li (Harbin Institute of Technology at
Shenzhen) and Yu Liu (Hefei University of Technology): {CITATION}.</p>
<p>Offscreen rendering for reports uses trame-slicer (Kitware); synthetic training data use the MNI ICBM152
2009 template distributed with nilearn.</p>
"""
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
    combo boxes (degradation, device, overlay) and the weights path are synchronised by the widget.
    """

    referenceVolume: vtkMRMLScalarVolumeNode
    movingVolume: vtkMRMLScalarVolumeNode
    degradation: str = "auto"
    device: str = "auto"
    workingSize: Annotated[int, WithinRange(0, 512)] = 0
    weightsPath: str = ""
    runInBackground: bool = True
    # Optional existing output nodes (None = create new nodes on every run).
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


class UniFuseSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Module GUI: selectors, options, Apply/Cancel, progress, display controls and the result status."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._backgroundRun = None
        self._inProcessRunning = False
        self._cancelRequested = False
        self._pollTimer = None
        self._shownDisplayState = None

    # -- setup -----------------------------------------------------------------------------------------

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/UniFuseSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = UniFuseSlicerLogic()

        for choice in DEGRADATION_CHOICES:
            self.ui.degradationComboBox.addItem(choice.label, choice.value)
        for choice in device_choices():
            self.ui.deviceComboBox.addItem(choice.label, choice.value)
        for choice in OVERLAY_CHOICES:
            self.ui.overlayComboBox.addItem(choice.label, choice.value)
        self.ui.progressBar.hide()

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(200)
        self._pollTimer.timeout.connect(self._pollBackgroundRun)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.degradationComboBox.currentIndexChanged.connect(self._onComboBoxesChanged)
        self.ui.deviceComboBox.currentIndexChanged.connect(self._onComboBoxesChanged)
        self.ui.overlayComboBox.currentIndexChanged.connect(self._onComboBoxesChanged)
        self.ui.weightsPathLineEdit.currentPathChanged.connect(self._onWeightsPathChanged)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self._pollTimer is not None:
            self._pollTimer.stop()
        if self._backgroundRun is not None:
            self._backgroundRun.cancel()
            try:
                self._backgroundRun.poll()  # removes the temporary folder
            except CancelledError:
                pass
            self._backgroundRun = None
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        self._cancelBackgroundRun()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

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
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        if not self._parameterNode:
            return
        self._selectComboValue(self.ui.degradationComboBox, self._parameterNode.degradation)
        self._selectComboValue(self.ui.deviceComboBox, self._parameterNode.device)
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
        self._parameterNode.device = self.ui.deviceComboBox.currentData or "auto"
        self._parameterNode.overlay = self.ui.overlayComboBox.currentData or "fused"
        self._parameterNode.EndModify(wasModified)

    def _onWeightsPathChanged(self, path) -> None:
        if self._parameterNode and self._parameterNode.weightsPath != path:
            self._parameterNode.weightsPath = path

    def _isRunning(self) -> bool:
        return self._backgroundRun is not None or self._inProcessRunning

    def _updateApplyButton(self) -> None:
        if self._isRunning():
            self.ui.applyButton.text = "Cancel"
            self.ui.applyButton.toolTip = "Stop the running UniFuse computation; the scene stays unchanged."
            self.ui.applyButton.enabled = True
            return
        self.ui.applyButton.text = "Apply"
        reference, moving = self._parameterNode.referenceVolume, self._parameterNode.movingVolume
        if reference and moving and reference != moving:
            self.ui.applyButton.toolTip = "Align, restore and fuse the moving volume onto the reference volume."
            self.ui.applyButton.enabled = True
        else:
            self.ui.applyButton.toolTip = "Select two different volumes as reference and moving."
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
        if nodes is None or self._isRunning():
            return
        p = self._parameterNode
        state = (nodes.fused.GetID(), p.overlay, p.foregroundOpacity, p.showGrid)
        if state == self._shownDisplayState and not force:
            return
        self._shownDisplayState = state
        self.logic.fusionLogic().show_result(nodes, overlay=p.overlay, opacity=p.foregroundOpacity, show_grid=p.showGrid)

    # -- running ----------------------------------------------------------------------------------------

    def onApplyButton(self) -> None:
        if self._isRunning():
            self._cancelRequested = True
            self._cancelBackgroundRun()
            return
        if not self._ensureDependencies():
            return
        p = self._parameterNode
        outputs = OutputNodes(
            fused=p.fusedVolume, aligned=p.alignedVolume, displacement=p.displacementTransform,
            error_map=p.errorMapVolume, error_map_before=p.errorMapBeforeVolume, jacobian=p.jacobianVolume,
        )
        options = {
            "degradation": p.degradation,
            "device": p.device,
            "weights": p.weightsPath or None,
            "working_size": p.workingSize or None,
        }
        self.ui.logTextEdit.plainText = ""
        self.ui.statusTextEdit.plainText = ""
        self._cancelRequested = False
        self._setProgress(0.0, "starting")
        if p.runInBackground:
            try:
                self._backgroundRun = self.logic.fusionLogic().start_background(
                    p.referenceVolume, p.movingVolume, on_progress=self._setProgress, on_log=self._appendLog,
                    outputs=outputs, **options,
                )
            except Exception as error:
                self._onRunEnded()
                details = traceback.format_exc()
                logging.error(f"Failed to start UniFuse: {error}\n{details}")
                slicer.util.errorDisplay(f"Failed to start UniFuse.\n\n{error}", detailedText=details)
                return
            self._updateApplyButton()
            self._pollTimer.start()
            return
        self._inProcessRunning = True
        self._updateApplyButton()
        succeeded = False
        try:
            nodes = self.logic.fusionLogic().process(
                p.referenceVolume, p.movingVolume, progress=self._onInProcessProgress, outputs=outputs,
                cancel=lambda: self._cancelRequested, **options,
            )
        except CancelledError:
            self._appendLog("Cancelled; the scene is unchanged.")
        except Exception as error:
            details = traceback.format_exc()
            logging.error(f"UniFuse failed: {error}\n{details}")
            slicer.util.errorDisplay(f"UniFuse failed.\n\n{error}", detailedText=details)
        else:
            self._onRunSucceeded(nodes)
            succeeded = True
        finally:
            self._inProcessRunning = False
            self._onRunEnded(succeeded)

    def _onInProcessProgress(self, fraction: float, message: str) -> None:
        self._setProgress(fraction, message)
        slicer.app.processEvents()  # repaint; lets the Cancel button set the cancel flag

    def _pollBackgroundRun(self) -> None:
        run = self._backgroundRun
        if run is None:
            self._pollTimer.stop()
            return
        try:
            nodes = run.poll()
        except CancelledError:
            self._appendLog("Cancelled; the scene is unchanged.")
            self._backgroundRun = None
            self._onRunEnded()
            return
        except Exception as error:
            self._backgroundRun = None
            self._onRunEnded()
            details = traceback.format_exc()
            if run.process is not None and run.process.stderr_tail():
                details += "\nUniFuse process output (stderr):\n" + "\n".join(run.process.stderr_tail())
            logging.error(f"UniFuse failed: {error}\n{details}")
            slicer.util.errorDisplay(f"UniFuse failed.\n\n{error}", detailedText=details)
            return
        if nodes is None:
            return
        self._backgroundRun = None
        self._onRunSucceeded(nodes)
        self._onRunEnded(succeeded=True)

    def _cancelBackgroundRun(self) -> None:
        if self._backgroundRun is not None:
            self._setProgress(self.ui.progressBar.value / 1000.0, "cancelling")
            self._backgroundRun.cancel()  # the next poll reports the cancellation and cleans up

    def _onRunSucceeded(self, nodes) -> None:
        self.ui.statusTextEdit.plainText = nodes.summary()
        self._appendLog("Outputs added in the subject-hierarchy folder of the reference volume.")
        wasModified = self._parameterNode.StartModify()
        self._parameterNode.lastResult = nodes.fused
        self._parameterNode.overlay = "fused"
        self._parameterNode.EndModify(wasModified)

    def _onRunEnded(self, succeeded: bool = False) -> None:
        self._pollTimer.stop()
        self.ui.progressBar.hide()
        self.ui.progressLabel.text = ""
        self._updateApplyButton()
        if succeeded:
            self._updateDisplay(force=True)

    def _setProgress(self, fraction: float, message: str) -> None:
        self.ui.progressBar.show()
        self.ui.progressBar.value = int(round(1000 * min(max(fraction, 0.0), 1.0)))
        self.ui.progressLabel.text = message
        self._appendLog(f"{100 * fraction:5.1f} % {message}")

    def _appendLog(self, text: str) -> None:
        self.ui.logTextEdit.appendPlainText(text)

    # -- dependencies -----------------------------------------------------------------------------------

    def _ensureDependencies(self) -> bool:
        """Install missing Python packages the Slicer way, after asking; True when UniFuse can run."""
        plan = installation_plan()
        if plan.ready:
            return True
        if not slicer.util.confirmOkCancelDisplay(plan.describe() + "\n\nInstall now?", "UniFuse: install dependencies"):
            return False
        with slicer.util.tryWithErrorDisplay("Failed to install the UniFuse dependencies.", waitCursor=True):
            if not plan.torch_ok:
                try:
                    import PyTorchUtils
                except ModuleNotFoundError:
                    raise RuntimeError("UniFuse needs the PyTorch extension: install 'PyTorch' from the Extensions "
                                       "Manager, restart Slicer and press Apply again.")
                torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
                    askConfirmation=True, torchVersionRequirement=f">={MINIMUM_TORCH_VERSION}")
                if torch is None:
                    raise RuntimeError("PyTorch was not installed; UniFuse cannot run without it.")
            if plan.pip_requirements:
                constraints = write_constraints_file(slicer.app.temporaryPath)
                slicer.util.pip_install(pip_install_arguments(plan.pip_requirements, constraints))
        final = installation_plan()
        if not final.ready:
            slicer.util.errorDisplay(final.describe() + "\nRestart Slicer and try again.")
        return final.ready


#
# UniFuseSlicerLogic
#


class UniFuseSlicerLogic(ScriptedLoadableModuleLogic):
    """Scripting entry point of the module; delegates to ``UniFuseSlicerLib.logic.FusionLogic``.

    Example (Slicer Python console)::

        nodes = UniFuseSlicer.UniFuseSlicerLogic().process(referenceNode, movingNode, degradation="auto", device="auto")
        nodes.fused, nodes.aligned, nodes.displacement, nodes.error_map, nodes.jacobian
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return UniFuseSlicerParameterNode(super().getParameterNode())

    def fusionLogic(self) -> FusionLogic:
        return FusionLogic(slicer.mrmlScene)

    def process(self, referenceNode, movingNode, degradation="auto", device="auto", weights=None, progress=None,
                **options):
        """Fuse ``movingNode`` onto ``referenceNode`` in this process; returns ``FusionNodes`` (new nodes).

        ``options`` go to ``FusionLogic.process`` / ``unifuse.fuse`` (``working_size``, ``outputs``,
        ``show``, ``cancel``, ``config``, ``init``).
        """
        return self.fusionLogic().process(referenceNode, movingNode, degradation=degradation, device=device,
                                          weights=weights, progress=progress, **options)


#
# UniFuseSlicerTest
#


class UniFuseSlicerTest(ScriptedLoadableModuleTest):
    """Self-test run by Slicer (``Reload and Test``) and by ctest."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SampleData()
        self.setUp()
        self.test_SyntheticOblique()

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
        """Run UniFuse on the shipped sample pair with the shipped weights."""
        import SampleData

        self.delayDisplay("Loading the UniFuse sample pair")
        moduleDir = os.path.dirname(slicer.modules.unifuseslicer.path)
        missing = register_sample_data(SampleData.SampleDataLogic, moduleDir)
        self.assertEqual(missing, [], f"sample data files missing from the module: {missing}")
        reference, moving = SampleData.SampleDataLogic().downloadSamples("UniFuseSample")
        self._checkRun(reference, moving)
        self.delayDisplay("Sample data test passed")

    def test_SyntheticOblique(self):
        """Tiny network on small synthetic volumes with oblique, anisotropic grids (fast)."""
        import numpy as np
        from unifuse.config import tiny

        self.delayDisplay("Running UniFuse (tiny network) on synthetic oblique volumes")
        z, y, x = np.mgrid[:24, :26, :28].astype(np.float32)
        blob = np.exp(-((x - 14) ** 2 + (y - 13) ** 2 + (z - 12) ** 2) / 60.0)
        reference = slicer.util.addVolumeFromArray(
            (100 * blob + x).astype(np.float32), ijkToRAS=_obliqueMatrix((1.2, 1.0, 1.5), 12.0), name="reference")
        moving = slicer.util.addVolumeFromArray(
            (80 * np.roll(blob, 2, axis=2)).astype(np.float32), ijkToRAS=_obliqueMatrix((1.1, 1.1, 1.4), -8.0),
            name="moving")
        self._checkRun(reference, moving, config=tiny(), working_size=16)
        self.delayDisplay("Synthetic test passed")


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
