"""Core: errors, logs, model files, the ORT runtime, artifact folders, results, fan-out maps."""
