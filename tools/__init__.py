"""dmdserve's Python tools: checkpoint conversion and bundle export (see docs/SD15.md)."""
