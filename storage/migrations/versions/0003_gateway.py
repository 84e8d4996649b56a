"""Gateway: `routes` (what each track's stable name serves) and `api_keys` (hashed keys, allowed tracks).

Which key made an interaction is kept in the interaction's metadata (`metadata.gateway.key`), not in a
new column: the interaction table and its public record contract stay as they are, and the one lookup
that needs it (feedback checked against its interaction's key) reads one row by its unique id.

Revision ID: 0003
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "routes",
        sa.Column("track", sa.String(length=100), nullable=False),
        sa.Column("version", sa.String(length=50), nullable=False),
        sa.Column("adapter_name", sa.String(length=200), nullable=False),
        sa.Column("previous_version", sa.String(length=50), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("track"),
    )
    op.create_table(
        "api_keys",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("key_sha256", sa.String(length=64), nullable=False),
        sa.Column(
            "tracks",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("consent_default", sa.Boolean(), nullable=False),
        sa.Column("store_traffic", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key_sha256"),
        sa.UniqueConstraint("name"),
    )


def downgrade() -> None:
    op.drop_table("api_keys")
    op.drop_table("routes")
