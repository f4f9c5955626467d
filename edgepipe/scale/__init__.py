"""Scale: run build units in-process, in child processes or on Ray."""
