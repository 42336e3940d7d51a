"""Export: fold the learned prompts, write ``segmenter.onnx`` and ``cam.onnx`` with their metadata,
and pass the parity gate. Public face: :class:`ExportConfig`, :func:`export_run`."""

from .exporter import ExportConfig, export_run

__all__ = ["ExportConfig", "export_run"]
