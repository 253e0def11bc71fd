"""Alembic environment: runs against the engine handed over by ``batch.ledger.migrate``."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Engine, create_engine

from batch.ledger.models import metadata

config = context.config
engine: Engine | None = config.attributes.get("engine")
if engine is None:
    engine = create_engine(config.get_main_option("sqlalchemy.url") or "sqlite:///ledger.sqlite")

with engine.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()
