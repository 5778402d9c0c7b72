"""Restores: in place, to new images, one disk, and the cleaning of restored templates."""
