"""Pipeline: one recipe's build as stages, its manifest and checks; verify; reports."""
