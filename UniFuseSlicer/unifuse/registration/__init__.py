"""Classical registration stages of the alignment pipeline, in PyTorch and SimpleITK.

* :mod:`.mind` — MIND-SSC descriptors, a ground-truth-free alignment score and its evaluation mask.
* :mod:`.refine` — instance optimisation (refinement) of a deformable field on the working grid.
"""
