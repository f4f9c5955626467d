"""Sources: a recipe's model as checked ONNX (torch, ONNX, Hugging Face), its data and metrics."""
