"""`OnnxImageClassifier`: the image-classification pipeline's interface on an ONNX Runtime session.

It runs a folder written by `deit-distill export` (`model.onnx`, `config.json`, `preprocessor_config.json`) and
needs only onnxruntime, transformers (for the saved image processor) and PIL, not the rest of this project. Images
are decoded by the pipeline's own `open_image` and `to_rgb`, then preprocessed by the saved image processor, so
the session receives the pixels `pipeline(...)` gives the PyTorch model, and the scores are post-processed by
transformers' own `ImageClassificationPipeline.postprocess`.

The package does not import this module: onnxruntime is an optional dependency (`pip install 'deit-distill[onnx]'`).
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, ImageClassificationPipeline

from .pipeline_deit_distill import open_image, to_rgb

ONNX_FILE = "model.onnx"
INPUT_NAME = "pixel_values"
ImageInput = str | Image.Image


def create_session(path: str | os.PathLike, threads: int | None = None, spin: bool = True) -> Any:
    """An ONNX Runtime CPU session for `path`; `threads` intra-op threads (ONNX Runtime's choice when None).

    `spin=False` stops the worker threads from busy-waiting after each call, which otherwise takes the cores
    from other thread pools of the process (PyTorch's, in an interleaved benchmark).
    """
    try:
        import onnxruntime
    except ImportError as error:
        raise ImportError(
            "Running ONNX models needs onnxruntime: pip install 'deit-distill[onnx]' (or onnxruntime)."
        ) from error
    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxImageClassifier:
    """Classify images with an exported model, as `pipeline("image-classification")` does.

    >>> classifier = OnnxImageClassifier.from_pretrained("exported")
    >>> classifier("shoe.png")  # [{"label": "Sneaker", "score": 0.93}, ...]
    """

    def __init__(self, session: Any, image_processor: Any, config: Any) -> None:
        self.session = session
        self.image_processor = image_processor
        self.config = config

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, *, file_name: str = ONNX_FILE, threads: int | None = None
    ) -> OnnxImageClassifier:
        """Load `directory/file_name` (e.g. `model_int8.onnx`) with the folder's config and image processor."""
        directory = Path(directory)
        path = directory / file_name
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} does not exist; write it with `deit-distill export MODEL --output DIR`."
            )
        return cls(
            create_session(path, threads),
            AutoImageProcessor.from_pretrained(directory),
            AutoConfig.from_pretrained(directory),
        )

    def preprocess(self, images: list[ImageInput]) -> np.ndarray:
        """`pixel_values` of a batch: each image opened and converted as the pipeline does, then processed."""
        rgb = [to_rgb(open_image(image)) for image in images]
        # return_tensors="pt" as the pipeline asks: the processor's output is then the same array.
        return self.image_processor(images=rgb, return_tensors="pt")["pixel_values"].numpy()

    def logits(self, images: list[ImageInput]) -> np.ndarray:
        return self.session.run(["logits"], {INPUT_NAME: self.preprocess(images)})[0]

    def __call__(
        self, inputs: ImageInput | list[ImageInput], top_k: int = 5
    ) -> list[dict[str, Any]] | list[list[dict[str, Any]]]:
        """`[{"label", "score"}, ...]` for one image (highest score first), a list of those for a list."""
        images = inputs if isinstance(inputs, list) else [inputs]
        # transformers' own post-processing (softmax or sigmoid by problem type, top_k capped, label names),
        # which reads only `model.config`.
        holder = SimpleNamespace(model=SimpleNamespace(config=self.config))
        results = [
            ImageClassificationPipeline.postprocess(
                holder, {"logits": torch.from_numpy(row[None])}, top_k=top_k
            )
            for row in self.logits(images)
        ]
        return results if isinstance(inputs, list) else results[0]
