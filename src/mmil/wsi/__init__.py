"""Whole-slide images: tissue masks, patch grids, patch features and heatmaps.

Modules (imported on use; OpenSlide is needed only for the slide-reading parts):

* :mod:`mmil.wsi.slide`: open slides, microns per pixel, magnification, level choice;
* :mod:`mmil.wsi.tissue`: tissue segmentation (saturation, Otsu, closing, area filters);
* :mod:`mmil.wsi.tiling`: patch grids on tissue -> CLAM-style coordinate ``.h5``, thumbnails;
* :mod:`mmil.wsi.backbones`, :mod:`mmil.wsi.transforms`, :mod:`mmil.wsi.features`:
  patch encoders and feature extraction -> CLAM-style feature ``.h5``;
* :mod:`mmil.wsi.heatmap`: instance scores of a trained model -> PNG overlays and QuPath GeoJSON.
"""
