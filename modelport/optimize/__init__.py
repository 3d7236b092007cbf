"""Making models faster with their answers kept: INT8 quantization with an accuracy gate.

``quantize`` is the recipe (ONNX Runtime static quantization, sensitive layers kept in fp32),
``report`` measures what the INT8 model kept and gained, ``int8`` runs the whole command.
"""
