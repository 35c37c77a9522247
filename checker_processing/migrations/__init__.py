"""SQL migrations, applied in order by `checker_processing.migrate`."""
