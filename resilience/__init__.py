"""Resilience toolkit: attacks on the entropy model, input defenses and experiment campaigns, in real coded bytes.

Modules (imported on demand, so ``import resilience`` pulls in no torch):

* :mod:`resilience.attacks` -- entropy PGD (L∞/L2, low-frequency, region-weighted, adaptive BPDA), the accuracy PGD
  and sign-noise baselines; registry ``ATTACKS``.
* :mod:`resilience.defenses` -- object-aware TV denoising (the paper's defense) and classic input transformations;
  registry ``DEFENSES``. Its torch-free twin for the edge is :mod:`edge_client.defense`.
* :mod:`resilience.campaign` -- grids of models × attacks × ε × corruptions × defenses measured in real bytes,
  resumable and cached; presets in ``resilience/presets`` (``splitinfer campaign --preset small|full|headline``).
"""
