"""The device side: ONNX Runtime / TensorRT / OpenVINO backends, numpy pre/post-processing, infer and bench.

Never imports torch, torchvision or open_clip (a test blocks them), and stays Python 3.10 clean
for JetPack 6.
"""
