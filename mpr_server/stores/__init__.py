"""Message stores: one interface (`base.MessageStore`), an embedded and a distributed implementation."""
