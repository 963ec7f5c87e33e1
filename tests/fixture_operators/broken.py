"""An operator module that cannot be imported."""

raise RuntimeError("this module refuses to load")
