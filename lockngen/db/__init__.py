"""PostgreSQL backend that retries refused or starting-up connections."""
