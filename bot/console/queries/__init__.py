"""The SQL of the console pages, one module per page, so the routes read like the page and hold no SQL.

Each function takes the connection (the route owns the transaction) and
keyword arguments, and returns plain rows or numbers. What several pages,
the export or ``/metrics`` also read (status sets, the contacts join, the
number and time filters, the signature list) is in ``bot.store.queries``,
so it exists once.
"""
