"""ONNX exports of the model families, for the onnxruntime and tensorrt backends.

:mod:`~inference.export.manifest` (no heavy imports): where an export lives, what it records, whether it fits the
checkpoint. :mod:`~inference.export.modules` (torch): the modules exported as graphs. :mod:`~inference.export.exporter`
(torch, onnx): ``dicom-node model export``. :mod:`~inference.export.tensorrt_build`: TensorRT engines from the graphs.
:mod:`~inference.export.qwen` (torch): the Qwen-VL vision towers and Qwen3-VL's deepstack decoder input.

Families and how each is split (the adapter's ``export_plan`` and ``export_encode``):

==============  ==========================================================  ============================================
family          vision graph                                                decoder graph, host-side inputs
==============  ==========================================================  ============================================
demo (LLaVA)    tower and projector, a batch of 128 x 128 images            Llama; 1-D positions
qwen2_5_vl      one image per run: patches in window order, their positions, Qwen2 with 3-row M-RoPE positions
                the window-attention mask and the inverse order, all from   (``get_rope_index`` in numpy)
                the host (transformers derives them with ``.tolist()``)
qwen3_vl        one image per run: positions and the position-embedding     as Qwen2.5-VL, plus ``visual_pos_masks``
                interpolation from the host; deepstack features as a        and ``deepstack_features`` added to the
                second output                                               first layers' image-token states
internvl (-hf)  the model's own batched ``get_image_features`` (tower,      Qwen2 (or Llama); 1-D positions
                pixel shuffle, projector) on a batch of tiles
medgemma        SigLIP and projector on a batch of square images            the whole Gemma 3 model on embeddings with
                                                                            ``token_type_ids`` (bidirectional image
                                                                            mask in the prefill); sliding-window layers
                                                                            keep the full cache under their mask
medrega         refused: ``MedRegAAdapter.export_unsupported`` says why     (InternVL-Chat-V1-2 remote code)
==============  ==========================================================  ============================================
"""

from inference.export.manifest import (
    EXPORT_COMMAND,
    ExportManifest,
    ExportMissingError,
    ExportUnsupportedError,
    export_folder,
    find_export,
)

__all__ = [
    "EXPORT_COMMAND",
    "ExportManifest",
    "ExportMissingError",
    "ExportUnsupportedError",
    "export_folder",
    "find_export",
]
