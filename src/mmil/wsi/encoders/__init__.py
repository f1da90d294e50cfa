"""Pathology tile encoders in plain torch (no timm / torchvision / transformers needed).

* :mod:`mmil.wsi.encoders.presets`: the registry ``PRESETS`` (name -> :class:`EncoderSpec`) and
  :func:`build_preset` (spec + local weight file -> model in eval mode, loaded strictly);
* :mod:`mmil.wsi.encoders.vit`: one Vision Transformer family with timm's parameter names
  (LayerScale, register tokens, SwiGLU-packed MLP, no-embed-class position embedding, dynamic image size).
"""
