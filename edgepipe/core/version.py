"""The package version (one place; the manifest and the gpu target record it)."""

VERSION = "0.1.0"
