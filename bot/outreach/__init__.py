"""Conversations the business starts: a template sent first, a state and vars set, beside the inbound pipeline.

``check.py`` checks a start against the live rules before any SQL (signature,
template by name, state, parameter count); ``write.py`` writes a whole list of
checked starts in the caller's transaction with a handful of set-based
statements, the way ``bot/ingest/batch.py`` writes a batch of callbacks (the
same contact and conversation look-ups and locks, the same loop guard, the same
outbox), and merges contact vars without sending. ``numbers.py`` reads the
numbers people type. The HTTP API (``bot/api``) and the CLI (``smsbot start``,
``smsbot contacts import``) are both built on these.
"""
