"""The processor daemon: stores check results from Kafka in PostgreSQL, exactly once."""
