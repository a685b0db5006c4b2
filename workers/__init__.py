"""Everything that runs inside one worker process, pinned to one device.

This package never imports ``cluster`` (the fleet layer)."""
