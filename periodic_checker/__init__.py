"""The checker daemon: runs website checks on their intervals and publishes every result."""
