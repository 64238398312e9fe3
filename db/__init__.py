"""The node's SQL database: SQLAlchemy 2.0 models, sessions and Alembic migrations."""
