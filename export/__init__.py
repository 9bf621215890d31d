"""tuneserve export stage: a fine-tuned checkpoint → a validated, optimized ONNX artifact.

python -m export runs/NAME --out artifacts [--name NAME] [--version V] [--int8] [--fp16]
"""
