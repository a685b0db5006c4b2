"""Engine backends, one per file, all behind ``workers.engines.base.Engine``."""
